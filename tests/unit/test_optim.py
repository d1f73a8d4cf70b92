"""Schedule factors, parameter groups, and LARS steps against their formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from contrastive.config import OptimConfig
from contrastive.optim import LARS, build_optimizer, warmup_cosine


def optim_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), overrides)


def dummy_optimizer(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


# -- schedule ---------------------------------------------------------------------------------------------------
def test_warmup_cosine_factors():
    schedule = warmup_cosine(dummy_optimizer(), warmup_steps=4, total_steps=12, min_ratio=0.1)
    factor = schedule.lr_lambdas[0]
    # Linear warmup reaching the base rate on its last step.
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Cosine from 1 (step 4) over the remaining 8 steps to min_ratio at the end.
    for s in range(4, 13):
        progress = (s - 4) / 8
        assert factor(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert factor(4) == pytest.approx(1.0)
    assert factor(8) == pytest.approx(0.55)
    assert factor(12) == pytest.approx(0.1)
    assert factor(40) == pytest.approx(0.1)  # stays at the floor past the end
    decay = [factor(s) for s in range(4, 13)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_warmup_cosine_drives_the_learning_rate():
    optimizer = dummy_optimizer(lr=2.0)
    schedule = warmup_cosine(optimizer, warmup_steps=2, total_steps=6, min_ratio=0.0)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx(
        [1.0, 2.0, 2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0, 2.0 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
        abs=1e-12,
    )


def test_warmup_cosine_without_warmup_starts_at_base_rate():
    factor = warmup_cosine(dummy_optimizer(), warmup_steps=0, total_steps=10).lr_lambdas[0]
    assert factor(0) == pytest.approx(1.0)
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0)


def test_warmup_constant():
    schedule = warmup_cosine(dummy_optimizer(), warmup_steps=5, total_steps=20, min_ratio=0.3, kind="constant")
    factor = schedule.lr_lambdas[0]
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [factor(s) for s in (5, 12, 20, 100)] == pytest.approx([1.0] * 4)


def test_warmup_rejects_unknown_kind():
    with pytest.raises(ValueError, match="linear"):
        warmup_cosine(dummy_optimizer(), warmup_steps=1, total_steps=5, kind="linear")


# -- parameter groups ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)
        self.prototypes = nn.Linear(3, 4, bias=False)


def ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_build_optimizer_groups(name):
    encoder, probe = Encoder(), nn.Linear(3, 2)
    cfg = optim_cfg(name=name, weight_decay=0.01, probe_lr=0.7, lars_eta=0.005, momentum=0.8)
    optimizer = build_optimizer(cfg, list(encoder.named_parameters()), list(probe.parameters()), lr=0.3)
    groups = optimizer.param_groups
    assert len(groups) == 3
    decay, no_decay, probe_group = groups
    assert ids(decay["params"]) == ids([encoder.conv.weight, encoder.fc.weight, encoder.prototypes.weight])
    assert ids(no_decay["params"]) == ids([encoder.bn.weight, encoder.bn.bias, encoder.fc.bias])
    assert ids(probe_group["params"]) == ids(probe.parameters())
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0 and probe_group["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.3 and probe_group["lr"] == 0.7
    expected_type = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "lars": LARS}[name]
    assert type(optimizer) is expected_type
    if name == "lars":
        assert [g["lars_exclude"] for g in groups] == [False, True, True]
        assert all(g["eta"] == 0.005 and g["momentum"] == 0.8 for g in groups)
    else:
        assert all("lars_exclude" not in g for g in groups)
    if name == "sgd":
        assert all(g["momentum"] == 0.8 for g in groups)


def test_build_optimizer_without_exclusion_decays_everything():
    encoder, probe = Encoder(), nn.Linear(3, 2)
    cfg = optim_cfg(name="sgd", exclude_norm_bias=False, weight_decay=0.02)
    optimizer = build_optimizer(cfg, list(encoder.named_parameters()), list(probe.parameters()), lr=0.1)
    decay, probe_group = optimizer.param_groups
    assert ids(decay["params"]) == ids(encoder.parameters()) and decay["weight_decay"] == 0.02
    assert ids(probe_group["params"]) == ids(probe.parameters())


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer(optim_cfg(name="rmsprop"), list(Encoder().named_parameters()), [], lr=0.1)


# -- LARS ---------------------------------------------------------------------------------------------------------
def lars_reference(w, grads, lr, momentum, wd, eta):
    """Steps of ``v <- m v + trust * (g + wd w)``, ``w <- w - lr v`` with ``trust = eta ||w|| / ||g + wd w||``."""
    w, v = w.clone(), torch.zeros_like(w)
    for g in grads:
        d = g + wd * w
        v = momentum * v + eta * w.norm() / d.norm() * d
        w = w - lr * v
    return w


def test_lars_step_matches_formula():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) * s for s in (0.1, 5.0, 1.0)]
    w = nn.Parameter(w0.clone())
    optimizer = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    for grad in grads:
        w.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(w.detach(), lars_reference(w0, grads, 0.5, 0.9, 0.1, 0.02), rtol=1e-12, atol=1e-14)


def test_lars_first_step_known_answer():
    # w = (3, 4), g = (0, 1), no decay: trust = eta * 5 / 1, step = lr * trust * g.
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    LARS([w], lr=0.1, eta=0.01).step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.1 * 0.05], dtype=torch.float64))


def test_lars_step_size_ignores_gradient_scale():
    # The trust ratio makes the step length eta * lr * ||w||, whatever the gradient's size.
    for scale in (1e-4, 1.0, 1e4):
        w = nn.Parameter(torch.ones(4, dtype=torch.float64))
        w.grad = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) * scale
        LARS([w], lr=0.1, eta=0.02).step()
        assert (w.detach() - 1).norm().item() == pytest.approx(0.1 * 0.02 * 2.0, rel=1e-12)


def test_lars_excluded_group_is_plain_sgd():
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.randn(5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g)
    steps = [
        (torch.randn(5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g))
        for _ in range(3)
    ]
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    b_sgd = nn.Parameter(b0.clone())
    lars = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.01}],
        lr=0.2,
        momentum=0.9,
        weight_decay=0.05,
        eta=0.02,
    )
    sgd = torch.optim.SGD([b_sgd], lr=0.2, momentum=0.9, weight_decay=0.01)
    for gw, gb in steps:
        w.grad, b.grad, b_sgd.grad = gw.clone(), gb.clone(), gb.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(b.detach(), b_sgd.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        w.detach(), lars_reference(w0, [s[0] for s in steps], 0.2, 0.9, 0.05, 0.02), rtol=1e-12, atol=1e-14
    )


def test_lars_zero_weight_falls_back_to_sgd():
    # ||w|| = 0 (a freshly zeroed layer) would give trust 0 and freeze it forever; LARS takes the plain step.
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    LARS([w], lr=0.1).step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, -0.2, -0.3]))


def test_lars_skips_parameters_without_gradient():
    w = nn.Parameter(torch.ones(2))
    LARS([w], lr=0.1).step()
    assert torch.equal(w.detach(), torch.ones(2))


# -- LARS as the papers' code runs it --------------------------------------------------------------------------
def simclr_official(w, grads, rates, momentum, wd, eta, adapt=True):
    """SimCLR's lars_optimizer.py with classic momentum, written out: ``d = g + wd w``; ``r = eta ||w|| / ||d||``
    (1 when excluded); ``v <- m v + lr r d``; ``w <- w - v``."""
    w, v = w.clone(), torch.zeros_like(w)
    for g, lr in zip(grads, rates):
        d = g + wd * w
        r = eta * w.norm() / d.norm() if adapt else 1.0
        v = momentum * v + lr * r * d
        w = w - v
    return w


def larc_official(w, grads, rates, momentum, wd, eta, clip, eps=1e-8):
    """apex LARC around torch SGD (SwAV, solo-learn): ``r = eta ||w|| / (||g|| + wd ||w|| + eps)``, clipped to
    ``min(r / lr, 1)`` in clip mode; the gradient ``(g + wd w) r`` enters SGD's buffer; ``w <- w - lr v``."""
    w, v = w.clone(), None
    for g, lr in zip(grads, rates):
        r = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
        if clip:
            r = min(r / lr, 1.0)
        d = (g + wd * w) * r
        v = d if v is None else momentum * v + d
        w = w - lr * v
    return w


def run_lars(w0, grads, rates, **kwargs):
    w = nn.Parameter(w0.clone())
    optimizer = LARS([w], lr=rates[0], **kwargs)
    for grad, lr in zip(grads, rates):
        optimizer.param_groups[0]["lr"] = lr
        w.grad = grad.clone()
        optimizer.step()
    return w.detach()


def lars_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(16, 8, generator=g, dtype=torch.float64)
    grads = [torch.randn(16, 8, generator=g, dtype=torch.float64) * s for s in (0.01, 3.0, 0.5, 1.0)]
    return w0, grads, [0.8, 4.8, 2.4, 0.3]  # a changing rate (warmup, decay) tells where lr enters the momentum


def test_default_lars_is_simclrs_official_update():
    # the defaults: eta 0.001, no clipping, the rate inside the momentum
    defaults = LARS([nn.Parameter(torch.ones(1))], lr=1.0).defaults
    assert (defaults["eta"], defaults["clip"], defaults["variant"]) == (0.001, False, "simclr")
    cfg = optim_cfg(name="lars")
    assert (cfg.lars_eta, cfg.lars_variant, cfg.lars_clip) == (0.001, "simclr", False)
    w0, grads, rates = lars_case()
    got = run_lars(w0, grads[:1], rates[1:2], momentum=0.9, weight_decay=1e-6)
    # one step at the presets' lr 4.8 moves w by lr * eta * ||w||, a relative step of 0.0048
    torch.testing.assert_close(got, simclr_official(w0, grads[:1], [4.8], 0.9, 1e-6, 0.001), rtol=1e-12, atol=1e-14)
    assert ((got - w0).norm() / w0.norm()).item() == pytest.approx(4.8 * 0.001, rel=1e-9)
    got = run_lars(w0, grads, rates, momentum=0.9, weight_decay=1e-6)
    torch.testing.assert_close(got, simclr_official(w0, grads, rates, 0.9, 1e-6, 0.001), rtol=1e-12, atol=1e-14)
    # with lr outside the momentum (torch SGD's way) the result differs once the rate changes
    assert not torch.allclose(got, lars_reference(w0, grads, rates[-1], 0.9, 1e-6, 0.001), rtol=1e-6)


def test_larc_variant_matches_apex_larc_around_sgd():
    w0, grads, rates = lars_case(1)
    for clip, eta in ((False, 0.001), (True, 0.02)):
        got = run_lars(w0, grads, rates, momentum=0.9, weight_decay=1e-4, eta=eta, variant="larc", clip=clip)
        expected = larc_official(w0, grads, rates, 0.9, 1e-4, eta, clip)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_clipped_rate_never_exceeds_the_schedule():
    # clipping makes the trust ratio itself the layer's rate, capped by lr: a large ratio takes lr, a small one
    # takes the ratio (not lr times it)
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1e-3], dtype=torch.float64)  # r = 0.02 * 5 / 1e-3 = 100 > lr
    LARS([w], lr=0.1, momentum=0.0, eta=0.02, clip=True).step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.1 * 1e-3], dtype=torch.float64))
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 10.0], dtype=torch.float64)  # r = 0.01 < lr
    LARS([w], lr=0.1, momentum=0.0, eta=0.02, clip=True).step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.01 * 10.0], dtype=torch.float64))


def test_build_optimizer_lars_variants_and_exclusions():
    encoder = Encoder()
    optimizer = build_optimizer(
        optim_cfg(name="lars", lars_variant="larc", lars_clip=True, lars_eta=0.02, exclude_norm_bias=False),
        list(encoder.named_parameters()),
        [],
        lr=0.3,
    )
    (group,) = optimizer.param_groups  # SwAV's way: every parameter decayed and adapted
    assert not group["lars_exclude"] and group["variant"] == "larc" and group["clip"] and group["eta"] == 0.02
    optimizer = build_optimizer(optim_cfg(name="lars"), list(encoder.named_parameters()), [], lr=0.3)
    decay, no_decay = optimizer.param_groups  # SimCLR's way: BN and biases neither decayed nor adapted
    assert ids(no_decay["params"]) == ids([encoder.bn.weight, encoder.bn.bias, encoder.fc.bias])
    assert no_decay["lars_exclude"] and no_decay["weight_decay"] == 0.0 and decay["variant"] == "simclr"
    with pytest.raises(ValueError, match="optim.lars_variant='apex'"):
        build_optimizer(optim_cfg(name="lars", lars_variant="apex"), list(encoder.named_parameters()), [], lr=0.3)


def test_step_schedule_drops_by_gamma_at_each_milestone():
    factor = warmup_cosine(
        dummy_optimizer(), warmup_steps=0, total_steps=200, kind="step", milestones=[120, 160]
    ).lr_lambdas[0]
    assert [factor(s) for s in (0, 119, 120, 159, 160, 199)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="optim.milestones"):
        warmup_cosine(dummy_optimizer(), warmup_steps=0, total_steps=10, kind="step")
