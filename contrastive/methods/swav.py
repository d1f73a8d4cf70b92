"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-balanced prototype codes between crops.

There are no explicit negatives: learnable prototypes are the dictionary
(:class:`contrastive.negatives.prototypes.Prototypes`), and the equipartition constraint of
:func:`contrastive.losses.sinkhorn` keeps the codes from sending every sample to one prototype. Multi-crop: the
``num_views`` large crops give the codes; every crop, small ones included, predicts the codes of the other crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive import losses
from contrastive.methods.base import ContrastiveMethod, StepOutput
from contrastive.negatives.base import Step
from contrastive.negatives.prototypes import FeatureQueue, Prototypes, normalised_entropy

__all__ = ["FeatureQueue", "SwAV", "normalised_entropy"]


class SwAV(ContrastiveMethod):
    family = "clustering"
    negatives_source = "prototypes"
    legacy_names = {"queue.": "prototypes.queue."}
    legacy_method_keys = {"queue_size": "feature_queue_size"}
    collapse_entropy = 0.1  # normalised usage entropy of the codes' argmax below which the codes have collapsed

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.prototypes = Prototypes.from_config(self.cfg)

    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        Prototypes.check(cfg, world_size)

    @classmethod
    def check_with_data(cls, cfg, num_train: int, world_size: int) -> None:
        Prototypes.check_with_data(cfg, num_train, world_size)

    # -- the step --------------------------------------------------------------------------------------------
    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
        m, prototypes = self.cfg.method, self.prototypes
        if not prototypes.frozen(self.global_step):
            prototypes.normalize()
        n, large = len(step.index), m.num_views
        # as SwAV's official model: one backbone call per resolution (its BN statistics over all crops of a size),
        # then one head call over every crop's features (the head's BN statistics over all crops together)
        feats = [self.backbone(torch.cat(views[:large]))]
        if len(views) > large:
            feats.append(self.backbone(torch.cat(views[large:])))
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)
        scores = list(prototypes(z).split(n))
        codes = prototypes.codes([s.detach() for s in scores[:large]], self.current_epoch)
        loss = losses.swapped_prediction(scores, codes, m.temperature)
        prototypes.enqueue(z[: large * n].detach().view(large, n, -1), self.current_epoch)
        prototypes.track(loss, codes)
        return StepOutput(loss=loss, features=feats[0][:n], logs={})

    # -- the prototypes' freeze: the whole first epoch by default ------------------------------------------------
    def on_train_start(self) -> None:
        if self.cfg.method.freeze_prototypes_steps < 0:
            trainer = self.trainer
            self.prototypes.freeze_until = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)

    def on_after_backward(self) -> None:
        # no gradient at all (rather than a zero one): the optimiser then skips the prototypes entirely, so weight
        # decay and momentum cannot move them either
        if self.prototypes.frozen(self.global_step):
            self.prototypes.weight.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken; renormalise only if that step moved the prototypes
        if self.global_step > self.prototypes.freeze_until:
            self.prototypes.normalize()

    # -- signs of collapse (for the one alarm, callbacks.CollapseWatch) and figures --------------------------------
    def collapse_signs(self) -> str | None:
        """This epoch's sign of collapse, or ``None``: the loss at ln(K) (codes near uniform) or the codes' argmax
        on almost one prototype. CollapseWatch calls it before ``on_train_epoch_end`` resets the figures, and warns
        once after ``patience`` such epochs in a row."""
        figures = self.prototypes.epoch_figures()
        if figures is None:
            return None
        loss, entropy = figures
        log_k = math.log(self.cfg.method.num_prototypes)
        if abs(loss - log_k) > 0.01 * log_k and entropy >= self.collapse_entropy:
            return None
        return (
            "SwAV looks collapsed; likely causes: a learning rate too high (optim.lr), a Sinkhorn epsilon too large, "
            "which makes the codes near uniform (method.sinkhorn_epsilon), or a queue started too early "
            f"(method.queue_start_epoch). The loss sat at ln(K)={log_k:.3f} (this epoch {loss:.3f}) or the codes "
            f"used almost one prototype (normalised usage entropy {max(0.0, entropy):.3f})"
        )

    def on_train_epoch_end(self) -> None:
        self.prototypes.end_epoch()

    def dictionary_stats(self) -> dict[str, float]:
        return self.prototypes.stats()
