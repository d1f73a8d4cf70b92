"""One step on 2 processes (gloo) equals one step on 1 process holding the whole global batch, for every method.

Each rank calls the module's ``contrastive_loss`` on its half of fixed, pre-augmented views (no augmentation
randomness), backpropagates, and averages its gradients over the ranks as DDP does. Loss, gradients, features and
every buffer (bank, queue, NCE normaliser) must match the single-process step on the same 2B samples.

BatchNorm choice: the models run in ``eval()`` mode, so BN normalises with its fixed running statistics and each
sample's output does not depend on which other samples share its batch. In training mode BN over a local batch of B
and over 2B legitimately differ, which would hide the collectives under a BN discrepancy. The same choice makes MoCo's
shuffle-BN invisible to the outputs, so ``shuffle_bn=true`` must also give equal keys: the cross-process shuffle and
the one-process split shuffle both have to return keys in sample order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import fixed_bank_encoder, make_cfg
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

from contrastive import distributed as dist
from contrastive.launch import SpawnDDPStrategy, build_strategy
from contrastive.methods import build_method
from contrastive.methods.swav import SwAV

WORLD = 2
B = 4  # samples per process; the global batch is WORLD * B
NUM_TRAIN = 64
STEP_SEED = 7
SWAV_QUEUE = 8  # per process

# name -> (overrides for every run, extra overrides for the one-process reference)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "simclr": (["method=simclr"], []),
    "memory_bank": (["method=memory_bank", "method.num_negatives=16"], []),
    "memory_bank_nce": (["method=memory_bank", "method.num_negatives=16", "method.loss=nce"], []),
    "memory_bank_2views": (["method=memory_bank", "method.num_views=2"], []),
    "moco": (["method=moco", "method.queue_size=16", "method.shuffle_bn=false"], []),
    "moco_shuffle_bn": (["method=moco", "method.queue_size=16", "method.shuffle_bn=true", "method.bn_splits=2"], []),
    "moco_symmetric": (["method=moco", "method.queue_size=16", "method.shuffle_bn=false", "method.symmetric=true"], []),
    "moco_batch_negatives": (["method=moco", "method.negatives=batch", "method.shuffle_bn=false"], []),
    "swav": (["method=swav", "method.num_prototypes=8"], []),
    # the SwAV queue is per process: 2 queues of Q hold what one process's queue of 2Q holds
    "swav_queue": (
        ["method=swav", "method.num_prototypes=8", f"method.feature_queue_size={SWAV_QUEUE}"],
        [f"method.feature_queue_size={WORLD * SWAV_QUEUE}"],
    ),
}


BANK_INIT = ["method=memory_bank", "method.bank_init=encoder", "data.size=96"]


def compose_container(overrides: list[str]) -> dict:
    return OmegaConf.to_container(make_cfg(overrides), resolve=True)


def make_inputs(container: dict, seed: int) -> dict[str, object]:
    """Fixed views of the global batch: ``num_views`` large and ``num_small_views`` small crops."""
    gen = torch.Generator().manual_seed(seed)
    m, data = container["method"], container["data"]
    n = WORLD * B
    sizes = [data["image_size"]] * m["num_views"] + [data["small_size"]] * m.get("num_small_views", 0)
    views = [torch.randn(n, data["channels"], s, s, generator=gen) for s in sizes]
    index = torch.randperm(NUM_TRAIN, generator=gen)[:n]
    labels = torch.randint(data["num_classes"], (n,), generator=gen)
    queue = torch.nn.functional.normalize(
        torch.randn(m["num_views"], WORLD * SWAV_QUEUE, m["proj_out_dim"], generator=gen), dim=2
    )
    return {"views": views, "index": index, "labels": labels, "swav_queue": queue}


def one_step(container: dict, inputs: dict, rank: int = 0, world: int = 1) -> dict[str, object]:
    """Build the model (same seed everywhere), run ``contrastive_loss`` on this rank's slice and backpropagate.
    With ``world > 1`` the loss and the gradients are averaged over ranks, as DDP averages gradients."""
    torch.manual_seed(0)
    model = build_method(OmegaConf.create(container), NUM_TRAIN)
    model.eval()  # BN on fixed statistics: see the module docstring
    n = len(inputs["index"]) // world
    local = slice(rank * n, (rank + 1) * n)
    if isinstance(model, SwAV) and model.prototypes.queue is not None:
        size = model.prototypes.queue.size
        model.prototypes.queue.features.copy_(inputs["swav_queue"][:, rank * size : (rank + 1) * size])
        model.prototypes.queue.filled.fill_(size)
        model.prototypes.queue._host = None
    # each rank its own global stream, as in training: the bank's negatives must not depend on it
    torch.manual_seed(STEP_SEED + rank)
    out = model.contrastive_loss(
        [v[local] for v in inputs["views"]], model.step_context(inputs["index"][local], inputs["labels"][local])
    )
    out.loss.backward()
    loss = out.loss.detach().clone()
    grads = {name: p.grad.clone() for name, p in sorted(model.named_parameters()) if p.grad is not None}
    if world > 1:
        tdist.all_reduce(loss)
        loss /= world
        for g in grads.values():
            tdist.all_reduce(g)
            g /= world
    return {
        "loss": loss,
        "grads": grads,
        "features": out.features.detach().clone(),
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "no_grad": sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None),
    }


def shuffle_roundtrip(rank: int) -> dict[str, torch.Tensor]:
    """Shuffle-BN's collectives on the global batch ``0 .. 2B-1`` (one row per sample, value = sample id)."""
    torch.manual_seed(100 + rank)  # different seeds: the permutation must still be the same on every rank
    x = torch.arange(WORLD * B, dtype=torch.float64).repeat(3, 1).T[rank * B : (rank + 1) * B].contiguous()
    shuffled, perm = dist.shuffle_across_processes(x)
    return {
        "x": x,
        "shuffled": shuffled,
        "perm": perm,
        "restored": dist.unshuffle_across_processes(shuffled, perm),
        "keys": dist.unshuffle_across_processes(shuffled * 2 + 1, perm),  # a per-sample "encoder"
    }


def augment_draw(container: dict) -> list[torch.Tensor]:
    """The views of one fixed batch after seeding as training does (``seed_process_streams``)."""
    from contrastive.data.augment import build_augment

    cfg = OmegaConf.create(container)
    images = torch.arange(WORLD * B * cfg.data.channels * cfg.data.image_size**2, dtype=torch.uint8)
    images = images.view(WORLD * B, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    dist.seed_process_streams(cfg.seed)
    return build_augment(cfg.augment, cfg.data, 2)(images)


def bank_fill(container: dict) -> dict[str, torch.Tensor]:
    """``method.bank_init=encoder``'s pass over the training set, with a fixed per-image augmentation and key
    encoder, so that 1 and 2 processes must write the same bank."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision

    from contrastive.data.datamodule import ContrastiveDataModule

    cfg = OmegaConf.create(container)
    dm = ContrastiveDataModule(cfg.data)
    dm.setup("fit")
    model = build_method(cfg, dm.num_train)
    fixed_bank_encoder(model)
    model._trainer = SimpleNamespace(datamodule=dm, precision_plugin=Precision())
    model.encode_bank(model.negatives)
    return {"features": model.negatives.bank.features.clone(), "written": model.negatives.bank.written_at.clone()}


def _rank_main(rank: int, store: str, containers: dict, inputs: dict, out: str) -> None:
    # first of all: a forked child that inherits the parent's OpenMP pool hangs in its first parallel region
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {name: one_step(containers[name], inputs[name], rank, WORLD) for name in inputs}
        results["shuffle"] = shuffle_roundtrip(rank)
        results["augment"] = augment_draw(containers["simclr"])
        results["bank_fill"] = bank_fill(containers["bank_init"])
        results["world_size"] = dist.world_size()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """All cases in one pair of processes, then the one-process references. Forked rather than spawned: a spawned
    child re-imports torch, Lightning and the package, which costs more than all the cases together."""
    tmp = tmp_path_factory.mktemp("ddp")
    distributed = {name: compose_container([f"data.batch_size={B}", *over]) for name, (over, _) in CASES.items()}
    single = {
        name: compose_container([f"data.batch_size={WORLD * B}", *over, *extra])
        for name, (over, extra) in CASES.items()
    }
    inputs = {name: make_inputs(distributed[name], seed=i) for i, name in enumerate(CASES)}
    # an odd training set (77 images): the two shards wrap around to equal lengths
    bank_init = compose_container([f"data.batch_size={B}", *BANK_INIT])
    mp.start_processes(
        _rank_main,
        args=(str(tmp / "store"), {**distributed, "bank_init": bank_init}, inputs, str(tmp)),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert not dist.is_distributed()
    reference = {name: one_step(single[name], inputs[name]) for name in CASES}
    return {
        "ranks": ranks,
        "single": reference,
        "inputs": inputs,
        "augment": augment_draw(distributed["simclr"]),
        "bank_fill": bank_fill(bank_init),
    }


def test_each_process_draws_its_own_augmentations(runs):
    """Same images, same seed: rank 1's views differ from rank 0's, and rank 0 draws what one process draws."""
    (a0, a1), (b0, b1) = runs["ranks"][0]["augment"], runs["ranks"][1]["augment"]
    assert (a0 - b0).abs().max() > 0.1 and (a1 - b1).abs().max() > 0.1
    for got, want in zip(runs["ranks"][0]["augment"], runs["augment"], strict=True):
        assert torch.equal(got, want)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_match_one_process(runs, name):
    single, ranks = runs["single"][name], [r[name] for r in runs["ranks"]]
    assert all(r["world_size"] == WORLD for r in runs["ranks"])
    assert single["grads"], "the step produced no gradient"
    for r in ranks:
        close(r["loss"], single["loss"])
        assert r["grads"].keys() == single["grads"].keys()
        assert r["no_grad"] == single["no_grad"]
        for key, grad in single["grads"].items():
            close(r["grads"][key], grad)
    assert any(g.abs().max() > 1e-4 for g in single["grads"].values())  # a vacuous all-zero match would pass


@pytest.mark.parametrize("name", list(CASES))
def test_features_come_back_in_sample_order(runs, name):
    single, ranks = runs["single"][name], [r[name] for r in runs["ranks"]]
    close(torch.cat([r["features"] for r in ranks]), single["features"])


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("swav")])
def test_banks_and_queues_identical_on_every_rank_and_equal_to_one_process(runs, name):
    single, ranks = runs["single"][name], [r[name] for r in runs["ranks"]]
    stateful = [k for k in single["buffers"] if k.startswith("negatives.")]
    assert bool(stateful) == (not name.endswith("batch_negatives") and name != "simclr")
    for key, want in single["buffers"].items():
        for r in ranks:
            got = r["buffers"][key]
            assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True), key
    if "negatives.queue.keys" in single["buffers"]:
        # the step enqueued the whole global batch in sample order (rank 0's keys, then rank 1's)
        assert int(single["buffers"]["negatives.queue.ptr"]) == WORLD * B
        assert torch.equal(single["buffers"]["negatives.queue.index"][: WORLD * B], runs["inputs"][name]["index"])
    if "negatives.bank.written_at" in single["buffers"]:
        assert int((single["buffers"]["negatives.bank.written_at"] >= 0).sum()) == WORLD * B


def test_bank_init_pass_fills_the_same_bank_on_every_rank_as_one_process(runs):
    single = runs["bank_fill"]
    assert len(single["written"]) % WORLD == 1 and (single["written"] == 0).all()
    for rank in runs["ranks"]:
        # the products differ in batch shape: equal to rounding
        torch.testing.assert_close(rank["bank_fill"]["features"], single["features"], rtol=1e-5, atol=1e-6)
        assert torch.equal(rank["bank_fill"]["written"], single["written"])


def test_swav_per_process_queue_holds_that_process_embeddings(runs):
    """Each rank enqueues its own large-crop embeddings; together they are what one process enqueues."""
    single, ranks = runs["single"]["swav_queue"], [r["swav_queue"] for r in runs["ranks"]]
    new_single = single["buffers"]["prototypes.queue.features"][:, : WORLD * B]
    for rank, r in enumerate(ranks):
        queue = r["buffers"]["prototypes.queue.features"]
        close(queue[:, :B], new_single[:, rank * B : (rank + 1) * B])
        assert int(r["buffers"]["prototypes.queue.ptr"]) == B
    assert not torch.allclose(
        ranks[0]["buffers"]["prototypes.queue.features"][:, :B], ranks[1]["buffers"]["prototypes.queue.features"][:, :B]
    )


def test_shuffle_across_processes_round_trips_in_sample_order(runs):
    parts = [r["shuffle"] for r in runs["ranks"]]
    perm = parts[0]["perm"]
    assert torch.equal(perm, parts[1]["perm"])  # drawn on rank 0, broadcast: not each rank's own seed
    assert torch.equal(perm.sort().values, torch.arange(WORLD * B))
    ids = torch.cat([p["shuffled"][:, 0] for p in parts]).long()
    assert torch.equal(ids, perm)  # each rank holds its slice of the globally permuted batch
    assert set(ids[:B].tolist()) != set(range(B))  # samples did move between processes
    for p in parts:
        assert torch.equal(p["restored"], p["x"])
        assert torch.equal(p["keys"], p["x"] * 2 + 1)


@pytest.mark.parametrize(
    ("name", "start", "unused"),
    [
        ("ddp", "popen", False),
        ("ddp_spawn", "spawn", False),
        ("ddp_fork", "fork", False),
        ("ddp_notebook", "fork", False),
        ("ddp_find_unused_parameters_true", "popen", True),
        ("ddp_spawn_find_unused_parameters_true", "spawn", True),
    ],
)
def test_build_strategy_never_broadcasts_buffers(cfg_factory, name, start, unused):
    """DDP would otherwise copy rank 0's buffers (queue, bank, SwAV's per-process queue) to every rank each step."""
    cfg = cfg_factory(f"trainer.strategy={name}", "trainer.devices=2", "trainer.accelerator=cpu")
    strategy = build_strategy(cfg)
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == start
    assert strategy._ddp_kwargs["broadcast_buffers"] is False
    assert strategy._ddp_kwargs.get("find_unused_parameters", False) is unused
    assert isinstance(strategy, SpawnDDPStrategy) == (start != "popen")  # results come back to the main process


def test_other_strategies_pass_through(cfg_factory):
    assert build_strategy(cfg_factory("trainer.strategy=auto")) == "auto"


FAST_CLI = [
    "data=synthetic",
    "data.size=128",
    "data.batch_size=16",
    "backbone.width=8",
    "method.proj_hidden_dim=32",
    "method.proj_out_dim=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "eval.linear_epochs=0",
    "eval.fewshot_seeds=1",
    "eval.init=false",
    "eval.pixels=false",
    "logger=csv",
]


@pytest.mark.parametrize("method", ["simclr", "memory_bank", "moco", "swav"])
def test_cli_two_processes_ddp_spawn(tmp_path, method):
    extra = {"moco": ["method.queue_size=64"], "swav": ["method.num_prototypes=10"]}.get(method, [])
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        f"method={method}",
        *FAST_CLI,
        *extra,
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp_spawn",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = list(tmp_path.rglob("metrics.json"))
    assert found == [tmp_path / "metrics.json"]
    metrics = json.loads(found[0].read_text())
    assert metrics["method"] == method and metrics["global_batch_size"] == 32
    assert metrics["epochs"] == 1 and metrics["global_steps"] == 2  # the workers' progress reached the main process
    assert len(metrics["history"]) == 1 and metrics["images_per_sec"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
