"""The 2x3 design space of instance discrimination: ``method.key_encoder`` (shared|momentum) x ``method.negatives``
(batch|bank|queue). Each cell's loss against a loop over its positives and negatives, its dictionary update, a
short training run of every cell, one from the CLI, and MoCo at m = 0 keeping the key encoder equal to the query
encoder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import CONF_DIR, REPO, make_cfg

from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.distributed import step_generator
from contrastive.methods import build_method
from contrastive.train import train
from contrastive.validate import validate, validate_with_data

BATCH, QUEUE, BANK_K = 16, 64, 20
TINY = [
    "data.size=128",
    f"data.batch_size={BATCH}",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "eval.init=false",
    "eval.pixels=false",
    "eval.final=false",
    "method.probe_size=32",
]
# The cells as the README's "The design space" selects them (a preset, then an axis overridden where needed).
CELLS = {
    ("shared", "batch"): ["method=simclr"],
    ("shared", "bank"): ["method=memory_bank"],
    ("shared", "queue"): ["method=moco", "method.key_encoder=shared"],
    ("momentum", "batch"): ["method=moco", "method.negatives=batch"],
    ("momentum", "bank"): ["method=moco", "method.negatives=bank"],
    ("momentum", "queue"): ["method=moco"],
}
SIZES = [f"method.queue_size={QUEUE}", f"method.num_negatives={BANK_K}"]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def loop_info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], t: float) -> float:
    """-log softmax of the positive among [positive, negatives], one query at a time, averaged."""
    total = 0.0
    for q, p, negs in zip(query.tolist(), positive.tolist(), negatives):
        logits = [cosine(q, p) / t] + [cosine(q, n) / t for n in negs.tolist()]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(query)


@pytest.mark.parametrize("cell", list(CELLS), ids=lambda c: "+".join(c))
def test_cell_loss_and_dictionary_update(cell):
    """One loss step outside the Trainer: the loss equals a loop over the cell's own positives and negatives,
    gradient reaches the key view only with a shared encoder, and the bank/queue is written as the papers say."""
    key_encoder, negatives = cell
    # eval mode and no shuffle-BN: keys are a plain function of the images, so the loop can recompute them
    cfg = make_cfg([*CELLS[cell], *SIZES, "method.shuffle_bn=false", "method.num_views=2", "method.symmetric=false"])
    torch.manual_seed(0)
    model = build_method(cfg, num_train=100).eval()
    assert (model.cfg.method.key_encoder, model.cfg.method.negatives) == cell
    assert (model.key_encoder is not None) == (key_encoder == "momentum")
    if key_encoder == "momentum":  # a key encoder that differs from the query encoder, as after some training
        with torch.no_grad():
            for p in [*model.key_encoder.backbone.parameters(), *model.key_encoder.projector.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
    n, t = 8, cfg.method.temperature
    x1, x2 = (torch.randn(n, 1, 16, 16, requires_grad=True) for _ in range(2))
    index = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    labels = torch.zeros(n, dtype=torch.long)
    if negatives == "queue":  # fill half the queue, so that entries written now and before are both seen
        model.negatives.queue.enqueue(torch.randn(QUEUE // 2, cfg.method.proj_out_dim), torch.arange(QUEUE // 2), 0)
        queue_before, ptr = model.negatives.queue.keys.clone(), int(model.negatives.queue.ptr)
    if negatives == "bank":
        bank_before = model.negatives.bank.features.clone()

    torch.manual_seed(1)
    loss = model.contrastive_loss([x1, x2], model.step_context(index, labels)).loss
    loss.backward()

    with torch.no_grad():
        q1, q2 = (model.projector(model.backbone(x)) for x in (x1, x2))
        key_net = (
            (lambda x: model.key_encoder.projector(model.key_encoder.backbone(x)))
            if key_encoder == "momentum"
            else (lambda x: model.projector(model.backbone(x)))
        )
        k1, k2 = key_net(x1), key_net(x2)
    if negatives == "batch":
        if key_encoder == "shared":  # NT-Xent: each of the 2N views against the other 2N - 2
            views = torch.cat([q1, q2])
            pos = torch.cat([q2, q1])
            negs = [views[[j for j in range(2 * n) if j not in (r, (r + n) % (2 * n))]] for r in range(2 * n)]
            expected = loop_info_nce(views, pos, negs, t)
        else:  # MoCo v3: each query against the keys of the batch, both directions
            expected = (
                loop_info_nce(q1, k2, [k2[[j for j in range(n) if j != r]] for r in range(n)], t)
                + loop_info_nce(q2, k1, [k1[[j for j in range(n) if j != r]] for r in range(n)], t)
            ) / 2
    elif negatives == "queue":  # the queue as it was before this batch, whole
        expected = loop_info_nce(q1, k2, [queue_before] * n, t)
    else:  # K bank entries per query, drawn uniformly, never the sample's own
        drawn = model.negatives.bank.sample_indices(index, BANK_K, step_generator(model.cfg.seed, 0, "cpu"))
        assert not (drawn == index[:, None]).any()
        expected = loop_info_nce(q1, k2, [bank_before[row] for row in drawn], t)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-4)

    # shared: the key view is encoded with gradient; momentum: keys come from a frozen copy (batch: view 2 is
    # also a query, so it has a gradient in either case)
    view2_has_grad = x2.grad is not None and bool(x2.grad.abs().sum() > 0)
    assert view2_has_grad == (key_encoder == "shared" or negatives == "batch")
    if key_encoder == "momentum":
        assert all(p.grad is None for p in model.key_encoder.backbone.parameters())

    if negatives == "queue":  # the new keys (view 2) replace the oldest entries; the rest are untouched
        written = slice(ptr, ptr + n)
        assert torch.allclose(model.negatives.queue.keys[written], F.normalize(k2, dim=1), atol=1e-6)
        rest = torch.ones(QUEUE, dtype=torch.bool)
        rest[written] = False
        assert torch.equal(model.negatives.queue.keys[rest], queue_before[rest])
        assert torch.equal(model.negatives.queue.index[written], index) and int(model.negatives.queue.ptr) == ptr + n
    if negatives == "bank":  # v <- normalize(m v + (1 - m) normalize(f)), f the first view's key
        m = cfg.method.bank_momentum
        mixed = F.normalize(m * bank_before[index] + (1 - m) * F.normalize(k1, dim=1), dim=1)
        assert torch.allclose(model.negatives.bank.features[index], mixed, atol=1e-6)
        others = torch.ones(100, dtype=torch.bool)
        others[index] = False
        assert torch.equal(model.negatives.bank.features[others], bank_before[others])


@pytest.mark.parametrize("cell", list(CELLS), ids=lambda c: "+".join(c))
def test_cell_trains(cell, cfg_factory, tmp_path):
    """Every cell trains a few steps: finite loss, and the summary and checkpoint hold its dictionary."""
    key_encoder, negatives = cell
    summary = train(cfg_factory(*CELLS[cell], *SIZES, *TINY))
    assert (summary["key_encoder"], summary["negatives"]) == cell
    losses = [record["loss"] for record in summary["history"]] + [summary["final_loss"]]
    assert all(math.isfinite(v) for v in losses)
    assert 0 <= summary["false_negative_rate"] <= 1  # a queue that starts empty must not make it NaN
    expected_negatives = {
        "batch": 2 * BATCH - 2 if key_encoder == "shared" else BATCH - 1,
        "bank": BANK_K,
        "queue": QUEUE,
    }[negatives]
    assert summary["negatives_per_query"] == expected_negatives
    assert (
        summary["dictionary_size"]
        == {"batch": 2 * BATCH if key_encoder == "shared" else BATCH, "bank": 102, "queue": QUEUE}[negatives]
    )

    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("key_encoder.backbone.") for k in state) == (key_encoder == "momentum")
    assert ("negatives.bank.features" in state) == (negatives == "bank")
    assert ("negatives.queue.keys" in state) == (negatives == "queue")
    steps = summary["global_steps"]
    assert steps == 3
    if negatives == "bank":
        # the encoder start wrote every entry at step 0; each later step its batch's, distinct within the epoch
        assert int((state["negatives.bank.written_at"] >= 0).sum()) == 102
        assert int((state["negatives.bank.written_at"] >= 1).sum()) == (steps - 1) * BATCH
    if negatives == "queue":
        assert int(state["negatives.queue.ptr"]) == steps * BATCH % QUEUE
        assert int((state["negatives.queue.index"] >= 0).sum()) == min(steps * BATCH, QUEUE)


def test_cli_momentum_encoder_with_memory_bank(tmp_path):
    """The off-diagonal cell from the command line: MoCo's key encoder writing an InstDisc memory bank."""
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "method=moco",
        "method.negatives=bank",
        "data=synthetic",
        *TINY,
        "backbone.width=8",
        "method.proj_hidden_dim=32",
        "method.proj_out_dim=16",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["method"] == "moco"
    assert (summary["key_encoder"], summary["negatives"]) == ("momentum", "bank")
    assert summary["negatives_per_query"] == 101  # default: the whole bank but the sample itself (102 images)
    assert math.isfinite(summary["final_loss"])


def tensors(modules: tuple[torch.nn.Module, ...], kind: str) -> list[torch.Tensor]:
    """Copies of the modules' parameters (``kind="parameters"``) or buffers (``kind="buffers"``)."""
    return [t.detach().clone() for module in modules for t in getattr(module, kind)()]


class EncoderRecorder(L.Callback):
    """Query and key encoder weights at the start of every training step and at the end of training."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[list[torch.Tensor], ...]] = []

    def _record(self, module) -> None:
        query, key = (module.backbone, module.projector), (module.key_encoder.backbone, module.key_encoder.projector)
        self.snapshots.append(
            (
                tensors(query, "parameters"),
                tensors(key, "parameters"),
                tensors(query, "buffers"),
                tensors(key, "buffers"),
            )
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module)


def fit_moco(momentum: float, steps: int = 4) -> EncoderRecorder:
    cfg = make_cfg(
        [
            "method=moco",
            f"method.momentum={momentum}",
            "method.momentum_schedule=constant",
            f"method.queue_size={QUEUE}",
            *TINY,
        ]
    )
    dm = ContrastiveDataModule(cfg.data)
    model = build_method(cfg, dm.num_train)
    recorder = EncoderRecorder()
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    return recorder


def test_moco_momentum_zero_copies_the_query_encoder():
    """``method=moco method.momentum=0``: after every step the key encoder is exactly the query encoder
    (MoCo's m = 0 ablation), while the query encoder does change from step to step."""
    snapshots = fit_moco(0.0).snapshots
    assert len(snapshots) == 5  # 4 step starts + the end
    for query, key, _, _ in snapshots:
        assert all(torch.equal(q, k) for q, k in zip(query, key))
    # parameters only, as MoCo's builder.py: BN running statistics are each encoder's own (see test_moco.py)
    query_buffers, key_buffers = snapshots[-1][2:]
    assert any(not torch.equal(q, k) for q, k in zip(query_buffers, key_buffers))
    for (before, *_), (after, *_) in pairwise(snapshots):
        assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_momentum_update_is_an_ema_of_the_query_encoder():
    """theta_k <- m theta_k + (1 - m) theta_q after each step, with theta_q the weights the step produced."""
    m = 0.9
    snapshots = fit_moco(m, steps=3).snapshots
    for (_, key_before, _, _), (query_after, key_after, _, _) in pairwise(snapshots):
        for kb, qa, ka in zip(key_before, query_after, key_after):
            assert torch.allclose(ka, m * kb + (1 - m) * qa, atol=1e-6)
    assert any(not torch.equal(q, k) for q, k in zip(snapshots[-1][0], snapshots[-1][1]))


def test_readme_names_the_overrides_tested_here():
    """The README's design-space table selects each cell with the overrides the tests above train."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The design space", 1)[1].split("\n## ", 1)[0]
    for overrides in CELLS.values():
        assert f"`{' '.join(overrides)}`" in section
    assert "`method=moco method.momentum=0 method.momentum_schedule=constant`" in section


def test_negatives_sweep_runs_exactly_the_intended_grid():
    """experiment=negatives_sweep sweeps the `experiment/nsweep` bundles: every file once, each a valid run on the
    MNIST test split with the same backbone and epochs, at the K of the MoCo paper's Figure 3 for its mechanism."""
    experiment = yaml.safe_load((Path(CONF_DIR) / "experiment" / "negatives_sweep.yaml").read_text())
    options = experiment["hydra"]["sweeper"]["params"]["+experiment/nsweep"].split(",")
    assert sorted(options) == sorted(p.stem for p in (Path(CONF_DIR) / "experiment" / "nsweep").glob("*.yaml"))
    negatives: dict[str, list[int]] = {}
    for option in options:
        cfg = make_cfg(["experiment=negatives_sweep", f"+experiment/nsweep={option}"], fast=False)
        validate(cfg)
        validate_with_data(cfg, num_train=8000)
        assert (cfg.data.name, cfg.data.subset, cfg.backbone.name) == ("mnist", "test_split", "small_cnn")
        assert cfg.trainer.max_epochs == experiment["trainer"]["max_epochs"]
        m = cfg.method
        k = {"batch": 2 * cfg.data.batch_size - 2, "bank": m.get("num_negatives"), "queue": m.get("queue_size")}
        negatives.setdefault(m.name, []).append(k[m.negatives])
        if m.name != "simclr":
            assert cfg.data.batch_size == 64
    assert negatives == {"simclr": [62, 254, 1022], "memory_bank": [64, 256, 1024, 4096], "moco": [64, 256, 1024, 4096]}


def test_compare_mnist_runs_the_four_methods_on_one_backbone_and_budget():
    """experiment=compare_mnist sweeps every method preset (the four) once each, on the same data, backbone, batch,
    epochs and optimiser."""
    experiment = yaml.safe_load((Path(CONF_DIR) / "experiment" / "compare_mnist.yaml").read_text())
    assert experiment["hydra"]["sweeper"]["params"]["method"] == "glob(*)"
    options = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
    assert options == ["memory_bank", "moco", "simclr", "swav"]
    shared, lrs = set(), {}
    for option in options:
        cfg = make_cfg(["experiment=compare_mnist", f"method={option}"], fast=False)
        validate(cfg)
        validate_with_data(cfg, num_train=8000)
        assert cfg.method.name == option
        shared.add(
            (
                cfg.data.name,
                cfg.data.subset,
                cfg.backbone.name,
                cfg.backbone.pool_size,
                cfg.backbone.fc_dim,
                cfg.data.batch_size,
                cfg.trainer.max_epochs,
            )
        )
        lrs[option] = cfg.optim.lr
    assert shared == {("mnist", "test_split", "small_cnn", 3, 512, 64, experiment["trainer"]["max_epochs"])}
    assert lrs == {"simclr": 0.3, "moco": 0.3, "swav": 0.3, "memory_bank": 0.3}
