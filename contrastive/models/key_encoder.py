"""MoCo's key encoder (He et al. 2020): an exponential moving average of the query path, backbone and projection
head, whose keys are encoded with shuffle-BN. ``method.key_encoder=momentum`` puts one in any instance method;
``shared`` uses the query encoder itself, with gradient (SimCLR, InstDisc), and needs no module."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from contrastive import distributed as dist
from contrastive.errors import require

KEY_ENCODERS = ("shared", "momentum")
MOMENTUM_SCHEDULES = ("constant", "cosine")


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class MomentumEncoder(nn.Module):
    """``theta_k <- m * theta_k + (1 - m) * theta_q`` after every optimiser step, over backbone and head; ``m``
    constant (``schedule=constant``, MoCo) or on a cosine ramp to 1 (``cosine``, BYOL's). Starts as a copy of the
    query path given."""

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        momentum: float = 0.999,
        schedule: str = "constant",
        shuffle_bn: bool = True,
        bn_splits: int = 8,
    ):
        super().__init__()
        self.check_values(momentum, schedule)
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.projector = copy.deepcopy(projector).requires_grad_(False)
        self.register_buffer("momentum", torch.tensor(float(momentum)))
        self.base_momentum, self.schedule = float(momentum), schedule
        self.shuffle_bn, self.bn_splits = shuffle_bn, bn_splits

    @classmethod
    def from_config(cls, cfg: Any, backbone: nn.Module, projector: nn.Module) -> MomentumEncoder:
        m = cfg.method
        return cls(backbone, projector, m.momentum, m.momentum_schedule, m.shuffle_bn, m.bn_splits)

    @classmethod
    def check(cls, cfg: Any) -> None:
        cls.check_values(cfg.method.momentum, cfg.method.momentum_schedule)

    @staticmethod
    def check_values(momentum: float, schedule: str) -> None:
        require(0 <= momentum <= 1, f"method.momentum={momentum} must be in [0, 1]")
        require(
            schedule in MOMENTUM_SCHEDULES,
            f"method.momentum_schedule={schedule!r}; choose one of {', '.join(MOMENTUM_SCHEDULES)}",
        )

    def embed(self, x: Tensor) -> Tensor:
        """Keys of ``x``, plainly (no shuffle): the figures' key path."""
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Keys with BN statistics that cannot leak the positive: across processes the batch is shuffled before
        encoding (shuffle-BN); on one process it is shuffled and encoded in ``bn_splits`` sub-batches, so no key
        shares its BN statistics with its own query's batch."""
        if not self.shuffle_bn:
            return self.embed(x)
        if dist.world_size() > 1:
            shuffled, perm = dist.shuffle_across_processes(x)
            return dist.unshuffle_across_processes(self.embed(shuffled), perm)
        perm = torch.randperm(len(x), device=x.device)
        splits = max(1, min(self.bn_splits, len(x) // 2))
        keys = torch.cat([self.embed(chunk) for chunk in x[perm].chunk(splits)])
        return keys[torch.argsort(perm)]

    @torch.no_grad()
    def update(self, backbone: nn.Module, projector: nn.Module, progress: float) -> None:
        """The EMA step towards the query path, then ``m`` for the next one (``progress``: the fraction of training
        done). Parameters only, as MoCo's builder.py: the key encoder's BN running statistics are its own, from its
        own forward passes."""
        # m stays on the device: reading it as a Python number would sync with the GPU every step
        weight = 1 - self.momentum
        for q_mod, k_mod in ((backbone, self.backbone), (projector, self.projector)):
            q_params, k_params = list(q_mod.parameters()), list(k_mod.parameters())
            torch._foreach_lerp_(k_params, q_params, [weight] * len(k_params))
        if self.schedule == "cosine":
            self.momentum.fill_(cosine_ramp(self.base_momentum, 1.0, progress))
