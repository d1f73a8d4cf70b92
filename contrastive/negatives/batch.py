"""In-batch negatives (SimCLR; MoCo v3 with a momentum encoder): the other samples of the batch gathered from every
process. No state: the dictionary is the batch, its size the global batch size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import Negatives, Probe, Step, Views, positive_of


class BatchNegatives(Negatives):
    family = "end-to-end"  # the survey's architecture this source makes
    every_view_queries = True  # NT-Xent is symmetric by construction

    def __init__(self, temperature: float, shared_keys: bool = True):
        super().__init__()
        self.temperature, self.shared_keys = temperature, shared_keys

    @classmethod
    def from_config(cls, cfg: Any, num_train: int, shared_keys: bool) -> BatchNegatives:
        return cls(cfg.method.temperature, shared_keys)

    def loss(self, queries: Views, keys: Views, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """Shared keys: SimCLR's NT-Xent over both views. Momentum keys: each query against the keys of the gathered
        batch (MoCo v3's choice). Embeddings are gathered with gradient."""
        offset = dist.rank() * len(step.labels)
        all_labels = dist.gather(step.labels)
        if self.shared_keys:
            z1, z2 = queries[0], queries[1]
            all_z1, all_z2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
            loss = losses.gathered_nt_xent(z1, z2, all_z1, all_z2, offset, self.temperature)
        else:
            terms = [
                losses.gathered_info_nce(q, dist.gather(positive_of(i, keys)), offset, self.temperature)
                for i, q in queries.items()
            ]
            loss = torch.stack(terms).mean()
        logs = {}
        if step.train_labels is not None:
            same = (step.labels[:, None] == all_labels[None, :]).float().sum(1) - 1  # minus the sample itself
            logs["false_negative_rate"] = (same / max(len(all_labels) - 1, 1)).mean()
        return loss, logs

    def stats(self, probe: Probe) -> dict[str, float]:
        # shared: both views of the other images; momentum: the other images' keys
        views = 2 if self.shared_keys else 1
        return {
            "negatives_per_query": float(views * probe.global_batch - views),
            "dictionary_size": float(views * probe.global_batch),
        }
