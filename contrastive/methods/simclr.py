"""SimCLR (Chen et al. 2020): end to end. Both views go through the one encoder, with gradient; a query's negatives
are the other 2N-2 views of the batch gathered from every process (NT-Xent, :func:`contrastive.losses.nt_xent`)."""

from contrastive.methods.base import InstanceDiscrimination


class SimCLR(InstanceDiscrimination):
    """``key_encoder=shared``, ``negatives=batch`` (``conf/method/simclr.yaml``): the dictionary is the batch, so its
    size is the batch size. ``method.joint_views=true`` encodes both views as one batch, as the official code does,
    so BN statistics span all 2N images. Any cell of the grid starts from here with an override, e.g.
    ``method=simclr method.key_encoder=momentum`` (MoCo v3's in-batch keys)."""
