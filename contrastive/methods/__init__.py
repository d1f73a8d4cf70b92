"""One LightningModule per architecture of the survey, built from ``cfg.method.name``."""

from __future__ import annotations

from omegaconf import DictConfig

from contrastive.methods.base import ContrastiveMethod
from contrastive.methods.memory_bank import MemoryBankMethod
from contrastive.methods.moco import MoCo
from contrastive.methods.simclr import SimCLR
from contrastive.methods.swav import SwAV

METHODS: dict[str, type[ContrastiveMethod]] = {
    "simclr": SimCLR, "memory_bank": MemoryBankMethod, "moco": MoCo, "swav": SwAV,
}


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not known; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: DictConfig, num_train: int) -> ContrastiveMethod:
    return method_class(cfg.method.name)(cfg, num_train)
