"""One LightningModule per strategy, built from ``cfg.method.name`` through the registry :data:`METHODS`.

A new method: its module here (a subclass of :class:`~contrastive.methods.base.ContrastiveMethod`, or of
:class:`~contrastive.methods.base.InstanceDiscrimination` to reuse the key encoders and sources of negatives), its
loss in :mod:`contrastive.losses` if it is new, a preset ``conf/method/<name>.yaml``, and a line below.
"""

from __future__ import annotations

from omegaconf import DictConfig

from contrastive.methods.base import ContrastiveMethod, InstanceDiscrimination
from contrastive.methods.memory_bank import MemoryBankMethod
from contrastive.methods.moco import MoCo
from contrastive.methods.simclr import SimCLR
from contrastive.methods.swav import SwAV

METHODS: dict[str, type[ContrastiveMethod]] = {
    "simclr": SimCLR,
    "memory_bank": MemoryBankMethod,
    "moco": MoCo,
    "swav": SwAV,
}

__all__ = ["METHODS", "ContrastiveMethod", "InstanceDiscrimination", "build_method", "method_class"]


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not known; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: DictConfig, num_train: int) -> ContrastiveMethod:
    return method_class(cfg.method.name)(cfg, num_train)
