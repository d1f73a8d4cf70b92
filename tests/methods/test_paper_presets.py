"""The paper presets against the official code's settings, and SimCLR's single forward pass over both views."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import build, spy

from contrastive import losses

IMAGENET = ["data.root=/nonexistent"]  # composing needs no data


def test_simclr_joint_views_is_one_forward_over_2n(cfg_factory, monkeypatch):
    # SimCLR's official code encodes both views as one batch: BN statistics over all 2N images
    torch.manual_seed(0)
    model, dm = build(cfg_factory("method=simclr", "method.joint_views=true"))
    calls = spy(monkeypatch, model, "embed")
    images, labels, index = next(iter(dm.train_dataloader()))
    torch.manual_seed(1)
    views = model.augment(images)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.contrastive_loss(views, model.step_context(index, labels))
    assert len(calls) == 1 and calls[0][1].shape[0] == 2 * len(index)
    model.load_state_dict(reference)  # the BN running statistics as they were
    with torch.no_grad():
        z = model.projector(model.backbone(torch.cat(views)))
        expected = losses.nt_xent(*z.chunk(2), temperature=model.cfg.method.temperature)
        separate = losses.nt_xent(
            *(model.projector(model.backbone(v)) for v in views), temperature=model.cfg.method.temperature
        )
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(separate) - float(expected)) > 1e-4  # per-view BN would give another loss


def compose(cfg_factory, *overrides):
    return cfg_factory(*overrides, fast=False)


def test_imagenet_presets_carry_the_official_settings(cfg_factory):
    simclr = compose(cfg_factory, "experiment=imagenet_simclr", *IMAGENET)
    o = simclr.optim
    assert (o.name, o.lars_variant, o.lars_eta, o.lars_clip, o.exclude_norm_bias) == (
        "lars",
        "simclr",
        0.001,
        False,
        True,
    )
    assert simclr.method.joint_views and simclr.augment.color_jitter.random_order
    swav = compose(cfg_factory, "experiment=imagenet_swav", *IMAGENET)
    o = swav.optim
    assert (o.name, o.lars_variant, o.lars_eta, o.lars_clip, o.exclude_norm_bias) == (
        "lars",
        "larc",
        0.001,
        False,
        False,
    )
    assert (swav.method.queue_start_epoch, swav.augment.color_jitter.brightness) == (15, 0.8)
    moco = compose(cfg_factory, "experiment=imagenet_moco", *IMAGENET)
    m = moco.method
    assert (m.momentum, m.momentum_schedule, m.proj_batch_norm, m.queue_size, m.proj_hidden_dim) == (
        0.999,
        "constant",
        False,
        65536,
        2048,
    )
    assert (moco.optim.exclude_norm_bias, moco.optim.weight_decay) == (False, 1e-4)
    bank = compose(cfg_factory, "experiment=imagenet_memory_bank", *IMAGENET)
    m, o, a = bank.method, bank.optim, bank.augment
    assert (m.loss, m.bank_init, m.nce_z, m.temperature, m.num_negatives, m.proj_layers) == (
        "nce",
        "random",
        "random_start",
        0.07,
        4096,
        1,
    )
    assert (o.scheduler, list(o.milestones), o.exclude_norm_bias, o.weight_decay) == ("step", [120, 160], False, 1e-4)
    assert (a.grayscale_first, a.color_jitter.p, a.color_jitter.hue, a.blur.p) == (True, 1.0, 0.4, 0.0)


@pytest.mark.slow
def test_moco_v2_cfg_job_shows_the_official_values():
    out = subprocess.run(
        [sys.executable, "-m", "contrastive.train", "experiment=moco_v2", "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in (
        "momentum: 0.999",
        "momentum_schedule: constant",
        "temperature: 0.2",
        "proj_batch_norm: false",
        "queue_size: 65536",
        "lr: 0.03",
        "weight_decay: 0.0001",
        "exclude_norm_bias: false",
    ):
        assert line in out, line


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lars_variant=apex"], r"optim\.lars_variant='apex' is not known; choose one of simclr, larc"),
        (["optim.scheduler=step"], r"optim\.scheduler=step needs optim\.milestones"),
        (["method=memory_bank", "method.nce_z=mean"], r"method\.nce_z='mean'; choose one of random_start, first_batch"),
        (["data.crops=full"], r"data\.crops=full .* only data=imagefolder"),
        (["data.eval_crop=0"], r"data\.eval_crop=0\.0 must be in \(0, 1\]"),
    ],
)
def test_new_keys_are_checked_before_training(cfg_factory, overrides, message):
    from contrastive.errors import ConfigError
    from contrastive.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(cfg_factory(*overrides))


def test_simclr_official_head_ends_with_a_bn_without_offset(cfg_factory):
    # model_util.py: hidden Linear (no bias) -> BN -> ReLU, then Linear without bias -> BN with scale, no offset
    from torch import nn

    model, _ = build(cfg_factory("method=simclr", "method.proj_final_bn=true"))
    head = model.projector
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert head[0].bias is None and head[3].bias is None and not head[4].bias.requires_grad
    assert id(head[4].bias) not in {id(p) for p in model.parameters() if p.requires_grad}  # what the optimiser gets
    with torch.no_grad():
        head[4].weight.uniform_(0.5, 2.0)
        x = torch.randn(12, model.feature_dim)
        h = torch.relu(
            nn.functional.batch_norm(x @ head[0].weight.T, None, None, head[1].weight, head[1].bias, training=True)
        )
        y = h @ head[3].weight.T
        direct = (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + 1e-5) * head[4].weight
        torch.testing.assert_close(head(x), direct, rtol=1e-4, atol=1e-5)
    assert compose(cfg_factory, "experiment=imagenet_simclr", *IMAGENET).method.proj_final_bn
