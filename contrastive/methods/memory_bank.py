"""InstDisc / NPID (Wu et al. 2018): a memory bank with one feature per training image
(:class:`contrastive.negatives.bank.BankNegatives`); negatives are sampled from it, and with one view (the paper's
setting) the query's positive is its own stored entry. The bank then takes the step's features with momentum."""

from __future__ import annotations

from torch import Tensor

from contrastive.methods.base import InstanceDiscrimination, StepOutput
from contrastive.negatives.bank import BankNegatives
from contrastive.negatives.base import Step


class MemoryBankMethod(InstanceDiscrimination):
    """The bank holds features written at different steps: the survey's "inconsistent dictionary", measured as
    ``diag/staleness`` and ``diag/drift``. ``method.loss=nce`` selects the paper's NCE loss;
    ``method.bank_init`` chooses the bank's start, random or an encoder pass (``conf/method/memory_bank.yaml``)."""

    family = "memory bank"
    negatives_source = "bank"
    cell = ("shared", "bank")

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.key_encoder = None  # the bank stores this encoder's own features
        self.negatives = BankNegatives.from_config(self.cfg, num_train, shared_keys=True)

    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
        query_views = [0, 1] if len(views) == 2 and self.cfg.method.symmetric else [0]
        feats, queries = self.embed_queries(views, query_views)
        # the bank takes view 0's features; with two views, view 1's are the positive of view 0
        keys = {i: queries[i] if i in queries else self.embed(views[i])[1] for i in range(len(views))}
        loss, logs = self.negatives.loss(queries, keys, step)
        self.record_drift(step, views[0])
        return StepOutput(loss=loss, features=feats[0], logs=logs)
