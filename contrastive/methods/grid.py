"""Any cell of the instance-discrimination grid: a key path (``method.key_encoder``: shared | momentum) crossed with a
source of negatives (``method.negatives``: batch | bank | queue or any registered source). The named methods are
three of its cells, each written out in its own file; a named method asked for another cell
(``method=simclr method.key_encoder=momentum``: MoCo v3's in-batch keys) trains as this class, under its own name."""

from __future__ import annotations

from torch import Tensor

from contrastive.methods.base import InstanceDiscrimination, StepOutput
from contrastive.models.key_encoder import MomentumEncoder
from contrastive.negatives import NEGATIVES
from contrastive.negatives.base import Step


class GridMethod(InstanceDiscrimination):
    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        m = self.cfg.method
        momentum = m.key_encoder == "momentum"
        self.negatives_source = m.negatives
        self.key_encoder = MomentumEncoder.from_config(self.cfg, self.backbone, self.projector) if momentum else None
        self.negatives = NEGATIVES[m.negatives].from_config(self.cfg, num_train, shared_keys=not momentum)
        self.family = self.negatives.family  # the survey sorts by where the negatives come from

    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
        pair = len(views) == 2
        symmetric = (pair and self.cfg.method.symmetric) or self.negatives.every_view_queries
        query_views = [0, 1] if symmetric else [0]
        feats, queries = self.embed_queries(views, query_views)
        if self.key_encoder is None:  # every view's embedding, with gradient; the queries' own are reused
            keys = {i: queries[i] if i in queries else self.embed(views[i])[1] for i in range(len(views))}
        else:
            keys = {i: self.key_encoder(views[i]) for i in self.negatives.key_views(query_views, len(views))}
        loss, logs = self.negatives.loss(queries, keys, step)
        self.record_drift(step, views[self.negatives.written_view(keys)])
        return StepOutput(loss=loss, features=feats[0], logs=logs)
