"""Training crops cut from each image at its own resolution, in the data loader's workers.

The official ImageNet pipelines (SimCLR, MoCo, SwAV, InstDisc) draw every view with RandomResizedCrop over the whole
decoded image and resample it to the view size with antialiasing. The on-device augmentation crops from a stored
square instead, which loses the sides of non-square images and the original resolution; ``data.crops=full`` (the
imagefolder default) cuts the crops here, and the on-device augmentation then does the rest of the recipe (flip,
colour, blur, ...) without cropping again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

CROP_SOURCES = ("stored", "full")


@dataclass(frozen=True)
class CropSpec:
    """One resolution of views: ``count`` crops of ``size`` px, area fraction in ``scale``, aspect in ``ratio``."""

    size: int
    count: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a RandomResizedCrop box over the whole ``width x height`` image (torchvision's
    draw: area and log-aspect uniform, 10 tries, then the largest centred box within ``ratio``)."""
    from torchvision.transforms import RandomResizedCrop

    image = torch.empty(0, height, width)  # get_params reads only the size
    return tuple(RandomResizedCrop.get_params(image, list(scale), list(ratio)))


class CroppedViews(Dataset):
    """Item ``i`` -> ``(views, label, i)``: ``views`` holds, per :class:`CropSpec`, a uint8 tensor
    ``[count, C, size, size]`` of crops of image ``i`` at its own resolution (bilinear, antialiased)."""

    def __init__(self, dataset: Dataset, specs: Sequence[CropSpec]) -> None:
        base, indices = dataset, None
        if isinstance(dataset, Subset):
            base, indices = dataset.dataset, list(dataset.indices)
        if not hasattr(base, "open"):
            raise TypeError(f"{type(base).__name__} has no full-resolution images to crop (no open(index))")
        self.dataset, self.base, self.indices, self.specs = dataset, base, indices, tuple(specs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tuple[Tensor, ...], int, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img, label = self.base.open(index if self.indices is None else self.indices[index])
        width, height = img.size
        views = []
        for spec in self.specs:
            crops = []
            for _ in range(spec.count):
                top, left, h, w = crop_box(width, height, spec.scale, spec.ratio)
                crop = TF.resized_crop(
                    img,
                    top,
                    left,
                    h,
                    w,
                    [spec.size, spec.size],
                    interpolation=InterpolationMode.BILINEAR,
                    antialias=True,
                )
                crops.append(TF.pil_to_tensor(crop))
            views.append(torch.stack(crops))
        return tuple(views), label, int(index)
