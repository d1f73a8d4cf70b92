"""FLOPs counted against a hand count, the measured peak, and the callback's utilisation on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from contrastive.callbacks import Throughput
from contrastive.flops_callback import FlopsCallback
from contrastive.metrics.flops import OTHER, FlopCount, FlopCounter, count_flops, efficiency, matmul_peak
from contrastive.models import SmallCNN
from tests.conftest import TINY, build, fit


def conv_flops(size: int, channels: int, width: int, depth: int) -> list[int]:
    """Forward FLOPs of each 3x3 convolution of SmallCNN on one image, by hand: 2 x H x W x C_in x C_out x 9, the
    map halved after the first block and after block depth // 2."""
    out, ch = [], channels
    for i in range(depth):
        width_i = width * 2 ** min(i, 2)
        out.append(2 * size * size * ch * width_i * 9)
        if i in (0, depth // 2):
            size //= 2
        ch = width_i
    return out


def test_small_cnn_flops_match_a_hand_count_of_its_convolutions():
    net = SmallCNN(3, width=32, depth=4)
    x = torch.randn(4, 3, 32, 32)
    convs = conv_flops(32, 3, 32, 4)  # 1.8 + 9.4 + 37.7 + 18.9 MFLOP per image
    forward = count_flops(lambda: net(x))
    assert forward.total == pytest.approx(4 * sum(convs), rel=0.02)
    # backward: the weight gradient and the input gradient, each as many as the forward, but no input gradient
    # for the image itself
    train = count_flops(lambda: net(x).sum())
    assert train.total == pytest.approx(4 * (3 * sum(convs) - convs[0]), rel=0.02)


def test_parts_of_the_same_class_are_counted_apart():
    a, b = nn.Linear(64, 32), nn.Linear(64, 32)
    x = torch.randn(8, 64)
    with FlopCounter({"query": a, "key": b}) as counter:
        with torch.no_grad():
            key = b(x)
        (a(x) @ key.T).sum().backward()
    parts = counter.count.parts
    assert parts["key"] == 2 * 8 * 64 * 32  # forward only
    assert parts["query"] == 2 * 2 * 8 * 64 * 32  # forward and weight gradient (the input needs none)
    assert parts[OTHER] == 2 * 2 * 8 * 32 * 8  # the product outside both: forward and the query's gradient
    assert counter.count.total == sum(parts.values())


def test_peak_is_positive_and_leaves_threads_and_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    peak = matmul_peak("cpu", threads=1, size=256, seconds=0.05)
    assert peak > 1e8
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(1), expected)


def test_efficiency_figures():
    from contrastive.metrics.flops import FlopCount

    step = FlopCount(total=1000, parts={"backbone": 900, OTHER: 100})
    out = efficiency(step, 10, images_per_sec=50.0, peaks={"float32": 1e4, "bfloat16": 2e4})
    assert out["flops_per_image"] == 100 and out["flops_per_image_parts"] == {"backbone": 90, OTHER: 10}
    assert out["achieved_flops"] == 5000 and out["peak_flops"] == 10000 and out["utilisation"] == 0.5
    assert out["peak_dtype"] == "float32" and out["peak_flops_bf16"] == 20000
    bf16 = efficiency(step, 10, 50.0, {"float32": 1e4, "bfloat16": 2e4}, torch.bfloat16, world_size=2)
    assert bf16["achieved_flops"] == 2500 and bf16["peak_dtype"] == "bfloat16" and bf16["utilisation"] == 0.125
    assert efficiency(None, 0, 50.0, {}) == {}


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_callback_counts_one_step_without_changing_training_and_utilisation_is_a_fraction(cfg_factory, method):
    overrides = [f"method={method}", *TINY, "trainer.max_epochs=1"]
    if method == "moco":
        overrides.append("method.queue_size=32")
    model, dm = build(cfg_factory(*overrides))
    twin = copy.deepcopy(model)
    flops, throughput = FlopsCallback(peak_seconds=0.05), Throughput()
    torch.manual_seed(0)
    fit(model, dm, [flops, throughput], limit_val_batches=1)
    torch.manual_seed(0)
    fit(twin, dm, [], limit_val_batches=1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # counting only observes

    summary = flops.summary(throughput.images_per_sec)
    assert flops.step_images == 16
    parts = summary["flops_per_image_parts"]
    data, net = model.cfg.data, model.cfg.backbone
    convs = conv_flops(data.image_size, data.channels, net.width, net.depth)
    with_grad = 3 * sum(convs) - convs[0]  # forward, weight and input gradients (none for the image)
    if method == "simclr":  # both views with gradient
        assert parts["backbone"] == pytest.approx(2 * with_grad, rel=0.02)
    else:  # one query view with gradient, its key through the momentum encoder without
        assert parts["backbone"] == pytest.approx(with_grad, rel=0.02)
        key = sum(v for name, v in parts.items() if name.startswith("key"))  # the key encoder's nets
        assert key == pytest.approx(sum(convs), rel=0.02)
    assert parts["probe"] > 0 and parts["projector"] > 0
    assert summary["flops_per_image"] == pytest.approx(sum(parts.values()), abs=len(parts))
    assert summary["eval_flops"] > 0
    assert summary["achieved_flops"] > 0 and summary["peak_flops"] > 0
    assert 0 < summary["utilisation"] < 1


def test_peak_is_the_best_sample_of_the_run(monkeypatch):
    """A peak measured during a load spike at the start must not stand: every epoch's end samples it again and the
    best sample counts, the lowest is reported beside it."""
    from types import SimpleNamespace

    import contrastive.flops_callback as fc

    samples = iter([20.0, 80.0, 50.0])
    monkeypatch.setattr(fc, "matmul_peak", lambda *a, **k: next(samples))
    monkeypatch.setattr(fc, "low_precision_supported", lambda *a: False)
    monkeypatch.setattr(fc, "MEASURED_PEAKS", {})
    trainer = SimpleNamespace(
        world_size=1, precision="32-true", estimated_stepping_batches=10, global_step=0, accumulate_grad_batches=1
    )
    callback = fc.FlopsCallback()
    callback.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    callback.on_train_epoch_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    callback.step, callback.step_images = FlopCount(total=400, parts={"backbone": 400}), 10
    out = callback.summary(images_per_sec=1.0)  # 40 FLOP/s achieved
    assert out["peak_flops"] == 80 and out["peak_flops_low"] == 20 and out["peak_samples"] == 3
    assert out["utilisation"] == 0.5  # against the start's 20 it would read 2.0
    assert fc.MEASURED_PEAKS[("cpu", torch.float32, callback.threads)] == 80.0
