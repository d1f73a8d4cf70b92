"""MoCo's queue (He et al. 2020): the most recent keys, the batch's keys enqueued after each step's loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import StoredNegatives, Views, require
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
    """State: ``method.queue`` (:class:`Queue`, ``method.queue_size`` keys)."""

    def __init__(self, method):
        super().__init__(method)
        m = method.cfg.method
        method.queue = Queue(m.queue_size, m.proj_out_dim)

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        m, batch = cfg.method, cfg.data.batch_size
        global_batch = batch * world_size
        require(
            m.queue_size > 0 and m.queue_size % global_batch == 0,
            f"method.queue_size={m.queue_size} must be a positive multiple of the global batch "
            f"({batch} x {world_size} processes = {global_batch}), or the queue is silently truncated",
        )

    @property
    def queue(self) -> Queue:
        return self.method.queue

    def __len__(self) -> int:
        return len(self.queue)

    def key_views(self, query_views, other, num_views) -> list[int]:
        # only the keys opposite the queries: one key pass per step for asymmetric MoCo
        return sorted({other(i) for i in query_views})

    def loss(
        self, queries: Views, keys: Views, other, index: Tensor, labels: Tensor, logs: dict[str, Tensor]
    ) -> Tensor:
        """The queue as it was before this batch is every query's negatives; the new keys are enqueued only after
        all loss terms, so a sample's own key is never its negative (one queue, symmetric or not)."""
        method = self.method
        # no copy of the queue: info_nce normalises it into a new tensor, so the in-place enqueue below cannot touch
        # what the backward pass reads
        terms = [
            losses.info_nce(q, keys[other(i)], self.queue.keys, method.cfg.method.temperature)
            for i, q in queries.items()
        ]
        fnr = method.false_negative_rate(labels, self.queue.index)
        # before the first enqueue the queue holds no sample, the rate is NaN and would make the epoch's mean NaN
        if fnr is not None and method.global_step > 0:
            logs["false_negative_rate"] = fnr
        self.queue.enqueue(dist.gather(keys[self.key_view(keys)].detach()), dist.gather(index), method.global_step)
        return torch.stack(terms).mean()

    @staticmethod
    def key_view(keys: Views) -> int:
        """The view whose keys are enqueued."""
        return 1 if 1 in keys else 0

    def after_loss(self, views: list[Tensor], keys: Views) -> None:
        self.record_drift(views[self.key_view(keys)])

    def drift_window(self, per_epoch: int) -> int:
        return math.ceil(len(self.queue) / self.method.global_batch_size)

    def probe_entries(self):
        method, queue = self.method, self.queue
        filled = (queue.index >= 0).nonzero().squeeze(1)
        if len(filled) == 0:
            return None
        # spread over the ring: the first slots alone are a few batches, their age cycling with ptr
        count = min(len(filled), method.cfg.method.probe_size)
        filled = filled[torch.linspace(0, len(filled) - 1, count, device=method.device).round().long()]
        train_set = method.trainer.datamodule.train_set
        images = torch.stack([train_set[int(i)][0] for i in queue.index[filled].cpu()]).to(method.device)
        return queue.keys[filled], queue.written_at[filled], images
