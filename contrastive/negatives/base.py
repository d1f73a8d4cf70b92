"""What a source of negatives provides to an instance-discrimination method (:class:`InstanceDiscrimination` in
``contrastive.methods.base``), and what the stored sources (bank, queue) share: the staleness and encoder drift of
their entries.

A source is a component of its method rather than an ``nn.Module`` of its own: its state (a ``MemoryBank``, a
``Queue``, the NCE normaliser ``log_z``) is registered on the method under the names checkpoints have always carried
(``bank.features``, ``queue.keys``, ``log_z``), so every checkpoint written before the split still loads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.errors import ConfigError
from contrastive.metrics.drift import DriftProbe

if TYPE_CHECKING:
    from contrastive.methods.base import InstanceDiscrimination

# snapshots per epoch of the views behind written keys, for the drift measure
DRIFT_SLOTS = 16

Views = dict[int, Tensor]  # view number -> [n, D] embeddings of that view


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class Negatives:
    """A source of negatives: its state, its loss terms (through :mod:`contrastive.losses`), its figures and its
    config checks. ``method.negatives=<name>`` picks it from :data:`contrastive.negatives.NEGATIVES`."""

    one_view = False  # a query can learn from one view: its positive is stored in the dictionary
    every_view_queries = False  # every view queries, whatever method.symmetric says

    def __init__(self, method: InstanceDiscrimination):
        self.method = method

    # -- config checks, before any training (class methods: no model needed) ---------------------------------------
    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        """Rules about this source's keys; raise ConfigError naming the key."""

    @classmethod
    def check_with_data(cls, cfg: Any, num_train: int, world_size: int) -> None:
        """Rules that need the training set's size."""

    # -- the step ------------------------------------------------------------------------------------------------
    def key_views(self, query_views: list[int], other: Callable[[int], int], num_views: int) -> list[int]:
        """The views a momentum key encoder must encode this step (each costs a forward pass)."""
        return list(range(num_views))

    def loss(
        self,
        queries: Views,
        keys: Views,
        other: Callable[[int], int],
        index: Tensor,
        labels: Tensor,
        logs: dict[str, Tensor],
    ) -> Tensor:
        """The step's loss, mean over the query views; ``keys[other(i)]`` is query view i's positive. May write
        the dictionary after the loss terms are built; may add figures to ``logs``."""
        raise NotImplementedError

    def after_loss(self, views: list[Tensor], keys: Views) -> None:
        """Called after :meth:`loss` with the step's views (for the drift probe)."""

    def on_train_start(self) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        pass

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        pass

    def on_load_state(self, state_dict: dict, prefix: str) -> None:
        """Before the method's own tensors load from ``state_dict`` (names under ``prefix``)."""

    # -- figures ---------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Negatives per query, dictionary size and what else the source measures, once per epoch."""
        return {}


class StoredNegatives(Negatives):
    """A dictionary of keys written at earlier steps (bank, queue): their staleness against the key encoder of now,
    and the encoder drift on the exact views behind them (:class:`DriftProbe`)."""

    def __init__(self, method: InstanceDiscrimination):
        super().__init__(method)
        rows = max(1, math.ceil(method.cfg.method.probe_size / DRIFT_SLOTS))
        self.drift = DriftProbe(slots=DRIFT_SLOTS, rows=rows)
        self.drift_every: int | None = None

    # what a stored source tells the shared figures
    def __len__(self) -> int:
        raise NotImplementedError

    def negatives_per_query(self) -> int:
        return len(self)

    def drift_window(self, per_epoch: int) -> int:
        """Steps a key stays in the dictionary."""
        raise NotImplementedError

    def probe_entries(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Stored keys of some entries, the step each was written (-1: never), and the images behind them."""
        raise NotImplementedError

    def on_train_start(self) -> None:
        method = self.method
        total = max(int(method.trainer.estimated_stepping_batches), 1)
        self.drift_every = max(1, method.steps_per_epoch(total) // DRIFT_SLOTS)

    def record_drift(self, view: Tensor) -> None:
        """A few times per epoch (a fixed step schedule: no device sync), snapshot the view behind the keys just
        written, with its keys now."""
        step = self.method.global_step
        if self.drift_every is not None and step % self.drift_every == 0:
            self.drift.record(step, view, self.method.eval_key_net)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["drift_probe"] = self.drift.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "drift_probe" in checkpoint:  # older checkpoints start it empty
            self.drift.load_state_dict(checkpoint["drift_probe"])

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Staleness: the mean cosine between the stored entries of some probe images and the same images encoded
        now by the key encoder (1 = fresh), and the mean age of those entries in steps; then the drift."""
        method = self.method
        stats = {"negatives_per_query": float(self.negatives_per_query()), "dictionary_size": float(len(self))}
        probe = self.probe_entries()
        if probe is None:
            return stats
        stored, written, images = probe
        was_training = method.training
        method.eval()
        fresh = method.key_net(method.eval_transform(images))
        method.train(was_training)
        seen = written >= 0
        if seen.any():
            cos = F.cosine_similarity(stored[seen].float(), fresh[seen].float(), dim=1)
            stats["staleness"] = float(cos.mean())
            stats["staleness_age_steps"] = float((method.global_step - written[seen]).float().mean())
        if self.drift_every is not None:
            stats.update(self.drift_stats())
        return stats

    def drift_stats(self) -> dict[str, float]:
        """Encoder drift of the stored keys, their age in steps and epochs, and the regime: the dictionary's size
        over the training set's."""
        method = self.method
        per_epoch = method.steps_per_epoch(max(int(method.trainer.estimated_stepping_batches), 1))
        window = self.drift_window(per_epoch)
        stats = self.drift.measure(method.global_step, method.eval_key_net, window)
        if stats:
            stats["drift_age_epochs"] = stats["drift_age_steps"] / per_epoch
            stats["drift_window_steps"] = float(window)
        stats["dictionary_ratio"] = len(self) / max(method.num_train, 1)
        return stats
