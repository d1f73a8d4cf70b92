"""MoCo's queue (He et al. 2020): the most recent keys, the batch's keys enqueued after each step's loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import Probe, Step, StoredNegatives, Views, positive_of, require
from contrastive.negatives.ring import RingBuffer


class Queue(RingBuffer):
    """FIFO of the last K keys, with the index and step of the sample behind each key. The indices make the
    dictionary measurable (staleness, false negatives); the loss never reads them. Written identically on every
    process (writes are gathered first), so DDP never needs to broadcast it."""

    def __init__(self, size: int, dim: int):
        super().__init__(
            {
                "keys": F.normalize(torch.randn(size, dim), dim=1),
                "index": torch.full((size,), -1, dtype=torch.long),
                "written_at": torch.full((size,), -1, dtype=torch.long),
            }
        )

    def __len__(self) -> int:
        return self.capacity

    def enqueue(self, keys: Tensor, index: Tensor, step: int) -> None:
        """Replace the oldest ``len(keys)`` entries."""
        self.write(keys=F.normalize(keys.float(), dim=1), index=index, written_at=step)


class QueueNegatives(StoredNegatives):
    """Every query's negatives are the whole queue as it stood before this step."""

    family = "momentum queue"  # the survey's architecture this source makes

    def __init__(self, size: int, dim: int, temperature: float, probe_size: int = 256):
        super().__init__(probe_size)
        self.temperature, self.probe_size = temperature, probe_size
        self.queue = Queue(size, dim)

    @classmethod
    def from_config(cls, cfg: Any, num_train: int, shared_keys: bool) -> QueueNegatives:
        m = cfg.method
        return cls(m.queue_size, m.proj_out_dim, m.temperature, m.probe_size)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        m, batch = cfg.method, cfg.data.batch_size
        global_batch = batch * world_size
        require(
            m.queue_size > 0 and m.queue_size % global_batch == 0,
            f"method.queue_size={m.queue_size} must be a positive multiple of the global batch "
            f"({batch} x {world_size} processes = {global_batch}), or the queue is silently truncated",
        )

    def __len__(self) -> int:
        return len(self.queue)

    def key_views(self, query_views: list[int], num_views: int) -> list[int]:
        # only the keys opposite the queries: one key pass per step for asymmetric MoCo
        return sorted({1 - i for i in query_views})

    def written_view(self, keys: Views) -> int:
        return 1 if 1 in keys else 0

    def loss(self, queries: Views, keys: Views, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """The queue as it was before this batch is every query's negatives; the new keys are enqueued only after
        all loss terms, so a sample's own key is never its negative (one queue, symmetric or not)."""
        # no copy of the queue: info_nce normalises it into a new tensor, so the in-place enqueue below cannot touch
        # what the backward pass reads
        terms = [
            losses.info_nce(q, positive_of(i, keys), self.queue.keys, self.temperature) for i, q in queries.items()
        ]
        logs = {}
        fnr = step.false_negative_rate(self.queue.index)
        # before the first enqueue the queue holds no sample, the rate is NaN and would make the epoch's mean NaN
        if fnr is not None and step.global_step > 0:
            logs["false_negative_rate"] = fnr
        written = keys[self.written_view(keys)].detach()
        self.queue.enqueue(dist.gather(written), dist.gather(step.index), step.global_step)
        return torch.stack(terms).mean(), logs

    def drift_window(self, steps_per_epoch: int, global_batch: int) -> int:
        return math.ceil(len(self.queue) / global_batch)

    def probe_entries(self, probe: Probe):
        queue = self.queue
        filled = (queue.index >= 0).nonzero().squeeze(1)
        if len(filled) == 0 or probe.images_of is None:
            return None
        # spread over the ring: the first slots alone are a few batches, their age cycling with ptr
        count = min(len(filled), self.probe_size)
        filled = filled[torch.linspace(0, len(filled) - 1, count, device=filled.device).round().long()]
        return queue.keys[filled], queue.written_at[filled], probe.images_of(queue.index[filled].cpu())
