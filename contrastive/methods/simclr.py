"""SimCLR (Chen et al. 2020): end to end. Both views go through the one encoder, with gradient; a view's negatives
are the other 2N-2 views of the batch gathered from every process (NT-Xent, :func:`contrastive.losses.nt_xent`).
The dictionary is the batch, so its size is the batch size."""

from __future__ import annotations

from torch import Tensor

from contrastive.methods.base import InstanceDiscrimination, StepOutput
from contrastive.negatives.base import Step
from contrastive.negatives.batch import BatchNegatives


class SimCLR(InstanceDiscrimination):
    """``method.joint_views=true`` encodes both views as one batch, as the official code does, so BN statistics span
    all 2N images (``conf/method/simclr.yaml``)."""

    family = "end-to-end"
    negatives_source = "batch"
    cell = ("shared", "batch")

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.key_encoder = None  # the keys are the other view's embeddings, from this encoder
        self.negatives = BatchNegatives(self.cfg.method.temperature, shared_keys=True)

    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
        feats, z = self.embed_queries(views, [0, 1])  # every view is a query, and the key of the other
        loss, logs = self.negatives.loss(z, z, step)
        return StepOutput(loss=loss, features=feats[0], logs=logs)
