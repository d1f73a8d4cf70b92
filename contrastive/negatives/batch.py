"""In-batch negatives (SimCLR; MoCo v3 with a momentum encoder): the other samples of the batch gathered from every
process. No state: the dictionary is the batch, its size the global batch size."""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import Negatives, Views


class BatchNegatives(Negatives):
    every_view_queries = True  # NT-Xent is symmetric by construction

    def loss(
        self, queries: Views, keys: Views, other, index: Tensor, labels: Tensor, logs: dict[str, Tensor]
    ) -> Tensor:
        """A shared encoder: SimCLR's NT-Xent over both views. A momentum encoder: each query against the keys of
        the gathered batch (MoCo v3's choice). Embeddings are gathered with gradient."""
        method = self.method
        offset = dist.rank() * len(labels)
        all_labels = dist.gather(labels)
        temperature = method.cfg.method.temperature
        if method.key_encoder.kind == "shared":
            z1, z2 = queries[0], queries[1]
            loss = losses.gathered_nt_xent(
                z1, z2, dist.gather_with_grad(z1), dist.gather_with_grad(z2), offset, temperature
            )
        else:
            terms = [
                losses.gathered_info_nce(queries[i], dist.gather(keys[1 - i]), offset, temperature) for i in queries
            ]
            loss = torch.stack(terms).mean()
        if method.train_labels is not None:
            same = (labels[:, None] == all_labels[None, :]).float().sum(1) - 1  # minus the sample itself
            logs["false_negative_rate"] = (same / max(len(all_labels) - 1, 1)).mean()
        return loss

    def stats(self) -> dict[str, float]:
        # shared: both views of the other images; momentum: the other images' keys
        views = 2 if self.method.key_encoder.kind == "shared" else 1
        batch = self.method.global_batch_size
        return {"negatives_per_query": float(views * batch - views), "dictionary_size": float(views * batch)}
