"""SwAV: Sinkhorn codes, swapped prediction, prototypes (unit norm, freezing), the queue, the collapse alarm."""

from __future__ import annotations

import math
import os
import socket
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from contrastive import losses
from contrastive.callbacks import CollapseWarning, CollapseWatch
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.errors import ConfigError
from contrastive.methods import build_method
from contrastive.methods.swav import SwAV, normalised_entropy

SWAV = ["method=swav", "data.batch_size=64", "method.num_prototypes=10"]


def algorithm_1(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The paper's Algorithm 1, written plainly with exponentials (prototypes x samples)."""
    q = torch.exp(scores.double() / epsilon).T
    q /= q.sum()
    k, b = q.shape
    r, c = torch.ones(k, dtype=q.dtype) / k, torch.ones(b, dtype=q.dtype) / b
    for _ in range(iterations):
        q *= (r / q.sum(1)).unsqueeze(1)
        q *= (c / q.sum(0)).unsqueeze(0)
    return (q / q.sum(0, keepdim=True)).T


def cosines(b: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 16, generator=gen), dim=1)
    return z @ F.normalize(torch.randn(k, 16, generator=gen), dim=1).T


# -- Sinkhorn ------------------------------------------------------------------------------------------------
def test_sinkhorn_rows_sum_to_one_and_prototypes_are_used_equally():
    b, k = 48, 6
    codes = losses.sinkhorn(cosines(b, k), epsilon=0.05, iterations=200)
    assert codes.shape == (b, k) and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(b), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(0), torch.full((k,), b / k), atol=1e-3, rtol=0)
    # unbalanced scores: everyone prefers prototype 0, yet the codes share the samples out
    skewed = cosines(b, k) + torch.tensor([0.5] + [0.0] * (k - 1))
    assert (skewed.argmax(1) == 0).float().mean() > 0.5
    torch.testing.assert_close(losses.sinkhorn(skewed, 0.05, 200).sum(0), torch.full((k,), b / k), atol=1e-3, rtol=0)


@pytest.mark.parametrize("epsilon,iterations", [(0.05, 3), (0.1, 1), (0.5, 10)])
def test_sinkhorn_matches_algorithm_1(epsilon, iterations):
    scores = cosines(32, 10, seed=1)
    expected = algorithm_1(scores, epsilon, iterations).float()
    torch.testing.assert_close(losses.sinkhorn(scores, epsilon, iterations), expected, atol=1e-5, rtol=1e-4)


def test_sinkhorn_survives_huge_scores():
    gen = torch.Generator().manual_seed(2)
    scores = (torch.randint(0, 2, (16, 5), generator=gen) * 2 - 1).float() * 1e4
    for s in (scores, scores.half()):
        codes = losses.sinkhorn(s, 0.05, 3).float()
        assert torch.isfinite(codes).all()
        torch.testing.assert_close(codes.sum(1), torch.ones(16), atol=1e-3, rtol=0)
    # the naive exponentials overflow, which is why sinkhorn works in log space
    assert not torch.isfinite(algorithm_1(scores, 0.05, 3)).all()


def _sinkhorn_rank(rank: int, port: int, scores: torch.Tensor, result) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = len(scores) // 2
        result[rank] = losses.sinkhorn(scores[rank * half : (rank + 1) * half], 0.05, 3)
    finally:
        tdist.destroy_process_group()


def test_sinkhorn_two_processes_match_one():
    scores = cosines(16, 4, seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    # fork: the children need nothing re-imported, which keeps the test quick
    mp.start_processes(_sinkhorn_rank, args=(port, scores, result), nprocs=2, join=True, start_method="fork")
    torch.testing.assert_close(torch.cat([result[0], result[1]]), losses.sinkhorn(scores, 0.05, 3))


# -- swapped prediction ----------------------------------------------------------------------------------------
def test_swapped_prediction_matches_direct_computation():
    gen = torch.Generator().manual_seed(4)
    b, k, t = 5, 7, 0.1
    scores = [torch.randn(b, k, generator=gen) for _ in range(4)]  # 2 large crops, then 2 small ones
    codes = [torch.softmax(torch.randn(b, k, generator=gen), 1) for _ in range(2)]
    terms = []
    for i in range(2):
        for j in range(4):
            if i != j:
                p = torch.exp(scores[j] / t) / torch.exp(scores[j] / t).sum(1, keepdim=True)
                terms.append(sum(-(codes[i][n] * torch.log(p[n])).sum() for n in range(b)) / b)
    torch.testing.assert_close(losses.swapped_prediction(scores, codes, t), sum(terms) / len(terms))
    # known answer: uniform predictions cost ln(K) whatever the codes
    flat = [torch.zeros(b, k)] * 4
    torch.testing.assert_close(losses.swapped_prediction(flat, codes, t), torch.tensor(math.log(k)))


# -- the module ------------------------------------------------------------------------------------------------
def build(cfg_factory, *overrides: str) -> tuple[SwAV, ContrastiveDataModule]:
    cfg = cfg_factory(*SWAV, *overrides)
    dm = ContrastiveDataModule(cfg.data)
    dm.setup("fit")
    model = build_method(cfg, dm.num_train)
    assert isinstance(model, SwAV) and model.negatives_source == "prototypes"
    return model, dm


def fit(model: SwAV, dm, callbacks=(), **trainer_args) -> L.Trainer:
    args = {
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
    }
    trainer = L.Trainer(**{**args, **trainer_args}, callbacks=list(callbacks))
    trainer.fit(model, datamodule=dm)
    return trainer


class RecordPrototypes(Callback):
    """Prototype weights right after each optimiser step (callbacks run before the module's own hook, so before the
    module renormalises them)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.prototypes.weight.detach().clone())


def views_for(model: SwAV, dm, n: int = 8) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    images, labels, index = next(iter(dm.train_dataloader()))
    return model.augment(images[:n]), index[:n], labels[:n]


def test_loss_is_swapped_prediction_of_normalised_embeddings(cfg_factory):
    model, dm = build(cfg_factory, "method.num_small_views=2", "method.sinkhorn_epsilon=0.05")
    model.eval()  # BN on running statistics, so crops give the same output alone or concatenated
    views, index, labels = views_for(model, dm)
    assert len(views) == 4 and views[2].shape[-1] < views[0].shape[-1]
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)  # contrastive_loss must renormalise the rows
        out = model.contrastive_loss(views, model.step_context(index, labels))
        w = F.normalize(model.prototypes.weight, dim=1)
        scores = [F.normalize(model.projector(model.backbone(v)), dim=1) @ w.T for v in views]
        codes = [losses.sinkhorn(s, 0.05, 3) for s in scores[:2]]
        expected = losses.swapped_prediction(scores, codes, model.cfg.method.temperature)
        torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.features, model.backbone(views[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))


def test_one_backbone_call_per_resolution(cfg_factory):
    model, dm = build(cfg_factory, "method.num_small_views=3")
    batches = []
    model.backbone.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape))
    views, index, labels = views_for(model, dm)
    model.contrastive_loss(views, model.step_context(index, labels))
    assert len(batches) == 2
    assert batches[0][0] == 2 * 8 and batches[1][0] == 3 * 8 and batches[1][-1] < batches[0][-1]


def test_prototypes_frozen_for_first_epoch_then_move_and_keep_unit_norm(cfg_factory):
    # a large weight decay: frozen must also mean untouched by decay and momentum
    model, dm = build(cfg_factory, "method.freeze_prototypes_steps=-1", "optim.weight_decay=0.5")
    initial = model.prototypes.weight.detach().clone()
    record = RecordPrototypes()
    trainer = fit(model, dm, [record])
    steps_per_epoch = trainer.num_training_batches
    assert steps_per_epoch >= 2 and len(record.weights) == 2 * steps_per_epoch
    assert model.prototypes.freeze_until == steps_per_epoch
    for w in record.weights[:steps_per_epoch]:
        assert torch.equal(w, initial)
    for w in record.weights[steps_per_epoch:]:
        assert not torch.allclose(w, initial, atol=1e-4)
    # the optimiser step leaves the rows off the unit sphere; the module puts them back after each step
    assert (record.weights[-1].norm(dim=1) - 1).abs().max() > 1e-4
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))


def test_explicit_freeze_steps(cfg_factory):
    model, dm = build(cfg_factory, "method.freeze_prototypes_steps=2")
    initial = model.prototypes.weight.detach().clone()
    record = RecordPrototypes()
    fit(model, dm, [record], max_epochs=-1, max_steps=4)
    assert [torch.equal(w, initial) for w in record.weights] == [True, True, False, False]


def test_queue_size_must_be_a_multiple_of_the_batch(cfg_factory):
    with pytest.raises(ValueError, match="method.feature_queue_size=100"):
        build(cfg_factory, "method.feature_queue_size=100")
    assert issubclass(ConfigError, ValueError)


def test_queue_is_checkpointed_and_restored(cfg_factory):
    model, _ = build(cfg_factory, "method.feature_queue_size=128")
    model.prototypes.queue.enqueue(torch.randn(2, 64, 16))
    model.prototypes.queue.enqueue(torch.randn(2, 64, 16))
    model.prototypes.queue.enqueue(torch.randn(2, 64, 16))  # wraps: overwrites the oldest 64 of each row
    state = model.state_dict()
    assert {"prototypes.queue.features", "prototypes.queue.ptr", "prototypes.queue.filled"} <= set(state)
    other, _ = build(cfg_factory, "method.feature_queue_size=128")
    assert not other.prototypes.queue.full  # caches the host copy of the empty queue's state
    other.load_state_dict(state)
    assert torch.equal(other.prototypes.queue.features, model.prototypes.queue.features)
    assert int(other.prototypes.queue.ptr) == 64 and other.prototypes.queue.full
    # the restored pointer is where the next write goes
    new = torch.randn(2, 64, 16)
    other.prototypes.queue.enqueue(new)
    torch.testing.assert_close(other.prototypes.queue.features[:, 64:], new)


def test_queue_joins_the_sinkhorn_batch_once_full_and_started(cfg_factory):
    model, _ = build(
        cfg_factory, "method.feature_queue_size=64", "method.queue_start_epoch=0", "method.sinkhorn_epsilon=0.05"
    )
    gen = torch.Generator().manual_seed(5)
    scores = [cosines(8, 10, seed=s) for s in (6, 7)]
    plain = [losses.sinkhorn(s, 0.05, 3) for s in scores]
    # not full yet: the codes are the batch's own
    for got, want in zip(model.prototypes.codes(scores, model.current_epoch), plain):
        torch.testing.assert_close(got, want)
    queued = F.normalize(torch.randn(2, 64, 16, generator=gen), dim=2)
    model.prototypes.queue.enqueue(queued)
    w = model.prototypes.weight
    for i, got in enumerate(model.prototypes.codes(scores, model.current_epoch)):
        want = losses.sinkhorn(torch.cat([queued[i] @ w.T, scores[i]]), 0.05, 3)[-8:]
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, plain[i], atol=1e-3)
    late, _ = build(cfg_factory, "method.feature_queue_size=64", "method.queue_start_epoch=1")
    late.prototypes.queue.enqueue(queued)
    assert not late.prototypes.queue_active(late.current_epoch)  # epoch 0 < queue_start_epoch


def test_training_step_fills_the_queue_with_large_crop_embeddings(cfg_factory):
    model, dm = build(cfg_factory, "data.batch_size=8", "method.feature_queue_size=16", "method.num_small_views=1")
    views, index, labels = views_for(model, dm)
    model.eval()
    with torch.no_grad():
        model.contrastive_loss(views, model.step_context(index, labels))
        for i in range(2):
            z = F.normalize(model.projector(model.backbone(views[i])), dim=1)
            torch.testing.assert_close(model.prototypes.queue.features[i, :8], z, atol=1e-5, rtol=1e-5)
    assert int(model.prototypes.queue.filled) == 8 and not model.prototypes.queue.full


def test_bf16_autocast_keeps_codes_in_float32(cfg_factory):
    model, dm = build(cfg_factory, "data.batch_size=8", "method.feature_queue_size=8", "method.num_small_views=1")
    views, index, labels = views_for(model, dm)
    model.eval()
    with torch.no_grad():
        model.contrastive_loss(views, model.step_context(index, labels))  # fills the queue: the next step uses it
        reference = model.contrastive_loss(views, model.step_context(index, labels)).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = [model.prototypes(F.normalize(model.projector(model.backbone(v)), dim=1)) for v in views[:2]]
            codes = model.prototypes.codes(scores, model.current_epoch)
            loss = model.contrastive_loss(views, model.step_context(index, labels)).loss
    assert scores[0].dtype == torch.bfloat16 and all(c.dtype == torch.float32 for c in codes)
    assert model.prototypes.queue_active(model.current_epoch) and torch.isfinite(loss)
    torch.testing.assert_close(loss.float(), reference, atol=0.05, rtol=0.02)


def test_prototype_entropy_and_dictionary_stats(cfg_factory):
    torch.testing.assert_close(normalised_entropy(torch.ones(10)), torch.tensor(1.0, dtype=torch.float64))
    assert float(normalised_entropy(torch.tensor([5.0, 0, 0, 0]))) == 0.0
    torch.testing.assert_close(float(normalised_entropy(torch.tensor([1.0, 1, 0, 0]))), math.log(2) / math.log(4))
    model, _ = build(cfg_factory)
    codes = [torch.eye(10)[[0, 1, 1, 2]]]
    model.prototypes.track(torch.tensor(1.0), codes)
    stats = model.dictionary_stats()
    assert stats["negatives_per_query"] == 0 and stats["dictionary_size"] == 10
    p = torch.tensor([0.25, 0.5, 0.25])
    assert stats["prototype_entropy"] == pytest.approx(float(-(p * p.log()).sum()) / math.log(10))


def test_collapse_alarm_warns_once_after_consecutive_collapsed_epochs(cfg_factory):
    # SwAV's signs go through the one alarm (CollapseWatch), called as Lightning does: callbacks, then the module
    model, _ = build(cfg_factory)
    watch = CollapseWatch()
    trainer = SimpleNamespace(callback_metrics={}, current_epoch=0, is_global_zero=True)
    log_k = math.log(10)
    collapsed = [torch.eye(10)[[3] * 8]]
    healthy = [torch.eye(10)[torch.arange(8)]]

    def epoch(loss: float, codes) -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.prototypes.track(torch.tensor(loss), codes)
            watch.on_train_epoch_end(trainer, model)
            model.on_train_epoch_end()
        assert model.prototypes.epoch_figures() is None  # each epoch's figures start afresh
        return [w for w in caught if issubclass(w.category, CollapseWarning)]

    assert not epoch(log_k * 1.005, healthy) and not epoch(log_k, healthy)  # loss at ln K, 2 epochs
    assert not epoch(1.0, healthy)  # a healthy epoch resets the streak
    assert not epoch(1.0, collapsed) and not epoch(1.0, collapsed)  # one prototype, 2 epochs
    alarm = epoch(1.0, collapsed)
    message = str(alarm[0].message)
    assert len(alarm) == 1 and "SwAV looks collapsed" in message and "sinkhorn_epsilon" in message
    assert "normalised usage entropy 0.000" in message and "(for 3 epochs)" in message
    assert not epoch(log_k, collapsed)  # once only


def test_short_run_loss_falls(cfg_factory):
    from contrastive.train import train

    cfg = cfg_factory(*SWAV, "data.size=256", "trainer.max_epochs=2", "eval.init=false", "eval.pixels=false")
    metrics = train(cfg)
    history = metrics["history"]
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"] - 0.05
    assert metrics["negatives"] == "prototypes"
    assert metrics["dictionary_size"] == 10 and metrics["negatives_per_query"] == 0
    assert 0 < metrics["prototype_entropy"] <= 1


def test_head_runs_once_over_all_crops_so_its_bn_sees_them_together(cfg_factory):
    # SwAV's official model: backbone per resolution, then one head call on the concatenated features
    import copy

    model, dm = build(cfg_factory, "method.num_small_views=2", "method.sinkhorn_epsilon=0.05")
    views, index, labels = views_for(model, dm)
    bn = next(mod for mod in model.projector if isinstance(mod, torch.nn.BatchNorm1d))
    reference = copy.deepcopy(model)
    heads = []
    model.projector.register_forward_hook(lambda mod, args, out: heads.append(args[0].shape[0]))
    with torch.no_grad():
        out = model.contrastive_loss(views, model.step_context(index, labels))
        feats = torch.cat([reference.backbone(torch.cat(views[:2])), reference.backbone(torch.cat(views[2:]))])
        hidden = reference.projector[0](feats)  # the head's first linear layer, before its BN
    assert heads == [4 * 8]
    expected = 0.9 * torch.zeros(hidden.shape[1]) + 0.1 * hidden.mean(0)  # BN's running mean after one batch
    torch.testing.assert_close(bn.running_mean, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # what one head call per resolution would record: two updates, large crops first
        large, small = reference.projector[0](feats[:16]).mean(0), reference.projector[0](feats[16:]).mean(0)
    per_size = 0.9 * (0.1 * large) + 0.1 * small
    assert (bn.running_mean - per_size).abs().max() > 20 * (bn.running_mean - expected).abs().max()
    with torch.no_grad():  # and the loss is the swapped prediction of that joint pass
        z = F.normalize(reference.projector(feats), dim=1)
        scores = list((z @ F.normalize(reference.prototypes.weight, dim=1).T).split(8))
        codes = [losses.sinkhorn(s, 0.05, 3) for s in scores[:2]]
        expected_loss = losses.swapped_prediction(scores, codes, model.cfg.method.temperature)
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_queue_is_filled_only_from_its_start_epoch(cfg_factory):
    # the official queue is created at its start epoch: before it, nothing is written
    model, dm = build(cfg_factory, "data.batch_size=8", "method.feature_queue_size=16", "method.queue_start_epoch=1")
    views, index, labels = views_for(model, dm)
    with torch.no_grad():
        model.contrastive_loss(views, model.step_context(index, labels))
    assert int(model.prototypes.queue.filled) == 0  # epoch 0
    model, dm = build(cfg_factory, "data.batch_size=8", "method.feature_queue_size=16", "method.queue_start_epoch=0")
    with torch.no_grad():
        model.contrastive_loss(views, model.step_context(index, labels))
    assert int(model.prototypes.queue.filled) == 8
