"""Optimisers (SGD, AdamW, LARS) with the usual exclusions, and the warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from contrastive.errors import require

OPTIMIZERS = ("sgd", "adamw", "lars")
SCHEDULES = ("cosine", "constant", "step")
LARS_VARIANTS = ("simclr", "larc")


def check_config(o: Any) -> None:
    """The ``optim`` keys, before any training."""
    require(o.name in OPTIMIZERS, f"optim.name={o.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    require(
        o.scheduler in SCHEDULES, f"optim.scheduler={o.scheduler!r} is not known; choose one of {', '.join(SCHEDULES)}"
    )
    require(
        o.scheduler != "step" or len(o.milestones) > 0,
        "optim.scheduler=step needs optim.milestones (the epochs at which the rate drops), e.g. [120, 160]",
    )
    require(
        o.lars_variant in LARS_VARIANTS,
        f"optim.lars_variant={o.lars_variant!r} is not known; choose one of {', '.join(LARS_VARIANTS)}",
    )
    require(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    require(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs} must be >= 0")
    require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    require(o.probe_lr > 0, f"optim.probe_lr={o.probe_lr} must be > 0")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), in the two forms the papers ran.

    ``variant="simclr"`` (SimCLR's official optimiser, the default): ``d = g + wd * w``, trust ratio
    ``r = eta * ||w|| / ||d||``, and the rate enters the momentum: ``v <- m * v + lr * r * d``, ``w <- w - v``.
    ``variant="larc"`` (NVIDIA apex's LARC around SGD, as SwAV and solo-learn run it): ``r = eta * ||w|| /
    (||g|| + wd * ||w|| + eps)``, ``v <- m * v + r * d``, ``w <- w - lr * v``. The two agree step for step while
    the rate is constant, up to the denominator.

    ``clip=False`` (both papers): the layer's rate is ``lr * r``. ``clip=True`` (LARC's clipping mode, solo-learn's
    default, which pairs it with eta 0.02): the layer's rate is ``min(r, lr)``, i.e. ``r`` is itself the local rate,
    capped by the schedule's. ``r`` is 1 where either norm is 0. Groups with ``lars_exclude`` (norm layers and
    biases, as SimCLR excludes them) take plain SGD steps.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        variant: str = "simclr",
        clip: bool = False,
        eps: float = 1e-8,
    ):
        if variant not in LARS_VARIANTS:
            raise ValueError(f"optim.lars_variant={variant!r} is not known; choose one of {', '.join(LARS_VARIANTS)}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
            "variant": variant,
            "clip": clip,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, larc = group["lr"], group["weight_decay"], group["variant"] == "larc"
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=wd) if wd else p.grad
                if group["lars_exclude"]:
                    factor = torch.full((), 1.0 if larc else lr, dtype=p.dtype, device=p.device)
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    if larc:
                        g_norm = torch.linalg.vector_norm(p.grad)
                        denominator = g_norm + wd * w_norm + group["eps"]
                    else:
                        g_norm = torch.linalg.vector_norm(grad)
                        denominator = g_norm
                    # tensors throughout: a Python comparison would sync with the GPU for every parameter
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / denominator, torch.ones_like(w_norm)
                    )
                    if larc:  # the factor on the gradient; SGD multiplies by lr below
                        factor = (trust / lr).clamp(max=1.0) if group["clip"] and lr > 0 else trust
                    else:  # the layer's rate itself, inside the momentum
                        factor = trust.clamp(max=lr) if group["clip"] else lr * trust
                state = self.state[p]
                scaled = grad * factor
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = scaled.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(scaled)
                p.add_(state["momentum_buffer"], alpha=-lr if larc else -1.0)
        return loss


def _is_norm_or_bias(name: str, param: Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    cfg: DictConfig, named_params: list[tuple[str, nn.Parameter]], probe_params: list[nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """Parameter groups: weights (decayed), norms and biases (no decay when ``optim.exclude_norm_bias``), and the
    online probe (its own learning rate, no decay, so it never shapes the encoder)."""
    decay = [p for n, p in named_params if not (cfg.exclude_norm_bias and _is_norm_or_bias(n, p))]
    no_decay = [p for n, p in named_params if cfg.exclude_norm_bias and _is_norm_or_bias(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        {"params": probe_params, "weight_decay": 0.0, "lr": cfg.probe_lr, "lars_exclude": True},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            eta=cfg.lars_eta,
            variant=cfg.get("lars_variant", "simclr"),
            clip=cfg.get("lars_clip", False),
        )
    raise ValueError(f"optim.name={cfg.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    kind: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> LambdaLR:
    """Linear warmup to the base rate, then cosine decay to ``min_ratio`` of it (``kind='constant'``: flat;
    ``kind='step'``: times ``gamma`` at each of the ``milestones`` steps, as InstDisc and MoCo v1 train)."""
    if kind not in SCHEDULES:
        raise ValueError(f"optim.scheduler={kind!r} is not known; choose one of {', '.join(SCHEDULES)}")
    if kind == "step" and not milestones:
        raise ValueError("optim.scheduler=step needs optim.milestones (epochs at which the rate drops)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        if kind == "step":
            return gamma ** sum(step >= m for m in milestones)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
