"""SimCLR (Chen et al. 2020): end-to-end; negatives are the other 2N-2 views of the globally gathered batch."""

from contrastive.methods.instance import InstanceDiscrimination


class SimCLR(InstanceDiscrimination):
    """``key_encoder=shared``, ``negatives=batch``: the dictionary is the batch, so its size is the batch size."""
