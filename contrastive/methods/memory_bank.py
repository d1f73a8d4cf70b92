"""InstDisc / NPID (Wu et al. 2018): a memory bank with one feature per training image; negatives sampled from it."""

from contrastive.methods.instance import InstanceDiscrimination


class MemoryBankMethod(InstanceDiscrimination):
    """``key_encoder=shared``, ``negatives=bank``: the bank holds features written at different steps, which is the
    survey's "inconsistent dictionary" (measured as ``diag/staleness``). ``method.loss=nce`` selects the paper's
    NCE loss with the normaliser estimated once on the first batch (``method.nce_z``)."""
