"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): a momentum encoder makes keys, a FIFO queue keeps them."""

from contrastive.methods.instance import InstanceDiscrimination


class MoCo(InstanceDiscrimination):
    """``key_encoder=momentum``, ``negatives=queue``: a large and consistent dictionary, decoupled from the batch.
    v1: linear head, T 0.07; v2: MLP head, T 0.2, blur, cosine momentum schedule (``method=moco_v1|moco_v2``)."""
