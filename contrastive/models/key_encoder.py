"""The key encoder of instance discrimination, picked by ``method.key_encoder``:

* ``shared``: the query encoder itself, gradients through every view (SimCLR, InstDisc);
* ``momentum``: an exponential moving average of the query path, backbone and projection head (MoCo), its keys
  encoded with shuffle-BN.

Like a source of negatives, a key encoder is a component of its method: the momentum copy is registered on the
method as ``key_backbone``, ``key_projector`` and ``momentum``, the names its checkpoints and exports carry.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from contrastive import distributed as dist
from contrastive.errors import ConfigError

if TYPE_CHECKING:
    from contrastive.methods.base import InstanceDiscrimination


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class SharedKeyEncoder:
    kind = "shared"

    def __init__(self, method: InstanceDiscrimination):
        self.method = method

    @classmethod
    def check(cls, cfg: Any) -> None:
        pass

    def nets(self) -> tuple[nn.Module, nn.Module]:
        return self.method.backbone, self.method.projector

    def keys(self, views: list[Tensor], wanted: list[int], queries: dict[int, Tensor]) -> dict[int, Tensor]:
        """Every view's embedding, with gradient; the queries' own are reused."""
        return {i: queries[i] if i in queries else self.method.embed(views[i])[1] for i in range(len(views))}

    def after_step(self) -> None:
        pass


class MomentumEncoder(SharedKeyEncoder):
    """``theta_k <- m * theta_k + (1 - m) * theta_q`` after every optimiser step, over backbone and head; ``m``
    constant (``method.momentum_schedule=constant``, MoCo) or on a cosine ramp to 1 (``cosine``, BYOL's)."""

    kind = "momentum"

    def __init__(self, method: InstanceDiscrimination):
        super().__init__(method)
        method.key_backbone = copy.deepcopy(method.backbone).requires_grad_(False)
        method.key_projector = copy.deepcopy(method.projector).requires_grad_(False)
        method.register_buffer("momentum", torch.tensor(float(method.cfg.method.momentum)))

    @classmethod
    def check(cls, cfg: Any) -> None:
        m = cfg.method
        if not 0 <= m.momentum <= 1:
            raise ConfigError(f"method.momentum={m.momentum} must be in [0, 1]")

    def nets(self) -> tuple[nn.Module, nn.Module]:
        return self.method.key_backbone, self.method.key_projector

    @torch.no_grad()
    def update(self) -> None:
        """The EMA step. Parameters only, as MoCo's builder.py: the key encoder's BN running statistics are its
        own, from its own forward passes."""
        method = self.method
        # m stays on the device: reading it as a Python number would sync with the GPU every step
        weight = 1 - method.momentum
        for q_mod, k_mod in ((method.backbone, method.key_backbone), (method.projector, method.key_projector)):
            q_params, k_params = list(q_mod.parameters()), list(k_mod.parameters())
            torch._foreach_lerp_(k_params, q_params, [weight] * len(k_params))

    def after_step(self) -> None:
        self.update()
        m = self.method.cfg.method
        if m.momentum_schedule == "cosine":
            self.method.momentum.fill_(cosine_ramp(m.momentum, 1.0, self.method.progress()))

    def keys(self, views: list[Tensor], wanted: list[int], queries: dict[int, Tensor]) -> dict[int, Tensor]:
        return {i: self.encode(views[i]) for i in wanted}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Keys with BN statistics that cannot leak the positive: across processes the batch is shuffled before
        encoding (shuffle-BN); on one process it is shuffled and encoded in ``bn_splits`` sub-batches, so no key
        shares its BN statistics with its own query's batch."""
        method, m = self.method, self.method.cfg.method
        net = lambda v: method.key_projector(method.key_backbone(v))
        if not m.shuffle_bn:
            return net(x)
        if dist.world_size() > 1:
            shuffled, perm = dist.shuffle_across_processes(x)
            return dist.unshuffle_across_processes(net(shuffled), perm)
        perm = torch.randperm(len(x), device=x.device)
        splits = max(1, min(m.bn_splits, len(x) // 2))
        keys = torch.cat([net(chunk) for chunk in x[perm].chunk(splits)])
        return keys[torch.argsort(perm)]


KEY_ENCODERS: dict[str, type[SharedKeyEncoder]] = {"shared": SharedKeyEncoder, "momentum": MomentumEncoder}
