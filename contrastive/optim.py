"""Optimisers (SGD, AdamW, LARS) with the usual exclusions, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("sgd", "adamw", "lars")
SCHEDULES = ("cosine", "constant")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as SimCLR trains large batches.

    Each parameter's decayed gradient ``d = g + wd * w`` is scaled by ``eta * ||w|| / ||d||`` (1 where either norm
    is 0); groups with ``lars_exclude`` (norm layers and biases) take plain SGD steps.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
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
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    raise ValueError(f"optim.name={cfg.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
    kind: str = "cosine",
) -> LambdaLR:
    """Linear warmup to the base rate, then cosine decay to ``min_ratio`` of it (``kind='constant'``: flat)."""
    if kind not in SCHEDULES:
        raise ValueError(f"optim.scheduler={kind!r} is not known; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
