"""InstDisc / NPID (Wu et al. 2018): a memory bank with one feature per training image
(:class:`contrastive.negatives.bank.BankNegatives`); negatives are sampled from it, and the query's positive is its
own stored entry when it sees one view."""

from contrastive.methods.base import InstanceDiscrimination


class MemoryBankMethod(InstanceDiscrimination):
    """``key_encoder=shared``, ``negatives=bank``, one view (``conf/method/memory_bank.yaml``): the bank holds
    features written at different steps, which is the survey's "inconsistent dictionary" (measured as
    ``diag/staleness``). ``method.loss=nce`` selects the paper's NCE loss with the normaliser estimated once on the
    first batch (``method.nce_z``); ``method.bank_init`` chooses the bank's start (random, or an encoder pass)."""
