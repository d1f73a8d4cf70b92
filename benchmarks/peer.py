"""Each method against an independent implementation, lightly, trained the same way (issue 32).

Every contender trains through this project's own flow (``contrastive.training.train``: the CIFAR-10 CPU benchmark's
split, backbone, batch, optimiser, schedule, online probe, kNN monitor every epoch and the final evaluation), so the
figures are measured by the same code on the same evaluation images. What changes is the method:

* ``project``: this project's method (``contrastive.methods``), as ``python -m contrastive.train`` runs it.
* ``lightly`` (method level): the same data path and batch-wise augmentation feeding lightly's pieces: its loss
  modules (``NTXentLoss``, with its ``MemoryBankModule`` queue for MoCo; ``SwaVLoss`` with its Sinkhorn), its heads
  where one has the recipe's layout, its momentum update, batch shuffle and cosine momentum schedule, its SwAV
  prototypes and their freeze; each step written as lightly's own CIFAR-10 benchmark writes it. Backbone, head and
  prototypes start from the project's initialisation for the seed, and the loader's order and the augmentation
  streams come from the same seed.
* ``lightly_pipeline`` (SimCLR only): the whole pipeline, lightly's ``SimCLRTransform`` on PIL images in the
  workers of a torch ``DataLoader`` instead of the batch-wise augmentation on the device.

Each pair (lightly side - project side, final kNN over seeds, paired by seed) gets a verdict: equivalent within
``--margin`` kNN points (two one-sided tests at 0.05, Holm over the pairs; ``contrastive.report.stats``), a
difference, or undecided. The memory bank has no peer here: lightly's ``MemoryBankModule`` is a FIFO queue of the
last keys, not NPID's bank of one entry per training image, written back by index.

lightly is never a dependency of the project. It lives in its own venv, made by::

    python benchmarks/peer.py --install-lightly

(``.venv-lightly``: a venv of its own with lightly 1.6.0, reading torch, Lightning and this project from the
project's venv, so both sides run the same torch). Run with the project's Python, the script re-runs itself with the
peer venv's Python; without lightly it says how to get it and exits with status 2.

    python benchmarks/peer.py --epochs 10 --seeds 0,1,2 --jobs 2      # the comparison, results in results/peer/
    python benchmarks/peer.py --report-only                            # table and plot from the finished runs
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-lightly"
LIGHTLY_VERSION = "1.6.0"
LIGHTLY_PYTHON = os.environ.get("CONTRASTIVE_LIGHTLY_PYTHON", str(PEER_VENV / "bin" / "python"))
REEXEC_FLAG = "CONTRASTIVE_PEER_REEXEC"
MISSING_LIGHTLY = 2  # exit status without lightly

METHODS = ("simclr", "moco", "swav")
# contenders per method; the first is the reference of every pair
CONTENDERS: dict[str, tuple[str, ...]] = {
    "simclr": ("project", "lightly", "lightly_pipeline"),
    "moco": ("project", "lightly"),
    "swav": ("project", "lightly"),
}
LEVELS = {"lightly": "method level", "lightly_pipeline": "whole pipeline"}
MARGIN = 2.0  # kNN points

# What differs between the two sides by construction, per (method, contender): read with every verdict. "official"
# says which side follows the paper's official code.
DIFFERENCES: dict[tuple[str, str], list[str]] = {
    ("simclr", "lightly"): [
        "head: lightly's SimCLRProjectionHead(batch_norm=True) ends with a BN on the output (SimCLR v2's official head "
        "ends with BN without offset; the project's `method.proj_final_bn`); the recipe's head has none, so the "
        "lightly side uses lightly's generic ProjectionHead in the recipe's layout (Linear-BN-ReLU-Linear).",
        "loss: lightly's NTXentLoss masks the self-similarities by boolean indexing, the project's by -inf; the "
        "same 2N x (2N-1) softmax (official: google-research/simclr, the same loss).",
    ],
    ("simclr", "lightly_pipeline"): [
        "augmentation: per-image PIL transforms (lightly's SimCLRTransform, torchvision's ColorJitter) in the "
        "loader's workers against the project's batch-wise augmentation of uint8 tensors; the same parameters "
        "(crop scale 0.2-1, flip 0.5, jitter 0.8 x (0.4, 0.4, 0.4, 0.1), grey 0.2, no blur).",
    ],
    ("moco", "lightly"): [
        "queue with the symmetric loss (lightly #564): lightly's NTXentLoss enqueues the keys inside each call, so in "
        "lightly's symmetric step (its CIFAR-10 benchmark) the second term's queue already holds the first term's "
        "keys, among them the key of the query's own view: a sample's own key is one of its negatives. The project "
        "enqueues once after both terms. The official MoCo code (facebookresearch/moco) is asymmetric and enqueues "
        "after the loss, so no own key is ever a negative: the project follows it; MoCo v3's official symmetric "
        "loss has no queue.",
        "shuffle-BN: lightly's batch_shuffle alone leaves the BN statistics of a one-process batch unchanged (its "
        "benchmark relies on a SplitBatchNorm backbone); the lightly side encodes the shuffled keys in the recipe's "
        "8 sub-batches, as the project's key encoder does. Queries: one BN batch per view on both sides.",
        "momentum: lightly updates the key encoder before each step with lightly's cosine_schedule(step, total, "
        "0.99, 1); the project after each step, the same ramp.",
        "head: lightly's MoCoProjectionHead(batch_norm=True) adds a BN on the output (MoCo v3's layout); the recipe's "
        "head (BN after the hidden layer only) is built from lightly's generic ProjectionHead.",
    ],
    ("swav", "lightly"): [
        "prototypes: lightly's SwaVPrototypes is nn.Linear with a bias; the official SwAV prototypes "
        "(facebookresearch/swav, nn.Linear(..., bias=False)) and the project's have none: the project follows the "
        "official code. The weights start alike; the bias from lightly's own initialisation.",
        "Sinkhorn: lightly computes exp(scores / epsilon) without subtracting the maximum, as the official code "
        "does; at the recipe's epsilon 0.01 a float32 score above 0.887 overflows to inf (NaN codes). The lightly "
        "side feeds it float64 scores (exp(100) fits): the same computation without the overflow "
        "(`--swav-float32` runs it as is). The project runs Sinkhorn in log space.",
        "crops: lightly's benchmark passes each crop through the backbone on its own (BN statistics per crop); the "
        "official code and the project pass the crops of one resolution together.",
        "the recipe has no feature queue (`method.feature_queue_size=0`), so lightly's queue is not used.",
    ],
}
NO_PEER = (
    "memory_bank: no peer. lightly's MemoryBankModule is a FIFO queue of the last keys (MoCo's dictionary), not NPID's "
    "bank of one entry per training image written back by index with momentum 0.5; its check stays with its "
    "held-out references (tests/methods/test_memory_bank.py and the README's memory-bank results)."
)


# -- lightly, found or installed ----------------------------------------------------------------------------------
def lightly_version(python: str) -> str | None:
    """The lightly version ``python`` imports, or None."""
    try:
        done = subprocess.run(
            [python, "-c", "import lightly; print(lightly.__version__)"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def here_has_lightly() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightly") is not None


def how_to_get_lightly(python: str) -> str:
    return (
        f"lightly is not importable here, nor by {python}. It is not a dependency of the project; make its own venv "
        f"with\n    python benchmarks/peer.py --install-lightly\n(.venv-lightly: lightly {LIGHTLY_VERSION}, reading "
        "torch and the project from this venv), or give another Python with lightly and this project importable: "
        "--lightly PYTHON or CONTRASTIVE_LIGHTLY_PYTHON. A venv with everything of its own also works:\n"
        f"    python -m venv .venv-lightly && .venv-lightly/bin/pip install -c constraints.txt -e . "
        f"lightly=={LIGHTLY_VERSION}"
    )


def install_lightly(venv: Path) -> int:
    """A venv of its own for lightly: the base interpreter's venv, a .pth that adds this Python's site-packages (the
    project's venv: torch, Lightning, Hydra and the editable project, all lightly needs), and lightly without deps."""
    import sysconfig

    base = getattr(sys, "_base_executable", sys.executable)
    site = sysconfig.get_paths()["purelib"]
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")  # as venv writes itself from Python 3.13 on
    python = venv / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(target, "_contrastive_project.pth").write_text(f"import site; site.addsitedir({site!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"lightly=={LIGHTLY_VERSION}"], check=True)
    print(f"lightly {lightly_version(str(python))} in {venv}; run: python benchmarks/peer.py")
    return 0


# -- the verdicts (no torch, no lightly: tests build them from fabricated figures) -------------------------------
@dataclass
class Pair:
    method: str
    contender: str
    project: list[float]  # final kNN per seed, in seed order
    peer: list[float]
    seeds: list[int]

    @property
    def level(self) -> str:
        return LEVELS[self.contender]


def compare_pairs(pairs: list[Pair], margin: float = MARGIN) -> list[Any]:
    """Per pair, lightly side - project side over the seeds they share (paired t, TOST within ``margin``), with Holm
    over every pair's tests."""
    from contrastive.report.stats import adjust, compare

    comparisons = [
        compare(p.peer, p.project, margin, paired=True, names=(p.contender, "project"), digits=2) for p in pairs
    ]
    adjust(comparisons)
    return comparisons


def verdict(comparison: Any, method: str, contender: str, margin: float = MARGIN) -> str:
    """Equivalent within the margin, a named difference, undecided, or too few seeds."""
    outcome = comparison.outcome
    if comparison.equivalent:  # the question asked: within the margin, even where a smaller gap is also shown
        inside = "" if outcome == "equivalent" else f" (a gap of {comparison.diff:+.2f} inside it)"
        return f"equivalent within ±{margin:g} kNN points{inside}"
    if outcome in ("better", "worse"):
        side = "lightly" if outcome == "better" else "the project"
        known = DIFFERENCES.get((method, contender), [])
        cause = f"; differences by construction: {len(known)} listed below" if known else ""
        return f"different: {side} ahead by {abs(comparison.diff):.2f} points{cause}"
    if outcome == "not enough runs":
        return f"no test ({comparison.n[0]} seed): lightly - project {comparison.diff:+.2f}"
    return f"undecided: not shown within ±{margin:g} nor apart"


# -- the runs -------------------------------------------------------------------------------------------------
def overrides(method: str, seed: int, epochs: int, data_root: str, limit: int = 0) -> list[str]:
    smoke = [f"trainer.limit_train_batches={limit}", f"trainer.limit_val_batches={limit}"] if limit else []
    return smoke + [
        "experiment=compare_cifar10_cpu",
        f"method={method}",
        f"data.root={data_root}",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "perf.threads=1",  # the recipe's side-by-side runs
        "eval.init=false",  # both sides start from the same encoder
        "eval.pixels=false",
        "diagnostics=false",  # dictionary figures the lightly side has no module for
        "eval.shots=[]",  # the verdict reads the final kNN alone
        "eval.linear_epochs=0",
    ]


def compose(method: str, seed: int, epochs: int, data_root: str, limit: int = 0) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from contrastive.config import register_configs

    register_configs()
    with initialize_config_module("contrastive.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides(method, seed, epochs, data_root, limit))
    return OmegaConf.to_container(cfg, resolve=True)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One contender, one seed, through ``contrastive.training.train``; the lightly sides swap in their method."""
    from omegaconf import OmegaConf

    from contrastive import methods, training

    out = Path(job["out"])
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    if out.exists():
        shutil.rmtree(out)  # an interrupted run of this script: start it again
    cfg = OmegaConf.create(job["cfg"])
    if job["contender"] != "project":
        builder = PEERS[(job["method"], job["contender"])]
        opts = job.get("options", {})
        methods.build_method = lambda c, n: builder(c, n, **opts)  # training.build looks it up per call
    start = time.perf_counter()
    summary = training.train(cfg, out)
    summary["peer_wall_s"] = round(time.perf_counter() - start, 1)
    summary["peer_contender"] = job["contender"]
    if job["contender"] != "project":
        import lightly  # optional: the peer venv only

        summary["lightly_version"] = lightly.__version__
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_job(job: dict[str, Any]) -> tuple[str, float | None, str | None]:
    try:
        summary = run_one(job)
        return job["out"], summary.get("knn_acc"), None
    except Exception as error:  # one failed run must not stop the others
        import traceback

        traceback.print_exc()
        return job["out"], None, f"{type(error).__name__}: {error}"


def _child(job: dict[str, Any], results: Any) -> None:
    results.put((os.getpid(), _run_job(job)))


def run_jobs(jobs: list[dict[str, Any]], parallel: int):
    """Yield each job's (folder, kNN, error) as it ends, ``parallel`` at a time, each in a process forked from this
    one (so every run uses the code and configs as they were when the command started); not a Pool, whose daemonic
    workers may not start the pipeline's DataLoader workers."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results, pending, running = ctx.Queue(), list(jobs), []
    while pending or running:
        while pending and len(running) < max(parallel, 1):
            process = ctx.Process(target=_child, args=(pending.pop(0), results), daemon=False)
            process.start()
            running.append(process)
        pid, result = results.get()
        done = next(p for p in running if p.pid == pid)
        done.join()  # it exits right after answering
        running.remove(done)
        yield result


# -- the lightly sides ---------------------------------------------------------------------------------------------
def recipe_head(cfg: Any, feature_dim: int, project_head: Any) -> Any:
    """lightly's ProjectionHead in the recipe's layout (Linear-BN-ReLU ... Linear, no output BN), starting from the
    project's head weights."""
    from lightly.models.modules.heads import ProjectionHead  # optional: the peer venv only
    from torch import nn

    m = cfg.method
    bn = m.get("proj_batch_norm", True)
    blocks, dim = [], feature_dim
    for _ in range(m.proj_layers - 1):
        blocks.append((dim, m.proj_hidden_dim, nn.BatchNorm1d(m.proj_hidden_dim) if bn else None, nn.ReLU()))
        dim = m.proj_hidden_dim
    blocks.append((dim, m.proj_out_dim, None, None))
    return adopt(ProjectionHead(blocks), project_head)


def adopt(head: Any, project_head: Any) -> Any:
    """``head`` with the project head's starting weights (same layout: strict loading refuses any other)."""
    head.layers.load_state_dict(project_head.state_dict(), strict=True)
    return head


def peer_classes():
    """The lightly sides, as subclasses of the project's ContrastiveMethod (its data path, augmentation, probe, kNN
    monitor, optimiser and schedule); lightly is imported inside, when one is built."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from contrastive.methods.base import ContrastiveMethod, StepOutput

    class LightlySimCLR(ContrastiveMethod):
        family, negatives_source = "end-to-end", "batch"

        def __init__(self, cfg, num_train: int):
            super().__init__(cfg, num_train)
            from lightly.loss import NTXentLoss  # optional: the peer venv only

            self.projector = recipe_head(self.cfg, self.feature_dim, self.projector)
            self.criterion = NTXentLoss(temperature=self.cfg.method.temperature)

        def contrastive_loss(self, views, step):
            # lightly's SimCLR example and benchmark: one forward per view
            f0, f1 = self.backbone(views[0]), self.backbone(views[1])
            loss = self.criterion(self.projector(f0), self.projector(f1))
            return StepOutput(loss=loss, features=f0)

    class SplitViews(nn.Module):
        """The loader already made the views ([B, 2, C, H, W], normalised): hand them on as a list."""

        def forward(self, views):
            return [views[:, 0], views[:, 1]]

    class LightlySimCLRPipeline(LightlySimCLR):
        def __init__(self, cfg, num_train: int, workers: int = 1):
            super().__init__(cfg, num_train)
            self.augment, self.workers = SplitViews(), workers

        def setup(self, stage: str) -> None:
            super().setup(stage)
            dm = self.trainer.datamodule
            dm.train_dataloader = lambda: lightly_loader(dm.train_set, self.cfg, self.workers)

    class LightlyMoCo(ContrastiveMethod):
        family, negatives_source = "momentum queue", "queue"

        def __init__(self, cfg, num_train: int):
            super().__init__(cfg, num_train)
            from lightly.loss import NTXentLoss  # optional: the peer venv only
            from lightly.models.utils import deactivate_requires_grad  # optional: the peer venv only

            m = self.cfg.method
            self.projector = recipe_head(self.cfg, self.feature_dim, self.projector)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projector_momentum = copy.deepcopy(self.projector)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projector_momentum)
            # lightly's MoCo: NT-Xent with its MemoryBankModule as the queue of keys
            self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_size, m.proj_out_dim))

        def momentum(self) -> float:
            from lightly.utils.scheduler import cosine_schedule  # optional: the peer venv only

            m = self.cfg.method
            if m.momentum_schedule != "cosine":
                return float(m.momentum)
            total = max(int(self.trainer.estimated_stepping_batches), 2)
            return float(cosine_schedule(self.global_step, total, m.momentum, 1.0))

        @torch.no_grad()
        def keys(self, x):
            from lightly.models.utils import batch_shuffle, batch_unshuffle  # optional: the peer venv only

            shuffled, order = batch_shuffle(x)
            splits = max(1, min(self.cfg.method.bn_splits, len(x) // 2)) if self.cfg.method.shuffle_bn else 1
            keys = torch.cat([self.projector_momentum(self.backbone_momentum(c)) for c in shuffled.chunk(splits)])
            return batch_unshuffle(keys, order)

        def contrastive_loss(self, views, step):
            from lightly.models.utils import update_momentum  # optional: the peer venv only

            m = self.momentum()
            update_momentum(self.backbone, self.backbone_momentum, m)
            update_momentum(self.projector, self.projector_momentum, m)
            f0 = self.backbone(views[0])
            q0 = self.projector(f0)
            loss = self.criterion(q0, self.keys(views[1]))
            if self.cfg.method.symmetric:  # lightly's CIFAR-10 benchmark: 0.5 x (both terms)
                q1 = self.projector(self.backbone(views[1]))
                loss = 0.5 * (loss + self.criterion(q1, self.keys(views[0])))
            return StepOutput(loss=loss, features=f0)

    class LightlySwAV(ContrastiveMethod):
        family, negatives_source = "clustering", "prototypes"

        def __init__(self, cfg, num_train: int, float64: bool = True):
            super().__init__(cfg, num_train)
            from lightly.loss import SwaVLoss  # optional: the peer venv only
            from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes  # optional: the peer venv only

            from contrastive.negatives.prototypes import Prototypes

            m = self.cfg.method
            # the project's starting prototypes, drawn where the project's SwAV draws them: before any lightly module
            with torch.random.fork_rng():
                start = Prototypes(m.proj_out_dim, m.num_prototypes).weight.detach().clone()
            head = SwaVProjectionHead(self.feature_dim, m.proj_hidden_dim, m.proj_out_dim)
            self.projector = adopt(head, self.projector)
            # -1: the whole first epoch, set when the epoch's length is known (on_train_start)
            freeze = max(m.freeze_prototypes_steps, 0)
            self.prototypes = SwaVPrototypes(m.proj_out_dim, m.num_prototypes, n_steps_frozen_prototypes=freeze)
            with torch.no_grad():
                self.prototypes.heads[0].weight.copy_(start)
            self.criterion = SwaVLoss(m.temperature, m.sinkhorn_iterations, m.sinkhorn_epsilon)
            self.float64 = float64

        def on_train_start(self) -> None:
            if self.cfg.method.freeze_prototypes_steps < 0:  # as the project's SwAV counts the first epoch
                trainer = self.trainer
                steps = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
                self.prototypes.n_steps_frozen_prototypes = steps

        def contrastive_loss(self, views, step):
            self.prototypes.normalize()
            feats = [self.backbone(v) for v in views]  # lightly's benchmark: one forward per crop
            z = [F.normalize(self.projector(f), dim=1) for f in feats]
            scores = [self.prototypes(zi, self.global_step) for zi in z]
            if self.float64:  # lightly's exp(scores / epsilon) overflows float32 at epsilon 0.01
                scores = [s.double() for s in scores]
            large = self.cfg.method.num_views
            loss = self.criterion(scores[:large], scores[large:]).float().squeeze()
            return StepOutput(loss=loss, features=feats[0])

    return {
        ("simclr", "lightly"): LightlySimCLR,
        ("simclr", "lightly_pipeline"): LightlySimCLRPipeline,
        ("moco", "lightly"): LightlyMoCo,
        ("swav", "lightly"): LightlySwAV,
    }


def own_key_share(ckpt: str | None, data_root: str, batches: int = 4, seed: int = 0) -> dict[str, float]:
    """lightly #564, measured: the lightly MoCo side (from ``ckpt``, or at initialisation) on augmented training
    batches, its queue first filled with keys of other batches as in training. In lightly's symmetric step the second
    term's queue holds the first term's keys, each query's own key (its view through the momentum encoder) among
    them. Returns the mean softmax probability that term gives the positive and the own key, and the term's loss with
    the own keys among the negatives (lightly) and without them (the project: enqueued after both terms)."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from contrastive.data.datamodule import ContrastiveDataModule

    cfg = OmegaConf.create(compose("moco", seed, 1, data_root))
    torch.manual_seed(seed)
    dm = ContrastiveDataModule(cfg.data, seed=seed)
    dm.setup("fit")
    model = PEERS[("moco", "lightly")](cfg, dm.num_train)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state, strict=False)  # lightly's queue is a non-persistent buffer: refilled below
    m, n = cfg.method, int(cfg.data.batch_size)
    loader = iter(dm.loader(dm.train_set, train=True))
    out = {"p_positive": 0.0, "p_own_key": 0.0, "loss_lightly": 0.0, "loss_project": 0.0}
    with torch.no_grad():
        fill = [model.keys(model.augment(next(loader)[0])[0]) for _ in range(m.queue_size // n)]
        queue = F.normalize(torch.cat(fill), dim=1)
        for _ in range(batches):
            v0, v1 = model.augment(next(loader)[0])
            q1 = F.normalize(model.projector(model.backbone(v1)), dim=1)
            k0, k1 = F.normalize(model.keys(v0), dim=1), F.normalize(model.keys(v1), dim=1)
            pos = (q1 * k0).sum(1, keepdim=True)
            # lightly: the first term wrote k1 over the oldest n entries before the second term read the queue
            lightly_logits = torch.cat([pos, q1 @ k1.T, q1 @ queue[n:].T], 1) / m.temperature
            project_logits = torch.cat([pos, q1 @ queue.T], 1) / m.temperature
            p = lightly_logits.softmax(1)
            target = torch.zeros(n, dtype=torch.long)
            out["p_positive"] += float(p[:, 0].mean()) / batches
            out["p_own_key"] += float(p[:, 1:][torch.arange(n), torch.arange(n)].mean()) / batches
            out["loss_lightly"] += float(F.cross_entropy(lightly_logits, target)) / batches
            out["loss_project"] += float(F.cross_entropy(project_logits, target)) / batches
            queue = torch.cat([queue[n:], k1, k0])[-m.queue_size :]
    return out


class _Peers(dict):
    """The lightly sides, built on first use (they subclass the project's LightningModule)."""

    def __missing__(self, key):
        self.update(peer_classes())
        return dict.__getitem__(self, key)


PEERS = _Peers()


class LightlyViews:
    """Training item i -> (two views [2, C, H, W] from lightly's SimCLRTransform on the PIL image, label, i)."""

    def __init__(self, train_set: Any, transform: Any) -> None:
        self.train_set, self.transform = train_set, transform

    def __len__(self) -> int:
        return len(self.train_set)

    def __getitem__(self, i: int):
        import torch
        from torchvision.transforms.functional import to_pil_image

        image, label, index = self.train_set[i]
        return torch.stack(self.transform(to_pil_image(image))), label, index


def lightly_transform(cfg: Any) -> Any:
    """lightly's SimCLRTransform with the recipe's augmentation settings, as the speed benchmark builds it."""
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)  # the speed benchmark beside this script (not installed)
    sys.modules["bench"] = bench  # its dataclasses look their module up while it loads
    spec.loader.exec_module(bench)
    return bench.lightly_views(cfg)


def lightly_loader(train_set: Any, cfg: Any, workers: int) -> Any:
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        LightlyViews(train_set, lightly_transform(cfg)),
        batch_size=int(cfg.data.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context=mp.get_context("fork") if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )


# -- the report -------------------------------------------------------------------------------------------------
def load_runs(runs: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    found = {}
    for path in sorted(runs.glob("seed*/*/metrics.json")):
        seed = int(path.parent.parent.name.removeprefix("seed"))
        method, contender = path.parent.name.split("-", 1)
        found[(method, contender, seed)] = json.loads(path.read_text())
    return found


def curve(summary: dict[str, Any]) -> list[float]:
    return [r["knn_acc"] for r in summary.get("history", []) if r.get("knn_acc") is not None]


def build_pairs(found: dict[tuple[str, str, int], dict[str, Any]]) -> list[Pair]:
    pairs = []
    for method in METHODS:
        for contender in CONTENDERS[method][1:]:
            seeds = sorted(
                s
                for (m, c, s) in found
                if m == method
                and c == contender
                and (method, "project", s) in found
                and found[(m, c, s)].get("knn_acc") is not None
                and found[(method, "project", s)].get("knn_acc") is not None
            )
            if seeds:
                pairs.append(
                    Pair(
                        method,
                        contender,
                        [found[(method, "project", s)]["knn_acc"] for s in seeds],
                        [found[(method, contender, s)]["knn_acc"] for s in seeds],
                        seeds,
                    )
                )
    return pairs


def fmt_summary(values: list[float]) -> str:
    from contrastive.report.stats import summarize

    s = summarize(values)
    return f"{s.mean:.2f}" if s.half_width is None else f"{s.mean:.2f} ± {s.half_width:.2f}"


def describe_splits(found: dict) -> str:
    """The splits the runs trained and were read on, from their metrics.json (older runs name no split)."""
    runs = list(found.values())
    sizes, final, monitor = (runs[0].get(k) for k in ("split_sizes", "eval_split", "monitor_split"))
    if not sizes or any(r.get("split_sizes") != sizes or r.get("eval_split") != final for r in runs):
        return "8,000 training / 2,000 evaluation images" if not sizes else "splits differing between runs"
    named = " / ".join(f"{n:,} {name}" for name, n in sizes.items())
    return f"{named}; per-epoch kNN on {monitor}, final kNN on {final}"


def report(runs: Path, out: Path, margin: float, command: str) -> str:
    found = load_runs(runs)
    pairs = build_pairs(found)
    comparisons = compare_pairs(pairs, margin) if pairs else []
    epochs = sorted({v.get("epochs") for v in found.values()})
    steps = sorted({v.get("global_steps") for v in found.values()})
    lines = [
        "# Each method against lightly, trained the same way (issue 32)",
        "",
        f"`{command}`, from the runs in `{runs}`: CIFAR-10 CPU benchmark split ({describe_splits(found)} of the "
        f"CIFAR-10 test set), small CNN, batch 128, SGD and the warm-up + cosine schedule of the "
        f"recipe, {epochs} epochs ({steps} optimiser steps) "
        "(shorter than the benchmark's 20; both sides identical). kNN: this project's weighted kNN (k 200, T 0.1) "
        "on the same images for every contender. Verdicts: lightly - project, paired by seed, two "
        f"one-sided tests within ±{margin:g} kNN points at 0.05, Holm over the pairs.",
        "",
        "| method | level | seeds | project kNN | lightly kNN | lightly - project [95% CI] | TOST p (Holm) "
        "| verdict | wall s per run (project / lightly) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    rows = []
    for pair, comp in zip(pairs, comparisons):
        wall = [
            sum(found[(pair.method, c, s)].get("peer_wall_s", 0) for s in pair.seeds) / len(pair.seeds)
            for c in ("project", pair.contender)
        ]
        pe = "-" if comp.pe is None else f"{comp.pe:.3g}"
        text = verdict(comp, pair.method, pair.contender, margin)
        lines.append(
            f"| {pair.method} | {pair.level} | {len(pair.seeds)} | {fmt_summary(pair.project)} | "
            f"{fmt_summary(pair.peer)} | {comp.interval()} | {pe} | {text} | {wall[0]:.0f} / {wall[1]:.0f} |"
        )
        rows.append(
            {
                "method": pair.method,
                "level": pair.level,
                "contender": pair.contender,
                "seeds": pair.seeds,
                "project_knn": pair.project,
                "lightly_knn": pair.peer,
                "diff": comp.diff,
                "low": comp.low,
                "high": comp.high,
                "p_equiv": comp.p_equiv,
                "p_equiv_holm": comp.p_equiv_adjusted,
                "verdict": text,
                "wall_s": wall,
            }
        )
    lines += [
        "",
        "Per-epoch kNN (mean over seeds), the training flow's monitor (a run with `--limit-batches N` monitors on N "
        "batches of each evaluation loader; its final kNN above uses them whole):",
        "",
    ]
    for method in METHODS:
        for contender in CONTENDERS[method]:
            curves = [curve(v) for (m, c, _), v in sorted(found.items()) if m == method and c == contender]
            if curves:
                n = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                lines.append(f"- {method} / {contender}: " + ", ".join(f"{v:.1f}" for v in mean))
    lines += ["", "## Differences by construction (and which side follows the official code)", ""]
    for (method, contender), items in DIFFERENCES.items():
        lines.append(f"**{method}, {LEVELS[contender]}**")
        lines += [f"- {item}" for item in items]
        lines.append("")
    lines += [NO_PEER, ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))
    (out / "peer.json").write_text(
        json.dumps(
            {
                "pairs": rows,
                "runs": {
                    f"{m}/{c}/seed{s}": {
                        "knn_acc": v.get("knn_acc"),
                        "curve": curve(v),
                        "wall_s": v.get("peer_wall_s"),
                        "train_time_s": v.get("train_time_s"),
                        "epochs": v.get("epochs"),
                        "lightly_version": v.get("lightly_version"),
                    }
                    for (m, c, s), v in sorted(found.items())
                },
            },
            indent=2,
        )
    )
    plot(found, out / "curves.png")
    return "\n".join(lines)


def plot(found: dict[tuple[str, str, int], dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(k[0] == m for k in found)]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    colours = {"project": "tab:blue", "lightly": "tab:orange", "lightly_pipeline": "tab:green"}
    for ax, method in zip(axes[0], methods):
        for contender in CONTENDERS[method]:
            runs = [(s, v) for (m, c, s), v in sorted(found.items()) if m == method and c == contender]
            for i, (_seed, summary) in enumerate(runs):
                ys = curve(summary)
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    color=colours[contender],
                    alpha=0.8,
                    marker="o",
                    markersize=3,
                    label=contender if i == 0 else None,
                )
        ax.set_title(method)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command --------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each one torch thread)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "peer"), help="run folders (kept: a rerun skips finished)")
    p.add_argument("--out", default=str(ROOT / "results" / "peer"))
    p.add_argument("--margin", type=float, default=MARGIN)
    p.add_argument("--loader-workers", type=int, default=1, help="lightly_pipeline's DataLoader workers")
    p.add_argument("--swav-float32", action="store_true", help="lightly's Sinkhorn on float32 scores, as it is")
    p.add_argument("--lightly", default=LIGHTLY_PYTHON, help="the Python with lightly (default: .venv-lightly)")
    p.add_argument("--limit-batches", type=int, default=0, help="smoke test: this many batches per epoch")
    p.add_argument("--own-key", metavar="CKPT|init", help="measure lightly #564 on the lightly MoCo side and exit")
    p.add_argument("--install-lightly", action="store_true", help="make .venv-lightly and exit")
    p.add_argument("--report-only", action="store_true", help="table and plot from the finished runs")
    return p.parse_args(argv)


def jobs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} has no peer here; choose from {', '.join(METHODS)}")
    jobs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in methods:
            # composed once, here: later edits of conf/ cannot reach a run that starts later
            cfg = compose(method, seed, args.epochs, args.data_root, args.limit_batches)
            for contender in CONTENDERS[method]:
                options = {}
                if contender == "lightly_pipeline":
                    options["workers"] = args.loader_workers
                if method == "swav" and contender == "lightly":
                    options["float64"] = not args.swav_float32
                out = Path(args.runs) / f"seed{seed}" / f"{method}-{contender}"
                jobs.append({"method": method, "contender": contender, "cfg": cfg, "out": str(out), "options": options})
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.install_lightly:
        return install_lightly(PEER_VENV)
    command = "python benchmarks/peer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        print(report(Path(args.runs), Path(args.out), args.margin, command))
        return 0
    if not here_has_lightly():
        if os.environ.get(REEXEC_FLAG) is None and lightly_version(args.lightly):
            os.environ[REEXEC_FLAG] = "1"
            os.execv(args.lightly, [args.lightly, str(Path(__file__).resolve()), *sys.argv[1:]])
        print(how_to_get_lightly(args.lightly), file=sys.stderr)
        return MISSING_LIGHTLY
    if args.own_key:
        share = own_key_share(None if args.own_key == "init" else args.own_key, args.data_root)
        print(json.dumps({k: round(v, 4) for k, v in share.items()}))
        return 0
    jobs = jobs_for(args)
    start = time.perf_counter()
    print(f"{len(jobs)} runs, {args.jobs} at a time, into {args.runs}", flush=True)
    for out, knn, error in run_jobs(jobs, args.jobs):
        minutes = (time.perf_counter() - start) / 60
        print(f"[{minutes:5.1f} min] {out}: " + (f"kNN {knn:.2f}" if error is None else f"FAILED {error}"), flush=True)
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    print(report(Path(args.runs), Path(args.out), args.margin, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
