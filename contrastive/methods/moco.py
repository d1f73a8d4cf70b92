"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): keys from a momentum encoder
(:class:`contrastive.models.key_encoder.MomentumEncoder`, with shuffle-BN), negatives from a FIFO queue of past keys
(:class:`contrastive.negatives.queue.QueueNegatives`), InfoNCE (:func:`contrastive.losses.info_nce`)."""

from contrastive.methods.base import InstanceDiscrimination


class MoCo(InstanceDiscrimination):
    """``key_encoder=momentum``, ``negatives=queue`` (``conf/method/moco.yaml``): a large and consistent dictionary,
    decoupled from the batch. Asymmetric by default (``method.symmetric=false``: one query view, one key pass per
    step). ``method=moco_v1``: linear head, T 0.07; ``method=moco_v2``: MLP head without BN, T 0.2, blur; both
    m 0.999 constant, as the official code. ``method=moco``: the small-data recipe (m 0.99 on a cosine ramp, BN
    head). ``method.negatives=batch`` or ``bank`` keeps the momentum encoder with another dictionary."""
