"""Where negatives come from: one module per source, picked by ``method.negatives``.

* ``batch`` (:mod:`.batch`): the other samples of the gathered batch; no state.
* ``bank`` (:mod:`.bank`): InstDisc/NPID's memory bank, one feature per training image.
* ``queue`` (:mod:`.queue`): MoCo's FIFO of the most recent keys, on the ring buffer (:mod:`.ring`) that SwAV's
  feature queue shares.

SwAV has no explicit negatives: its dictionary, learnable prototypes with Sinkhorn codes and a feature queue on the
same ring buffer, is :mod:`.prototypes`.

Each is an ``nn.Module`` built from explicit arguments, owning its state; per step it gets a
:class:`~contrastive.negatives.base.Step` and returns ``(loss, logs)``. A new source for the instance methods: a
subclass of :class:`~contrastive.negatives.base.Negatives` in its own file, and a line below.
"""

from __future__ import annotations

from contrastive.negatives.bank import BankNegatives, MemoryBank
from contrastive.negatives.base import Negatives, StoredNegatives
from contrastive.negatives.batch import BatchNegatives
from contrastive.negatives.queue import Queue, QueueNegatives
from contrastive.negatives.ring import RingBuffer

NEGATIVES: dict[str, type[Negatives]] = {"batch": BatchNegatives, "bank": BankNegatives, "queue": QueueNegatives}

__all__ = [
    "NEGATIVES",
    "BankNegatives",
    "BatchNegatives",
    "MemoryBank",
    "Negatives",
    "Queue",
    "QueueNegatives",
    "RingBuffer",
    "StoredNegatives",
]
