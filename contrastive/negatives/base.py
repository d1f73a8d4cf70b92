"""The interface of a source of negatives, the context each step hands it, and what the stored sources (bank, queue)
share: the staleness and encoder drift of their entries.

A source is an ``nn.Module`` built from explicit arguments (``from_config`` reads them off the config): it owns its
state as buffers, so checkpoints carry it, and it never sees the method that holds it. Whatever a step or an epoch's
figures need (the batch's indices, the step, the key encoder) arrives as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.errors import require
from contrastive.metrics.diagnostics import false_negative_rate
from contrastive.metrics.drift import DriftProbe

# snapshots per epoch of the views behind written keys, for the drift measure
DRIFT_SLOTS = 16

Views = dict[int, Tensor]  # view number -> [n, D] embeddings of that view
KeyNet = Callable[[Tensor], Tensor]  # transformed images -> keys, BN in eval mode

__all__ = ["DRIFT_SLOTS", "KeyNet", "Negatives", "Probe", "Step", "StoredNegatives", "Views", "positive_of", "require"]


def positive_of(query_view: int, keys: Views) -> Tensor:
    """A query view's positive: the key of the other view of its image (views come in pairs, 0 and 1)."""
    return keys[1 - query_view]


@dataclass(frozen=True)
class Step:
    """One training step as a component sees it."""

    index: Tensor  # training-set indices of this process's batch
    labels: Tensor  # their labels: the false-negative rate reads them, no loss does
    global_step: int
    seed: int
    train_labels: Tensor | None = None  # every training image's label, when the data has labels

    def false_negative_rate(self, negative_index: Tensor) -> Tensor | None:
        """Share of a query's negatives of its own class; ``negative_index`` ``[K]`` or ``[n, K]`` holds training-set
        indices, -1 for an empty slot."""
        if self.train_labels is None:
            return None
        labels = self.train_labels[negative_index.clamp_min(0)].masked_fill(negative_index < 0, -1)
        return false_negative_rate(self.labels, labels)


@dataclass(frozen=True)
class Probe:
    """What a dictionary's figures read once an epoch."""

    key_net: KeyNet
    global_step: int
    steps_per_epoch: int
    global_batch: int
    num_train: int
    images: Tensor | None = None  # a fixed subset of the training images (uint8, untransformed)
    index: Tensor | None = None  # their training-set indices
    transform: Callable[[Tensor], Tensor] | None = None  # images -> the encoder's input (evaluation transform)
    images_of: Callable[[Tensor], Tensor] | None = None  # training-set indices -> those images


class Negatives(nn.Module):
    """A source of negatives for instance discrimination; ``method.negatives=<name>`` picks it from
    :data:`contrastive.negatives.NEGATIVES`.

    ``pairs_only``: every query needs the other view of its image as its positive (a source that stores one entry
    per image can do with one view). ``every_view_queries``: both views query, whatever ``method.symmetric`` says.
    """

    pairs_only = True
    every_view_queries = False
    family: str | None = None  # the survey's architecture a method with this source belongs to

    @classmethod
    def from_config(cls, cfg: Any, num_train: int, shared_keys: bool) -> Negatives:
        """Built from ``cfg.method`` (and the training set's size); ``shared_keys``: the keys come from the query
        encoder itself (with gradient) rather than a momentum copy."""
        raise NotImplementedError

    # -- config checks, before any training (class methods: no model needed) ---------------------------------------
    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        """Rules about this source's keys; raise ConfigError naming the key."""

    @classmethod
    def check_with_data(cls, cfg: Any, num_train: int, world_size: int) -> None:
        """Rules that need the training set's size."""

    # -- the step ------------------------------------------------------------------------------------------------
    def key_views(self, query_views: list[int], num_views: int) -> list[int]:
        """The views whose keys this source reads (each costs a pass of a momentum key encoder)."""
        return list(range(num_views))

    def written_view(self, keys: Views) -> int:
        """The view whose keys the step writes into a stored dictionary (what its drift probe watches)."""
        return 0

    def loss(self, queries: Views, keys: Views, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss, mean over the query views (positives: :func:`positive_of`), and figures to log. May write
        the dictionary once the loss terms are built."""
        raise NotImplementedError

    def on_train_start(self, steps_per_epoch: int) -> None:
        pass

    # -- figures ---------------------------------------------------------------------------------------------
    def stats(self, probe: Probe) -> dict[str, float]:
        """Negatives per query, dictionary size and what else the source measures, once per epoch."""
        return {}


class StoredNegatives(Negatives):
    """A dictionary of keys written at earlier steps (bank, queue): their staleness against the key encoder of now,
    and the encoder drift on the exact views behind them (:class:`DriftProbe`)."""

    def __init__(self, probe_size: int):
        super().__init__()
        self.drift = DriftProbe(slots=DRIFT_SLOTS, rows=max(1, math.ceil(probe_size / DRIFT_SLOTS)))
        self.drift_every: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def negatives_per_query(self) -> int:
        return len(self)

    def drift_window(self, steps_per_epoch: int, global_batch: int) -> int:
        """Steps a key stays in the dictionary."""
        raise NotImplementedError

    def probe_entries(self, probe: Probe) -> tuple[Tensor, Tensor, Tensor] | None:
        """Stored keys of some entries, the step each was written (-1: never), and the images behind them."""
        raise NotImplementedError

    def on_train_start(self, steps_per_epoch: int) -> None:
        self.drift_every = max(1, steps_per_epoch // DRIFT_SLOTS)

    def record_drift(self, global_step: int, view: Tensor, key_net: KeyNet) -> None:
        """A few times per epoch (a fixed step schedule: no device sync), snapshot the view behind the keys just
        written, with its keys now."""
        if self.drift_every is not None and global_step % self.drift_every == 0:
            self.drift.record(global_step, view, key_net)

    @torch.no_grad()
    def stats(self, probe: Probe) -> dict[str, float]:
        """Staleness: the mean cosine between the stored entries of some probe images and the same images encoded
        now by the key encoder (1 = fresh), and the mean age of those entries in steps; then the drift."""
        stats = {"negatives_per_query": float(self.negatives_per_query()), "dictionary_size": float(len(self))}
        entries = self.probe_entries(probe)
        if entries is None:
            return stats
        stored, written, images = entries
        fresh = probe.key_net(probe.transform(images))
        seen = written >= 0
        if seen.any():
            cos = F.cosine_similarity(stored[seen].float(), fresh[seen].float(), dim=1)
            stats["staleness"] = float(cos.mean())
            stats["staleness_age_steps"] = float((probe.global_step - written[seen]).float().mean())
        if self.drift_every is not None:
            stats.update(self.drift_stats(probe))
        return stats

    def drift_stats(self, probe: Probe) -> dict[str, float]:
        """Encoder drift of the stored keys, their age in steps and epochs, and the dictionary's regime: its size
        over the training set's."""
        window = self.drift_window(probe.steps_per_epoch, probe.global_batch)
        stats = self.drift.measure(probe.global_step, probe.key_net, window)
        if stats:
            stats["drift_age_epochs"] = stats["drift_age_steps"] / probe.steps_per_epoch
            stats["drift_window_steps"] = float(window)
        stats["dictionary_ratio"] = len(self) / max(probe.num_train, 1)
        return stats
