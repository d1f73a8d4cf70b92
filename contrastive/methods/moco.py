"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): keys from a momentum encoder
(:class:`contrastive.models.key_encoder.MomentumEncoder`, with shuffle-BN), negatives from a FIFO queue of past keys
(:class:`contrastive.negatives.queue.QueueNegatives`), InfoNCE (:func:`contrastive.losses.info_nce`)."""

from __future__ import annotations

from torch import Tensor

from contrastive.methods.base import InstanceDiscrimination, StepOutput
from contrastive.models.key_encoder import MomentumEncoder
from contrastive.negatives.base import Step
from contrastive.negatives.queue import QueueNegatives


class MoCo(InstanceDiscrimination):
    """A large and consistent dictionary, decoupled from the batch. Asymmetric by default (``method.symmetric=false``:
    one query view, one key pass per step; ``true``: both views query, as MoCo v3 and lightly's CIFAR-10 benchmark).
    The momentum update follows every optimiser step (``on_train_batch_end``)."""

    family = "momentum queue"
    negatives_source = "queue"
    cell = ("momentum", "queue")

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.key_encoder = MomentumEncoder.from_config(self.cfg, self.backbone, self.projector)
        self.negatives = QueueNegatives.from_config(self.cfg, num_train, shared_keys=False)

    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
        query_views = [0, 1] if self.cfg.method.symmetric else [0]
        feats, queries = self.embed_queries(views, query_views)
        keys = {i: self.key_encoder(views[i]) for i in sorted({1 - q for q in query_views})}  # no gradient
        loss, logs = self.negatives.loss(queries, keys, step)  # then the keys of view 1 join the queue
        self.record_drift(step, views[self.negatives.written_view(keys)])
        return StepOutput(loss=loss, features=feats[0], logs=logs)
