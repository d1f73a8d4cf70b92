"""One LightningModule per strategy, built from ``cfg.method.name`` through the registry :data:`METHODS`.

A new method: its module here (a subclass of :class:`~contrastive.methods.base.ContrastiveMethod`, or of
:class:`~contrastive.methods.base.InstanceDiscrimination` to reuse the key encoder and the sources of negatives, with
its ``family``), its loss in :mod:`contrastive.losses` if it is new, its preset ``conf/method/<name>.yaml`` (which
every comparison then sweeps), and a line below.
"""

from __future__ import annotations

from omegaconf import DictConfig

from contrastive.errors import ConfigError
from contrastive.methods.base import FAMILIES, ContrastiveMethod, InstanceDiscrimination
from contrastive.methods.grid import GridMethod
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

__all__ = [
    "FAMILIES",
    "METHODS",
    "ContrastiveMethod",
    "GridMethod",
    "InstanceDiscrimination",
    "build_method",
    "method_class",
]


def method_class(method: DictConfig) -> type[ContrastiveMethod]:
    """The class that trains ``cfg.method``: the named method, or, for a named instance method asked for another cell
    of the grid (its ``key_encoder`` or ``negatives`` changed), :class:`GridMethod`."""
    name = method.name
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not known; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    cell = getattr(cls, "cell", None)
    if cell is not None and (method.get("key_encoder"), method.get("negatives")) != cell:
        return GridMethod
    return cls


def build_method(cfg: DictConfig, num_train: int) -> ContrastiveMethod:
    return method_class(cfg.method)(cfg, num_train)
