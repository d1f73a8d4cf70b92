"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): a momentum encoder makes keys, a FIFO queue keeps them."""

from contrastive.methods.instance import InstanceDiscrimination


class MoCo(InstanceDiscrimination):
    """``key_encoder=momentum``, ``negatives=queue``: a large and consistent dictionary, decoupled from the batch.
    ``method=moco_v1``: linear head, T 0.07; ``method=moco_v2``: MLP head without BN, T 0.2, blur; both m 0.999
    constant, as the official code. ``method=moco``: the small-data recipe (m 0.99 on a cosine ramp, BN head)."""
