"""Random views of a batch, computed on the batch's own device.

The data loader yields uint8 images; a training step turns each batch into views here. Every random parameter is
drawn per sample by vectorised ops on the input's device from the global RNG, so ``torch.manual_seed`` makes runs
repeatable, and nothing loops over samples or waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # draws per sample before RandomResizedCrop's fallback, as torchvision


class AugmentError(ValueError):
    """A ``BatchAugment`` argument out of range; ``arg`` names the argument, ``reason`` says what is allowed."""

    def __init__(self, arg: str, value: Any, reason: str) -> None:
        super().__init__(f"{arg}={value!r} {reason}")
        self.arg, self.value, self.reason = arg, value, reason


# -- pixel ops on float [B, C, H, W] in [0, 1]; factors are per sample, shape [B] ---------------------------------
def to_unit(x: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1] (a float32 input is returned as is)."""
    return x.to(torch.float32) / 255 if x.dtype == torch.uint8 else x.to(torch.float32)


def _per_sample(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its luma."""
    # the mean of the luma image is the luma of the channel means
    mean = rgb_to_gray(x.mean((2, 3), keepdim=True)) if x.shape[1] == 3 else x.mean((1, 2, 3), keepdim=True)
    return torch.lerp(mean, x, _per_sample(factor)).clamp_(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each RGB image with its luma."""
    return torch.lerp(rgb_to_gray(x), x, _per_sample(factor)).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each RGB image by ``shift`` turns (in [-0.5, 0.5]) through HSV; value and saturation
    stay, so each pixel keeps its min and max channel."""
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    r, g, b = x.unbind(1)
    # which channel is largest (ties to the first, as torchvision); float masks, as they beat where() on the CPU
    is_r = (r == maxc).to(x.dtype)
    is_g = (g == maxc).to(x.dtype) * (1 - is_r)
    is_b = 1 - is_r - is_g
    # hue in sixths of a turn: the sector of the largest channel (0, 2, 4) plus a signed step within it
    step = is_r * (g - b) + is_g * (b - r) + is_b * (r - g)
    hue6 = step / delta.clamp_min(1e-12) + 2 * is_g + 4 * is_b + 6 * shift.view(-1, 1, 1)
    hue6 = torch.remainder(hue6, 6.0)
    # the fully saturated colour of that hue: piecewise linear in hue6, one ramp per channel
    pure = torch.stack([(hue6 - 3).abs_() - 1, 2 - (hue6 - 2).abs_(), 2 - (hue6 - 4).abs_()], 1).clamp_(0, 1)
    return torch.addcmul(minc.unsqueeze(1), delta.unsqueeze(1), pure)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image with its own ``sigma`` (pixels): separable, reflect padding, grouped conv over B*C."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def blur_kernel_size(size: int, sigma_max: float = 0.0) -> int:
    """Odd, at least a tenth of the image side (SimCLR's choice) and at least +-3 ``sigma_max`` (a tenth of 32 px,
    3 taps, would cut a sigma of 2 px down to a box); at most what reflect padding allows (``size - 1`` per side)."""
    taps = max(3, int(0.1 * size) // 2 * 2 + 1, 2 * math.ceil(3 * sigma_max) + 1)
    return min(taps, 2 * (size - 1) + 1)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(x.device).view(1, -1, 1, 1)


def _choose(p: float, new: Tensor, old: Tensor) -> Tensor:
    """``new`` for a random share ``p`` of the samples, ``old`` for the others."""
    if p >= 1:
        return new
    chosen = torch.rand(new.shape[0], 1, 1, 1, device=new.device) < p
    return torch.where(chosen, new, old)


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def random_crop_fractions(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Per-sample crop width and height as fractions of the image, as RandomResizedCrop draws them: area fraction
    uniform in ``scale``, aspect ratio log-uniform in ``ratio``, the first of ``CROP_ATTEMPTS`` draws that fits;
    where none fits, the whole image with its aspect ratio clamped into ``ratio``."""
    area = torch.rand(n, CROP_ATTEMPTS, device=device) * (scale[1] - scale[0]) + scale[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, CROP_ATTEMPTS, device=device) * (log_hi - log_lo) + log_lo)
    fw = torch.sqrt(area * aspect * (height / width))
    fh = torch.sqrt(area / aspect * (width / height))
    fits = (fw <= 1) & (fh <= 1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    image_ratio = width / height
    if image_ratio < ratio[0]:
        fallback = (1.0, image_ratio / ratio[0])
    elif image_ratio > ratio[1]:
        fallback = (ratio[1] / image_ratio, 1.0)
    else:
        fallback = (1.0, 1.0)
    found = fits.any(1)
    fw = torch.where(found, fw.gather(1, first).squeeze(1), fallback[0])
    fh = torch.where(found, fh.gather(1, first).squeeze(1), fallback[1])
    return fw, fh


# -- the transforms ----------------------------------------------------------------------------------------------
class _Normalized(nn.Module):
    def __init__(self, size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if size < 1:
            raise AugmentError("size", size, "must be >= 1")
        if len(mean) != channels or len(std) != channels:
            raise AugmentError("mean", list(mean), f"and std={list(std)} need one value per channel ({channels})")
        if min(std) <= 0:
            raise AugmentError("std", list(std), "must be > 0")
        self.size, self.channels = int(size), int(channels)
        # not persistent: they follow the module's device but stay out of checkpoints
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]), persistent=False)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images [B, {self.channels}, H, W], got {tuple(x.shape)}")


class EvalTransform(_Normalized):
    """Deterministic: keep the central ``crop`` fraction of each side (0.875 of a 256-px image: the official
    Resize(256) + CenterCrop(224)), resize to ``size`` (bilinear, antialias), scale to [0, 1], normalise."""

    def __init__(self, *, size: int, mean: Sequence[float], std: Sequence[float], crop: float = 1.0) -> None:
        super().__init__(size, len(mean), mean, std)
        if not 0 < crop <= 1:
            raise AugmentError("crop", crop, "must be in (0, 1] (the central fraction of each side kept)")
        self.crop = float(crop)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = to_unit(x)
        if self.crop < 1:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
            top, left = round((h - ch) / 2), round((w - cw) / 2)  # as torchvision's center_crop
            x = x[..., top : top + ch, left : left + cw]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return normalize(x, self.mean, self.std)


class BatchAugment(_Normalized):
    """One random view of a batch: crop/flip/affine as a single grid_sample, then colour ops, blur, noise, cutout,
    normalise."""

    def __init__(
        self,
        *,
        size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rotation: float = 0.0,
        translate: float = 0.0,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_random_order: bool = False,
        grayscale: float = 0.2,
        grayscale_first: bool = False,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize: float = 0.0,
        noise: float = 0.0,
        cutout_p: float = 0.0,
        cutout_size: float = 0.25,
    ) -> None:
        super().__init__(size, channels, mean, std)
        for arg, p in (
            ("hflip", hflip),
            ("jitter_p", jitter_p),
            ("grayscale", grayscale),
            ("blur_p", blur_p),
            ("solarize", solarize),
            ("cutout_p", cutout_p),
        ):
            if not 0 <= p <= 1:
                raise AugmentError(arg, p, "is a probability and must be in [0, 1]")
        for arg, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v <= 1:
                raise AugmentError(arg, v, "must be in [0, 1] (factors are drawn from [1 - x, 1 + x])")
        for arg, v in (("rotation", rotation), ("translate", translate), ("noise", noise)):
            if v < 0:
                raise AugmentError(arg, v, "must be >= 0")
        if not 0 <= hue <= 0.5:
            raise AugmentError("hue", hue, "must be in [0, 0.5] (a fraction of a full turn)")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise AugmentError("scale", list(scale), "must be [low, high] with 0 < low <= high <= 1")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise AugmentError("ratio", list(ratio), "must be [low, high] with 0 < low <= high")
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise AugmentError("blur_sigma", list(blur_sigma), "must be [low, high] with 0 < low <= high")
        if not 0 < cutout_size <= 1:
            raise AugmentError("cutout_size", cutout_size, "must be in (0, 1] (a fraction of the image side)")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.hflip, self.rotation, self.translate = float(hflip), float(rotation), float(translate)
        self.jitter_p, self.brightness, self.contrast = float(jitter_p), float(brightness), float(contrast)
        colour = channels == 3  # a grey image has no saturation or hue to change
        self.saturation = float(saturation) if colour else 0.0
        self.hue = float(hue) if colour else 0.0
        self.grayscale = float(grayscale) if colour else 0.0
        self.blur_p, self.blur_sigma = float(blur_p), (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel = blur_kernel_size(self.size, self.blur_sigma[1])
        self.jitter_random_order, self.grayscale_first = bool(jitter_random_order), bool(grayscale_first)
        self.solarize, self.noise = float(solarize), float(noise)
        self.cutout_p, self.cutout_side = float(cutout_p), max(1, round(cutout_size * self.size))

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, hflip={self.hflip}, rotation={self.rotation}, "
            f"translate={self.translate}, jitter_p={self.jitter_p}, grayscale={self.grayscale}, "
            f"blur_p={self.blur_p}, solarize={self.solarize}, noise={self.noise}, cutout_p={self.cutout_p}"
        )

    def forward(self, x: Tensor, crop: bool = True) -> Tensor:
        """x: uint8 ``[B, C, H, W]`` (or float in [0, 1]) -> float32 ``[B, C, size, size]``, normalised.
        ``crop=False``: ``x`` holds crops already cut at ``size`` (``contrastive.data.crops``); flip, rotation and
        shift still apply."""
        self._check_input(x)
        if not crop and x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"crops of {self.size} px expected, got {tuple(x.shape[-2:])}")
        x = self._geometry(to_unit(x), crop)
        # SimCLR and MoCo v2 jitter then grey; InstDisc and MoCo v1 grey first, then jitter (``grayscale_first``)
        if self.grayscale > 0 and self.grayscale_first:
            x = _choose(self.grayscale, rgb_to_gray(x).expand_as(x), x)
        if self.jitter_p > 0:
            x = _choose(self.jitter_p, self._jitter(x), x)
        if self.grayscale > 0 and not self.grayscale_first:
            x = _choose(self.grayscale, rgb_to_gray(x).expand_as(x), x)
        if self.blur_p > 0:
            sigma = _uniform(x.shape[0], *self.blur_sigma, device=x.device)
            x = _choose(self.blur_p, gaussian_blur(x, sigma, self.blur_kernel), x)
        if self.solarize > 0:
            x = _choose(self.solarize, torch.where(x >= 0.5, 1 - x, x), x)
        if self.noise > 0:
            x = (x + self.noise * torch.randn_like(x)).clamp(0, 1)
        if self.cutout_p > 0:
            x = self._cutout(x)
        return normalize(x, self.mean, self.std)

    def affine(self, n: int, height: int, width: int, device: torch.device, crop: bool = True) -> Tensor:
        """Per-sample ``[n, 2, 3]`` maps from output to input coordinates (``F.affine_grid``'s theta): the image
        is rotated and shifted, then a random box of it is cropped (the whole image when not ``crop``) and maybe
        mirrored."""
        if crop:
            fw, fh = random_crop_fractions(n, height, width, self.scale, self.ratio, device)
            cx = (torch.rand(n, device=device) * 2 - 1) * (1 - fw)
            cy = (torch.rand(n, device=device) * 2 - 1) * (1 - fh)
        else:
            fw, fh = torch.ones(n, device=device), torch.ones(n, device=device)
            cx, cy = torch.zeros(n, device=device), torch.zeros(n, device=device)
        if self.hflip > 0:
            fw = torch.where(torch.rand(n, device=device) < self.hflip, -fw, fw)
        if self.translate > 0:
            # the image spans 2 in normalised coordinates
            cx = cx + _uniform(n, -2 * self.translate, 2 * self.translate, device)
            cy = cy + _uniform(n, -2 * self.translate, 2 * self.translate, device)
        zero = torch.zeros_like(fw)
        theta = torch.stack([fw, zero, cx, zero, fh, cy], 1).view(n, 2, 3)
        if self.rotation > 0:
            angle = _uniform(n, -math.radians(self.rotation), math.radians(self.rotation), device)
            cos, sin = angle.cos(), angle.sin()
            # a rotation in pixels, expressed in normalised coordinates (they differ when height != width)
            rot = torch.stack([cos, -sin * (height / width), sin * (width / height), cos], 1).view(n, 2, 2)
            theta = rot @ theta
        return theta

    def _geometry(self, x: Tensor, crop: bool = True) -> Tensor:
        n, c, h, w = x.shape
        theta = self.affine(n, h, w, x.device, crop)
        grid = F.affine_grid(theta, [n, c, self.size, self.size], align_corners=False)
        # without rotation or shift the crop lies inside the image: clamping at the border then makes a full
        # crop equal to the evaluation resize, instead of darkening the outer half pixel
        padding = "zeros" if self.rotation > 0 or self.translate > 0 else "border"
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    def _jitter(self, x: Tensor) -> Tensor:
        """Brightness, contrast, saturation, hue: in that order, or (``jitter_random_order``) in an order drawn
        per sample, as torchvision's ColorJitter and SimCLR's code run them."""
        n, device = x.shape[0], x.device
        # (op, its factors, the identity factor)
        ops = []
        if self.brightness > 0:
            ops.append((adjust_brightness, _uniform(n, 1 - self.brightness, 1 + self.brightness, device), 1.0))
        if self.contrast > 0:
            ops.append((adjust_contrast, _uniform(n, 1 - self.contrast, 1 + self.contrast, device), 1.0))
        if self.saturation > 0:
            ops.append((adjust_saturation, _uniform(n, 1 - self.saturation, 1 + self.saturation, device), 1.0))
        if self.hue > 0:
            ops.append((adjust_hue, _uniform(n, -self.hue, self.hue, device), 0.0))
        if not self.jitter_random_order or len(ops) < 2:
            for op, factor, _ in ops:
                x = op(x, factor)
            return x
        # slot[i, j]: the position of op j in sample i's order. At each position every op runs on the whole batch,
        # with its identity factor where the sample has another op there: len(ops)^2 passes, no sync, no gather
        slot = torch.rand(n, len(ops), device=device).argsort(1).argsort(1)
        for position in range(len(ops)):
            for j, (op, factor, identity) in enumerate(ops):
                x = op(x, torch.where(slot[:, j] == position, factor, torch.full_like(factor, identity)))
        return x

    def _cutout(self, x: Tensor) -> Tensor:
        n, side, device = x.shape[0], self.cutout_side, x.device
        top = torch.randint(0, self.size - side + 1, (n, 1), device=device)
        left = torch.randint(0, self.size - side + 1, (n, 1), device=device)
        pos = torch.arange(self.size, device=device)
        rows = (pos >= top) & (pos < top + side)
        cols = (pos >= left) & (pos < left + side)
        hole = rows.unsqueeze(2) & cols.unsqueeze(1)
        if self.cutout_p < 1:
            hole = hole & (torch.rand(n, 1, 1, device=device) < self.cutout_p)
        return x.masked_fill(hole.unsqueeze(1), 0.0)


class MultiViewAugment(nn.Module):
    """``num_large`` views at the large crop size, then ``num_small`` views at the small size (SwAV multi-crop)."""

    def __init__(self, large: BatchAugment, num_large: int, small: BatchAugment | None = None, num_small: int = 0):
        super().__init__()
        if num_large < 1:
            raise ValueError(f"num_large={num_large} must be >= 1")
        if num_small < 0 or (num_small > 0 and small is None):
            raise ValueError(f"num_small={num_small} must be >= 0, and > 0 only with a small BatchAugment")
        self.large, self.small = large, small
        self.num_large, self.num_small = int(num_large), int(num_small)

    def forward(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """``x``: a batch of images ``[B, C, H, W]``, or crops already cut per resolution (``data.crops=full``):
        ``[B, num_large, C, S, S]`` (and ``[B, num_small, C, s, s]``), which then skip the crop."""
        if not isinstance(x, Tensor):
            return self._from_crops(list(x))
        views = self._views(self.large, x, self.num_large)
        if self.num_small > 0:
            views += self._views(self.small, x, self.num_small)
        return views

    def _from_crops(self, crops: list[Tensor]) -> list[Tensor]:
        expected = [self.num_large] + ([self.num_small] if self.num_small > 0 else [])
        if [c.shape[1] if c.dim() == 5 else -1 for c in crops] != expected:
            raise ValueError(
                f"expected crops [B, count, C, S, S] with counts {expected}, got {[tuple(c.shape) for c in crops]}"
            )
        views: list[Tensor] = []
        for augment, c in zip((self.large, self.small), crops):
            b, count = c.shape[:2]
            # view-major, as _views: all images' first crop, then all images' second crop, ...
            flat = c.transpose(0, 1).reshape(count * b, *c.shape[2:])
            views += list(augment(flat, crop=False).chunk(count))
        return views

    @staticmethod
    def _views(augment: BatchAugment, x: Tensor, count: int) -> list[Tensor]:
        # all views of one size in one pass over the repeated batch: one grid_sample and one blur, not `count`
        return list(augment(x.repeat(count, 1, 1, 1)).chunk(count))


# -- from the config ---------------------------------------------------------------------------------------------
# augment.<key> -> BatchAugment argument; the crop keys live under `large.` and `small.`
CONFIG_KEYS = {
    "hflip": "hflip",
    "rotation": "rotation",
    "translate": "translate",
    "color_jitter.p": "jitter_p",
    "color_jitter.brightness": "brightness",
    "color_jitter.contrast": "contrast",
    "color_jitter.saturation": "saturation",
    "color_jitter.hue": "hue",
    "color_jitter.random_order": "jitter_random_order",
    "grayscale": "grayscale",
    "grayscale_first": "grayscale_first",
    "blur.p": "blur_p",
    "blur.sigma": "blur_sigma",
    "solarize": "solarize",
    "noise": "noise",
    "cutout.p": "cutout_p",
    "cutout.size": "cutout_size",
}
CROP_KEYS = ("size", "scale")
DATA_ARGS = {"channels": "data.channels", "mean": "data.mean", "std": "data.std"}


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _build_view(shared: dict[str, Any], view: str, flat: dict[str, Any], data: dict[str, Any]) -> BatchAugment:
    names = {arg: f"augment.{key}" for key, arg in CONFIG_KEYS.items()}
    names.update({key: f"augment.{view}.{key}" for key in CROP_KEYS})
    names.update(DATA_ARGS)
    kwargs = dict(shared)
    size_key = "image_size" if view == "large" else "small_size"
    kwargs["size"] = flat.get(f"{view}.size", data[size_key])
    if f"{view}.scale" in flat:
        kwargs["scale"] = tuple(flat[f"{view}.scale"])
    try:
        return BatchAugment(**kwargs)
    except AugmentError as err:
        raise ValueError(f"{names.get(err.arg, err.arg)}={err.value!r} {err.reason}") from None


def build_augment(augment_cfg: Any, data_cfg: Any, num_large: int, num_small: int = 0) -> MultiViewAugment:
    """The training views of a run from its ``augment`` and ``data`` configs (DictConfigs or plain dicts)."""
    flat = _flatten(_plain(augment_cfg))
    data = _plain(data_cfg)
    known = set(CONFIG_KEYS) | {f"{view}.{key}" for view in ("large", "small") for key in CROP_KEYS}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(
            f"augment.{unknown[0]} is not a known augmentation key; known keys: {', '.join(sorted(known))}"
        )
    shared: dict[str, Any] = {"channels": data["channels"], "mean": list(data["mean"]), "std": list(data["std"])}
    for key, arg in CONFIG_KEYS.items():
        if key in flat:
            shared[arg] = tuple(flat[key]) if isinstance(flat[key], (list, tuple)) else flat[key]
    if not data["flip"]:
        shared["hflip"] = 0.0  # the data set forbids mirroring (it would change the class, as for digits)
    large = _build_view(shared, "large", flat, data)
    small = _build_view(shared, "small", flat, data) if num_small > 0 else None
    return MultiViewAugment(large, num_large, small, num_small)


def build_eval_transform(data_cfg: Any) -> EvalTransform:
    """The deterministic transform of evaluation: centre crop of ``data.eval_crop``, resize to ``data.image_size``
    and normalise."""
    data = _plain(data_cfg)
    try:
        return EvalTransform(
            size=data["image_size"], mean=list(data["mean"]), std=list(data["std"]), crop=data.get("eval_crop", 1.0)
        )
    except AugmentError as err:
        name = {"size": "data.image_size", "crop": "data.eval_crop"}.get(err.arg) or DATA_ARGS.get(err.arg, err.arg)
        raise ValueError(f"{name}={err.value!r} {err.reason}") from None
