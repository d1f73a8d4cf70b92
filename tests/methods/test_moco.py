"""MoCo inside the method: the momentum (EMA) update, the queue's FIFO order and its state at loss time, the
symmetric loss, shuffle-BN, checkpoint and resume of the queue, config checks and presets, staleness."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import build, fit, make_cfg, spy
from lightning.pytorch.callbacks import Callback

from contrastive import losses
from contrastive.errors import ConfigError
from contrastive.methods import build_method
from contrastive.methods.moco import MoCo
from contrastive.models.key_encoder import cosine_ramp
from contrastive.negatives import Queue
from contrastive.train import train
from contrastive.validate import validate

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

MOCO = ["method=moco"]
SMALL = ["data.size=96"]  # 76 training images: 2 steps of 32 (4 of 16) per epoch


def key_pairs(model: MoCo) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, query parameter, key parameter) over backbone and projector, matched by name."""
    params = dict(model.named_parameters())
    pairs = []
    for name, key in params.items():
        if name.startswith("key_encoder."):
            pairs.append((name, params[name.removeprefix("key_encoder.")], key))
    return pairs


def direct_info_nce(q: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """-log softmax of the positive among [positive | shared negatives], written as a loop over queries."""
    q, positive, negatives = F.normalize(q, dim=1), F.normalize(positive, dim=1), F.normalize(negatives, dim=1)
    terms = []
    for i in range(len(q)):
        logits = torch.cat([(q[i] * positive[i]).sum().view(1), negatives @ q[i]]) / t
        terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms).mean()


# -- momentum encoder ------------------------------------------------------------------------------------------
def test_key_encoder_is_ema_of_query_encoder_after_the_optimizer_step(cfg_factory):
    torch.manual_seed(0)
    cfg = cfg_factory(
        *MOCO,
        *SMALL,
        "method.momentum=0.9",
        "method.momentum_schedule=constant",
        "optim.lr=2.0",
        "optim.warmup_epochs=0",
    )
    model, dm = build(cfg)
    pairs = key_pairs(model)
    names = {name for name, _, _ in pairs}
    query_names = {f"key_encoder.{n}" for n, _ in model.named_parameters() if n.startswith(("backbone.", "projector."))}
    assert names == query_names and any("projector" in n for n in names)
    with torch.no_grad():  # a key encoder that differs from the query encoder, so every term of the rule shows
        for _, _, key in pairs:
            key.add_(0.1 * torch.randn_like(key))
    key_before = {name: key.clone() for name, _, key in pairs}
    query_before = {name: query.clone() for name, query, _ in pairs}

    trainer = fit(model, dm, max_steps=1, limit_val_batches=0)
    assert trainer.global_step == 1
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    moved = 0
    for name, query, key in key_pairs(model):
        assert not key.requires_grad and key.grad is None and id(key) not in optimised, name
        expected = 0.9 * key_before[name] + 0.1 * query.detach()
        torch.testing.assert_close(key, expected, rtol=1e-5, atol=1e-6, msg=name)
        stale = 0.9 * key_before[name] + 0.1 * query_before[name]
        moved += not torch.allclose(key, stale, rtol=1e-5, atol=1e-6)
    assert moved > len(pairs) // 2  # the step moved the query weights enough to tell before from after


def test_cosine_momentum_schedule_moves_towards_one(cfg_factory):
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*MOCO, *SMALL, "method.momentum=0.9", "method.momentum_schedule=cosine"))

    class Record(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.values.append(float(pl_module.key_encoder.momentum))

    record = Record()
    fit(model, dm, [record], max_epochs=5, max_steps=3, limit_val_batches=0)
    expected = [1 - 0.1 * (math.cos(math.pi * s / 3) + 1) / 2 for s in range(4)]
    assert record.values + [float(model.key_encoder.momentum)] == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(0.9) and expected[-1] == pytest.approx(1.0)
    assert cosine_ramp(0.9, 1.0, 0.5) == pytest.approx(0.95)


# -- queue -----------------------------------------------------------------------------------------------------
def test_queue_is_a_fifo_ring_of_the_last_batches(cfg_factory, monkeypatch):
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*MOCO, *SMALL, "data.batch_size=16", "method.queue_size=32"))
    keys = spy(monkeypatch, model.key_encoder, "forward")

    class Record(Callback):
        def __init__(self) -> None:
            self.batches: list[torch.Tensor] = []
            self.after: list[dict[str, Any]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append(batch[2].clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            q = pl_module.negatives.queue
            self.after.append(
                {
                    "index": q.index.clone(),
                    "written": q.written_at.clone(),
                    "ptr": int(q.ptr),
                    "keys": q.keys.clone(),
                    "key": keys[-1],
                }
            )

    record = Record()
    fit(model, dm, [record], max_epochs=5, max_steps=5, limit_val_batches=0)
    assert len(keys) == 5  # asymmetric MoCo: one key pass per step
    index, written = [-1] * 32, [-1] * 32
    for step, (batch, after) in enumerate(zip(record.batches, record.after)):
        start = (16 * step) % 32
        index[start : start + 16], written[start : start + 16] = batch.tolist(), [step] * 16
        assert after["index"].tolist() == index and after["written"].tolist() == written, step
        assert after["ptr"] == (16 * (step + 1)) % 32
        torch.testing.assert_close(after["keys"][start : start + 16], F.normalize(after["key"], dim=1))
    # after 5 writes of 16 into 32 slots: the 5th batch in slots 0-15, the 4th in 16-31
    assert record.after[-1]["index"].tolist() == record.batches[4].tolist() + record.batches[3].tolist()


@pytest.fixture
def queue_step(cfg_factory, monkeypatch):
    """Run one training step of MoCo (no shuffle-BN, so keys can be recomputed) on a hand-made queue."""

    def run(*overrides: str) -> dict[str, Any]:
        torch.manual_seed(0)
        model, dm = build(cfg_factory(*MOCO, "method.queue_size=96", "method.shuffle_bn=false", *overrides))
        gen = torch.Generator().manual_seed(1)
        model.negatives.queue.keys.copy_(
            F.normalize(torch.randn(model.negatives.queue.keys.shape, generator=gen), dim=1)
        )
        model.negatives.queue.index.copy_(torch.arange(96) + 1000)
        model.negatives.queue.written_at.fill_(7)
        model.negatives.queue.ptr.fill_(32)
        before = {name: getattr(model.negatives.queue, name).clone() for name in ("keys", "index", "written_at")}
        views = spy(monkeypatch, model.augment, "forward")
        outputs = spy(monkeypatch, model, "contrastive_loss")
        images, labels, index = next(iter(dm.train_dataloader()))
        model.training_step([images, labels, index], 0)
        with torch.no_grad():  # same weights, same batch, BN in training mode: the step's own embeddings
            queries = [model.projector(model.backbone(v)) for v in views[0]]
            keys = [model.key_encoder.embed(v) for v in views[0]]
        return {
            "model": model,
            "before": before,
            "index": index,
            "queries": queries,
            "keys": keys,
            "loss": outputs[0].loss.detach(),
            "t": model.cfg.method.temperature,
        }

    return run


def test_loss_uses_the_queue_from_before_the_batch_then_enqueues_at_ptr(queue_step):
    s = queue_step("method.symmetric=false")
    model, before, (q0, _), (_, k1) = s["model"], s["before"], s["queries"], s["keys"]
    expected = direct_info_nce(q0, k1, before["keys"], s["t"])
    torch.testing.assert_close(s["loss"], expected, rtol=1e-5, atol=1e-6)
    # with the batch's own keys already in the queue the loss would differ: the test can tell them apart
    assert abs(float(direct_info_nce(q0, k1, model.negatives.queue.keys, s["t"]) - expected)) > 1e-3

    queue = model.negatives.queue
    assert int(queue.ptr) == 64
    torch.testing.assert_close(queue.keys[32:64], F.normalize(k1, dim=1), rtol=1e-5, atol=1e-6)
    assert queue.index[32:64].tolist() == s["index"].tolist() and (queue.written_at[32:64] == 0).all()
    for name in ("keys", "index", "written_at"):
        current, old = getattr(queue, name), before[name]
        assert torch.equal(current[:32], old[:32]) and torch.equal(current[64:], old[64:]), name


def test_symmetric_loss_is_the_mean_of_both_directions_on_the_old_queue(queue_step):
    s = queue_step("method.symmetric=true")
    (q0, q1), (k0, k1), old = s["queries"], s["keys"], s["before"]["keys"]
    expected = (direct_info_nce(q0, k1, old, s["t"]) + direct_info_nce(q1, k0, old, s["t"])) / 2
    torch.testing.assert_close(s["loss"], expected, rtol=1e-5, atol=1e-6)
    one_way = direct_info_nce(q0, k1, old, s["t"])
    assert abs(float(one_way - expected)) > 1e-4
    assert int(s["model"].negatives.queue.ptr) == 64  # one write per step, after both terms


@pytest.mark.parametrize("batch_size", [16, 32])
def test_symmetric_negatives_never_hold_the_batchs_own_keys(cfg_factory, monkeypatch, batch_size):
    torch.manual_seed(0)
    cfg = cfg_factory(*MOCO, "method.symmetric=true", "method.queue_size=64", f"data.batch_size={batch_size}")
    model, dm = build(cfg)
    assert len(dm.train_dataloader()) >= 5  # all steps in one epoch: an index appears in at most one batch
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    info_nce = losses.info_nce

    def recording_info_nce(query, positive, negatives=None, temperature=0.1):
        calls.append((negatives.clone(), model.negatives.queue.index.clone()))
        return info_nce(query, positive, negatives, temperature)

    monkeypatch.setattr(losses, "info_nce", recording_info_nce)

    class Record(Callback):
        def __init__(self) -> None:
            self.batches: list[torch.Tensor] = []
            self.queues: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append(batch[2].clone())
            self.queues.append(pl_module.negatives.queue.keys.clone())

    record = Record()
    fit(model, dm, [record], max_epochs=5, max_steps=5, limit_val_batches=0)
    assert len(calls) == 10  # two directions per step
    for step, batch in enumerate(record.batches):
        for negatives, queue_index in calls[2 * step : 2 * step + 2]:
            assert torch.equal(negatives, record.queues[step]), step  # the queue as the step found it
            assert not torch.isin(queue_index, batch).any(), step
    assert (calls[-1][1] >= 0).all()  # the queue was full by then: the check covered real entries


# -- shuffle-BN ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, bn_splits, chunks", [(32, 4, 4), (6, 8, 3)])
def test_shuffle_bn_encodes_shuffled_chunks_and_restores_sample_order(cfg_factory, n, bn_splits, chunks):
    torch.manual_seed(0)
    model, _ = build(cfg_factory(*MOCO, f"method.bn_splits={bn_splits}"))

    def net(v: torch.Tensor) -> torch.Tensor:
        return model.key_encoder.embed(v)

    x = torch.randn(n, 1, 16, 16) + torch.arange(n).view(n, 1, 1, 1) * 0.1  # every sample distinct
    torch.manual_seed(5)
    keys = model.key_encoder(x)
    torch.manual_seed(5)
    perm = torch.randperm(n)
    with torch.no_grad():
        parts = [net(x[idx]) for idx in perm.chunk(chunks)]
        by_hand = torch.empty_like(keys)
        for idx, part in zip(perm.chunk(chunks), parts):
            by_hand[idx] = part
        full = net(x)
    assert len(perm.chunk(chunks)) == chunks
    torch.testing.assert_close(keys, by_hand, rtol=1e-5, atol=1e-6)
    assert (keys - full).abs().max() > 1e-3  # sub-batch BN statistics differ from the full batch's
    assert (keys - torch.cat(parts)).abs().max() > 1e-3  # and the keys are not left in shuffled order

    model.key_encoder.shuffle_bn = False
    with torch.no_grad():
        torch.testing.assert_close(model.key_encoder(x), full, rtol=1e-5, atol=1e-6)


# -- config ----------------------------------------------------------------------------------------------------
def test_queue_size_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ConfigError, match="method.queue_size"):
        validate(make_cfg([*MOCO, "method.queue_size=1000", "data.batch_size=64"], fast=False))
    validate(make_cfg([*MOCO, "method.queue_size=1024", "data.batch_size=64"], fast=False))
    cfg = make_cfg([*MOCO, "method.queue_size=192", "data.batch_size=64"], fast=False)
    validate(cfg, world_size=1)
    validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="method.queue_size=192"):
        validate(cfg, world_size=2)  # global batch 128
    with pytest.raises(ConfigError, match="method.queue_size"):
        validate(make_cfg([*MOCO, "method.queue_size=0"], fast=False))


def test_cli_rejects_queue_size_not_multiple_of_batch(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "method=moco",
        "method.queue_size=1000",
        "data.batch_size=64",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "method.queue_size" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()


def test_presets_v1_linear_head_t007_no_blur_and_v2_mlp_t02():
    v1 = make_cfg(["experiment=moco_v1", "augment=simclr"], fast=False)
    assert v1.method.name == "moco" and "version" not in v1.method
    assert v1.method.proj_layers == 1 and v1.method.temperature == 0.07 and v1.augment.blur.p == 0.0
    assert v1.method.momentum_schedule == "constant"
    model = build_method(v1, 100)
    for head in (model.projector, model.key_encoder.projector):
        assert [type(m) for m in head] == [torch.nn.Linear]

    v2 = make_cfg(["experiment=moco_v2", "augment=simclr"], fast=False)
    assert v2.method.name == "moco"
    assert v2.method.proj_layers == 2 and v2.method.temperature == 0.2 and v2.augment.blur.p > 0
    assert v2.method.momentum_schedule == "constant" and v2.method.momentum == 0.999  # --cos is the lr's
    model = build_method(v2, 100)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.key_encoder.projector) == 2
    assert any(isinstance(m, torch.nn.ReLU) for m in model.projector)
    # method=moco is the small-data recipe, named as such: m 0.99 on a cosine ramp, BN in the head
    small = make_cfg(["method=moco"], fast=False).method
    assert (small.momentum, small.momentum_schedule, small.proj_batch_norm) == (
        0.99,
        "cosine",
        True,
    )


# -- staleness -------------------------------------------------------------------------------------------------
def test_staleness_is_cosine_of_queued_keys_to_fresh_keys_and_their_age(cfg_factory):
    torch.manual_seed(0)
    model, dm = build(cfg_factory(*MOCO, *SMALL, "data.batch_size=16", "method.queue_size=48", "method.probe_size=24"))
    trainer = fit(model, dm, max_epochs=2)
    assert trainer.global_step == 8
    logged = trainer.callback_metrics
    # the queue holds steps 5, 6, 7 (slots 48 / 16 = 3 batches); a probe spread over the ring sees all three
    assert sorted(set(model.negatives.queue.written_at.tolist())) == [5, 6, 7]
    assert float(logged["diag/staleness_age_steps"]) == pytest.approx(2.0, abs=0.2)

    filled = torch.linspace(0, 47, 24).round().long()
    model.eval()
    with torch.no_grad():
        images = torch.stack([dm.train_set[int(i)][0] for i in model.negatives.queue.index[filled]])
        fresh = model.key_encoder.embed(model.eval_transform(images))
    cos = F.cosine_similarity(model.negatives.queue.keys[filled], fresh, dim=1).mean()
    age = (8 - model.negatives.queue.written_at[filled]).float().mean()
    assert 0 < float(cos) <= 1
    assert float(logged["diag/staleness"]) == pytest.approx(float(cos), abs=1e-5)
    assert float(logged["diag/staleness_age_steps"]) == pytest.approx(float(age), abs=1e-5)


# -- whole runs: checkpoint, resume, metrics.json ----------------------------------------------------------------
# 3 steps of 32 per epoch; 2 epochs write 192 keys into 160 slots, leaving ptr at 32
RUN = [*MOCO, "data.size=128", "method.queue_size=160", "eval.init=false", "eval.pixels=false", "eval.final=false"]


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("moco_run")
    return out, train(make_cfg(RUN, tmp_path=out))


def test_run_history_has_each_epochs_staleness_and_age(moco_run):
    out, _ = moco_run
    saved = json.loads((out / "metrics.json").read_text())
    history = saved["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    with open(out / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/staleness")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for record, row in zip(history, rows):
        assert record["staleness"] == round(float(row["diag/staleness"]), 5)
        assert 0 < record["staleness"] <= 1
    # after 3 steps the queue holds steps 0-2 (ages 3, 2, 1); after 6 steps steps 1-5 (ages 5..1)
    assert [r["staleness_age_steps"] for r in history] == [2.0, 3.0]
    assert saved["staleness"] == history[-1]["staleness"] and saved["staleness_age_steps"] == 3.0


def test_checkpoint_holds_queue_and_resume_continues_at_saved_ptr(moco_run, tmp_path, monkeypatch):
    out, summary = moco_run
    ckpt_path = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    steps = summary["global_steps"]
    assert steps == 6 and int(state["negatives.queue.ptr"]) == 32
    saved = {name: state[f"negatives.queue.{name}"] for name in ("keys", "index", "written_at")}
    assert (saved["index"] >= 0).all() and sorted(set(saved["written_at"].tolist())) == [1, 2, 3, 4, 5]
    assert "key_encoder.momentum" in state and "key_encoder.backbone.net.0.weight" in state

    loaded = MoCo.load_from_checkpoint(ckpt_path, map_location="cpu")
    assert int(loaded.negatives.queue.ptr) == 32
    for name, value in saved.items():
        assert torch.equal(getattr(loaded.negatives.queue, name), value), name

    first: dict[str, Any] = {}
    enqueue = Queue.enqueue

    def recording_enqueue(self, keys, index, step):
        if not first:
            first.update({name: getattr(self, name).clone() for name in ("keys", "index", "written_at", "ptr")})
            enqueue(self, keys, index, step)
            first.update(after=self.written_at.clone(), step=step)
        else:
            enqueue(self, keys, index, step)

    monkeypatch.setattr(Queue, "enqueue", recording_enqueue)
    resumed = train(make_cfg([*RUN, f"ckpt_path={ckpt_path}", "trainer.max_epochs=3"], tmp_path=tmp_path))
    assert resumed["epochs"] == 3 and resumed["global_steps"] == 9
    assert int(first["ptr"]) == 32 and first["step"] == 6
    for name, value in saved.items():
        assert torch.equal(first[name], value), name
    expected = saved["written_at"].clone()
    expected[32:64] = 6  # the first write of the resumed run lands at the saved pointer
    assert torch.equal(first["after"], expected)


# -- the paper presets -------------------------------------------------------------------------------------------
def test_moco_v2_head_is_linear_relu_linear_without_bn(cfg_factory):
    # moco/builder.py with --mlp: fc becomes Linear(d, d_hidden) -> ReLU -> Linear(d_hidden, 128), no BN
    model, _ = build(cfg_factory("experiment=moco_v2", *SMALL, "method.queue_size=64"))
    for head in (model.projector, model.key_encoder.projector):
        assert [type(mod) for mod in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
        assert head[0].bias is not None and head[2].bias is not None
        m = model.cfg.method
        assert (head[0].in_features, head[0].out_features, head[2].out_features) == (
            model.feature_dim,
            m.proj_hidden_dim,
            m.proj_out_dim,
        )
    x = torch.randn(5, model.feature_dim)
    first, second = model.projector[0], model.projector[2]
    direct = torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(model.projector(x), direct)
    # the small-data preset keeps its BN
    small, _ = build(cfg_factory(*MOCO, *SMALL))
    assert any(isinstance(mod, torch.nn.BatchNorm1d) for mod in small.projector)


def test_moco_v2_momentum_is_constant_0999_over_a_run(cfg_factory):
    cfg = cfg_factory("experiment=moco_v2", *SMALL, "data.batch_size=16", "method.queue_size=64")
    assert (cfg.method.momentum, cfg.method.momentum_schedule, cfg.method.temperature) == (0.999, "constant", 0.2)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.exclude_norm_bias, cfg.optim.warmup_epochs) == (
        0.03,
        1e-4,
        False,
        0,
    )
    torch.manual_seed(0)
    model, dm = build(cfg)

    class Record(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []
            self.keys: list[list[torch.Tensor]] = []
            self.queries: list[list[torch.Tensor]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.values.append(float(pl_module.key_encoder.momentum))
            self.keys.append([k.clone() for _, _, k in key_pairs(pl_module)])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.queries.append([q.detach().clone() for _, q, _ in key_pairs(pl_module)])

    record = Record()
    fit(model, dm, [record], max_epochs=3, max_steps=6, limit_val_batches=0)
    assert record.values + [float(model.key_encoder.momentum)] == [pytest.approx(0.999, abs=1e-7)] * 7
    # each step: key <- 0.999 key + 0.001 query, with the query after the step
    for before, query, after in zip(record.keys, record.queries, record.keys[1:]):
        for kb, q, ka in zip(before, query, after):
            torch.testing.assert_close(ka, 0.999 * kb + 0.001 * q, rtol=1e-5, atol=1e-6)


def test_momentum_update_leaves_bn_running_stats_alone(cfg_factory):
    # moco/builder.py updates the key encoder's parameters only; its BN statistics come from its own forward passes
    model, _ = build(cfg_factory(*MOCO, *SMALL, "method.momentum=0.9", "method.momentum_schedule=constant"))
    with torch.no_grad():
        for buffer in list(model.backbone.buffers()) + list(model.projector.buffers()):
            if buffer.is_floating_point():
                buffer.add_(1.0)  # the query's statistics now differ from the key's
    key_buffers = [
        b.clone() for b in list(model.key_encoder.backbone.buffers()) + list(model.key_encoder.projector.buffers())
    ]
    assert key_buffers and any(b.is_floating_point() for b in key_buffers)
    pairs_before = [(q.detach().clone(), k.clone()) for _, q, k in key_pairs(model)]
    model.key_encoder.update(model.backbone, model.projector, progress=0.0)
    after = list(model.key_encoder.backbone.buffers()) + list(model.key_encoder.projector.buffers())
    assert all(torch.equal(a, b) for a, b in zip(after, key_buffers))
    for (q, k), (_, _, k_new) in zip(pairs_before, key_pairs(model)):
        torch.testing.assert_close(k_new, 0.9 * k + 0.1 * q)


def test_moco_v1_preset_is_the_official_recipe(cfg_factory):
    cfg = cfg_factory("experiment=moco_v1", *SMALL)
    m, a, o = cfg.method, cfg.augment, cfg.optim
    assert (m.temperature, m.momentum, m.momentum_schedule, m.proj_layers, m.queue_size) == (
        0.07,
        0.999,
        "constant",
        1,
        65536,
    )
    assert (a.grayscale_first, a.grayscale, a.color_jitter.p, a.color_jitter.hue, a.blur.p) == (True, 0.2, 1.0, 0.4, 0)
    assert (o.scheduler, list(o.milestones), o.step_gamma, o.exclude_norm_bias) == ("step", [120, 160], 0.1, False)
