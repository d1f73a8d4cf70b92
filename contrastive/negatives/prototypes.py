"""SwAV's dictionary (Caron et al. 2020): learnable prototypes instead of explicit negatives, the Sinkhorn-balanced
codes of the batch against them (:func:`contrastive.losses.sinkhorn`), and the feature queue that enlarges the set
Sinkhorn balances when batches are small; their usage (the collapse check's figures) and their config checks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive import losses
from contrastive.errors import ConfigWarning
from contrastive.negatives.base import require
from contrastive.negatives.ring import RingBuffer


class FeatureQueue(RingBuffer):
    """This process's FIFO of past large-crop embeddings, one row of ``size`` slots per large crop; ``filled``
    counts written slots."""

    def __init__(self, crops: int, size: int, dim: int):
        super().__init__({"features": torch.zeros(crops, size, dim)}, slot_dim=1, count_filled=True)

    @property
    def size(self) -> int:
        return self.capacity

    def enqueue(self, embeddings: Tensor) -> None:
        """``embeddings`` ``[crops, n, D]`` replace each row's oldest ``n`` slots."""
        self.write(features=embeddings)


def normalised_entropy(counts: Tensor) -> Tensor:
    """Entropy of the distribution ``counts / counts.sum()`` divided by ``ln(len(counts))``: 1 = uniform usage,
    0 = a single bin."""
    p = counts.double() / counts.sum().clamp_min(1)
    return -torch.special.xlogy(p, p).sum() / math.log(len(counts))


class Prototypes(nn.Module):
    """``num`` unit-length prototypes (no bias, as the official code), the scores ``z @ C^T`` of unit embeddings
    against them, their Sinkhorn codes, and the optional per-process feature queue (``queue_size`` slots per large
    crop, used from ``queue_start_epoch`` on once full). Frozen for the first ``freeze_steps`` optimiser steps."""

    def __init__(
        self,
        dim: int,
        num: int,
        epsilon: float = 0.05,
        iterations: int = 3,
        crops: int = 2,
        queue_size: int = 0,
        queue_start_epoch: int = 0,
        freeze_steps: int = 0,
    ):
        super().__init__()
        self.check_values(num, epsilon, iterations)
        self.epsilon, self.iterations, self.queue_start_epoch = epsilon, iterations, queue_start_epoch
        weight = torch.empty(num, dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # as nn.Linear starts its weight
        self.weight = nn.Parameter(weight)
        self.queue = FeatureQueue(crops, queue_size, dim) if queue_size > 0 else None
        self.normalize()
        self.freeze_until = max(int(freeze_steps), 0)
        self.usage: Tensor | None = None
        self.loss_sum: Tensor | None = None
        self.loss_steps = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Prototypes:
        m = cfg.method
        cls.check_sizes(cfg)
        return cls(
            m.proj_out_dim,
            m.num_prototypes,
            m.sinkhorn_epsilon,
            m.sinkhorn_iterations,
            m.num_views,
            m.feature_queue_size,
            m.queue_start_epoch,
            m.freeze_prototypes_steps,
        )

    def __len__(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight)

    # -- config checks -----------------------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        m = cfg.method
        cls.check_values(m.num_prototypes, m.sinkhorn_epsilon, m.sinkhorn_iterations)
        cls.check_sizes(cfg)

    @staticmethod
    def check_values(num: int, epsilon: float, iterations: int) -> None:
        require(num >= 2, f"method.num_prototypes={num} must be >= 2")
        require(
            epsilon > 0 and iterations >= 1,
            f"method.sinkhorn_epsilon={epsilon} must be > 0 and method.sinkhorn_iterations={iterations} >= 1",
        )

    @staticmethod
    def check_sizes(cfg: Any) -> None:
        """Also run when the model is built (tests and tools build it without the config checks)."""
        m, batch = cfg.method, cfg.data.batch_size
        require(
            m.num_views + m.num_small_views >= 2,
            f"method.num_views={m.num_views} + method.num_small_views={m.num_small_views}: "
            "swapped prediction needs at least 2 crops",
        )
        require(
            m.feature_queue_size >= 0 and m.feature_queue_size % batch == 0,
            f"method.feature_queue_size={m.feature_queue_size} must be 0 (no queue) or a positive multiple of "
            f"data.batch_size={batch} (the queue is per process), or entries are silently dropped",
        )

    @classmethod
    def check_with_data(cls, cfg: Any, num_train: int, world_size: int) -> None:
        m = cfg.method
        if m.num_prototypes > num_train // 2:
            warnings.warn(
                f"method.num_prototypes={m.num_prototypes} for {num_train} training images: with more than one "
                f"prototype per two images the equipartitioned codes cannot group images; use at most "
                f"{num_train // 2} (about 10x the number of classes works on small data)",
                ConfigWarning,
                stacklevel=4,
            )

    # -- unit length, frozen for a while -----------------------------------------------------------------------
    @torch.no_grad()
    def normalize(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def frozen(self, global_step: int) -> bool:
        """Whether the coming optimiser step leaves the prototypes where they are."""
        return global_step < self.freeze_until

    # -- codes and the queue -------------------------------------------------------------------------------------
    def queue_active(self, epoch: int) -> bool:
        return self.queue is not None and epoch >= self.queue_start_epoch and self.queue.full

    @torch.no_grad()
    def codes(self, scores: list[Tensor], epoch: int) -> list[Tensor]:
        """Sinkhorn codes of each large crop's scores ``[n, K]``; with the queue active, the queue's scores against
        the current prototypes join the balanced set and only the batch's rows are kept. In float32 whatever the
        autocast: exponentials at ``1 / epsilon`` do not survive half precision."""
        use_queue = self.queue_active(epoch)
        prototypes = self.weight.detach().float()
        out = []
        with torch.autocast(device_type=scores[0].device.type, enabled=False):
            for i, batch_scores in enumerate(scores):
                s = batch_scores.float()
                if use_queue:
                    s = torch.cat([self.queue.features[i].float() @ prototypes.T, s])
                out.append(losses.sinkhorn(s, self.epsilon, self.iterations)[-len(batch_scores) :])
        return out

    def enqueue(self, large: Tensor, epoch: int) -> None:
        """The large crops' embeddings ``[crops, n, D]``, from ``queue_start_epoch`` on, as the official code
        creates the queue then: it is used once full, so its first use holds no embedding from before that epoch."""
        if self.queue is not None and epoch >= self.queue_start_epoch:
            self.queue.enqueue(large)

    # -- usage, for the collapse check and the figures -------------------------------------------------------------
    @torch.no_grad()
    def track(self, loss: Tensor, codes: list[Tensor]) -> None:
        """Accumulate, on the device, the epoch's loss and how often each prototype is a code's argmax."""
        assigned = torch.cat(codes).argmax(1)
        if self.usage is None or self.usage.device != assigned.device:
            self.usage = torch.zeros(len(self), device=assigned.device)
            self.loss_sum = torch.zeros((), device=assigned.device)
            self.loss_steps = 0
        # scatter_add rather than bincount: bincount reads the maximum back to the host on a GPU
        self.usage.scatter_add_(0, assigned, torch.ones_like(assigned, dtype=self.usage.dtype))
        self.loss_sum += loss.detach().float()
        self.loss_steps += 1

    def entropy(self) -> float | None:
        """Normalised entropy of this epoch's prototype usage (argmax of the codes); ``None`` before a step."""
        return None if self.usage is None else float(normalised_entropy(self.usage))

    def epoch_figures(self) -> tuple[float, float] | None:
        """The epoch's mean loss and usage entropy so far (one host sync); ``None`` without a step."""
        if self.usage is None or self.loss_steps == 0:
            return None
        return float(self.loss_sum) / self.loss_steps, self.entropy()

    def end_epoch(self) -> None:
        """A fresh count for the next epoch."""
        self.usage, self.loss_sum, self.loss_steps = None, None, 0

    def stats(self) -> dict[str, float]:
        """K entries, no explicit negatives; plus their usage entropy."""
        stats = {"negatives_per_query": 0.0, "dictionary_size": float(len(self))}
        entropy = self.entropy()
        if entropy is not None:
            stats["prototype_entropy"] = entropy
        return stats
