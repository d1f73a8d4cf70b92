"""Batch augmentation: geometry read back from coordinate ramps, colour and blur against torchvision's per-image
functions, per-sample probabilities, the eval transform against PIL, and the config mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from contrastive.data.augment import (
    BatchAugment,
    EvalTransform,
    MultiViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    build_augment,
    build_eval_transform,
    gaussian_blur,
    rgb_to_gray,
)

NORM3, NORM1 = {"mean": [0.0] * 3, "std": [1.0] * 3}, {"mean": [0.0], "std": [1.0]}  # leave pixels in [0, 1]
RGB, GREY = dict(channels=3, **NORM3), dict(channels=1, **NORM1)


def bare(**kwargs) -> BatchAugment:
    """Only what a test turns on: the whole image, no flip, no colour, no blur, no normalisation."""
    args = dict(size=32, **RGB, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, grayscale=0.0, blur_p=0.0)
    args.update(kwargs)
    return BatchAugment(**args)


def images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def ramps(n: int, size: int) -> torch.Tensor:
    """Channels: the pixel's column, its row (both scaled to [0, 1]) and a constant; bilinear sampling keeps
    such linear images exact, so a view tells where each of its pixels came from."""
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    img = torch.stack([cols / (size - 1), rows / (size - 1), torch.full_like(cols, 0.5)])
    return img.expand(n, 3, size, size).contiguous()


def fit_affine(view: torch.Tensor, in_size: int, pixels: slice) -> torch.Tensor:
    """Per-sample [2, 3] map (column, row, 1) of the view -> (column, row) of the input, in pixels, fitted by
    least squares on the view's pixels[pixels, pixels]."""
    out = view.shape[-1]
    rows, cols = torch.meshgrid(
        torch.arange(out, dtype=torch.float32), torch.arange(out, dtype=torch.float32), indexing="ij"
    )
    rows, cols = rows[pixels, pixels].flatten(), cols[pixels, pixels].flatten()
    design = torch.stack([cols, rows, torch.ones_like(cols)], 1).double()
    src = view[:, :2, pixels, pixels].flatten(2).double() * (in_size - 1)  # [n, 2, P]
    coef = torch.linalg.lstsq(design, src.permute(2, 0, 1).reshape(len(design), -1)).solution  # [3, n * 2]
    return coef.T.reshape(view.shape[0], 2, 3)


# -- output, identity, determinism ------------------------------------------------------------------------------
def test_output_shape_dtype_and_normalisation():
    aug = BatchAugment(size=24, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    out = aug(images(8))
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    constant = torch.full((4, 3, 32, 32), 51, dtype=torch.uint8)  # 0.2
    out = bare(size=24, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])(constant)
    expected = (0.2 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor([0.2, 0.25, 0.3])
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels,in_size,size", [(3, 32, 32), (1, 8, 16)])
def test_no_op_pipeline_equals_eval_transform(channels, in_size, size):
    stats = {"mean": [0.3] * channels, "std": [0.2] * channels}
    x = images(6, channels, in_size)
    eval_out = EvalTransform(size=size, **stats)(x)
    aug = BatchAugment(
        size=size, channels=channels, **stats, scale=(1, 1), ratio=(1, 1), hflip=0, jitter_p=0, grayscale=0, blur_p=0
    )
    torch.testing.assert_close(aug(x), eval_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug(x.float() / 255), eval_out, atol=1e-5, rtol=0)


def test_eval_transform_matches_pil_resize():
    x = images(3)
    out = EvalTransform(size=20, **NORM3)(x)
    ref = (
        torch.stack(
            [
                torch.from_numpy(
                    np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((20, 20), Image.BILINEAR))
                ).permute(2, 0, 1)
                for img in x
            ]
        ).float()
        / 255
    )
    assert (out - ref).abs().max() <= 1.0 / 255  # PIL rounds to uint8
    data = {"image_size": 20, "mean": [0.0] * 3, "std": [1.0] * 3}
    torch.testing.assert_close(build_eval_transform(data)(x), out)


def test_flip_only_mirrors_the_eval_view():
    x = images(5)
    eval_out = EvalTransform(size=32, mean=[0.5] * 3, std=[0.25] * 3)(x)
    out = bare(hflip=1.0, mean=[0.5] * 3, std=[0.25] * 3)(x)
    torch.testing.assert_close(out, torch.flip(eval_out, dims=[-1]), atol=1e-5, rtol=0)


def test_identical_samples_get_different_views():
    x = images(1).expand(4, 3, 32, 32)
    out = BatchAugment(size=32, **RGB)(x)
    for i in range(4):
        for j in range(i):
            assert (out[i] - out[j]).abs().max() > 0.05


def test_same_seed_same_views():
    aug, x = BatchAugment(size=24, **RGB, noise=0.05, cutout_p=0.5, solarize=0.2, rotation=10, translate=0.1), images(8)
    torch.manual_seed(3)
    first = aug(x)
    torch.manual_seed(3)
    torch.testing.assert_close(aug(x), first, atol=0, rtol=0)
    torch.manual_seed(4)
    assert not torch.equal(aug(x), first)


# -- geometry ----------------------------------------------------------------------------------------------------
def test_random_resized_crop_and_flip_read_back_from_ramps():
    n, in_size, size = 1000, 32, 16
    torch.manual_seed(0)
    view = bare(size=size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)(ramps(n, in_size))
    m = fit_affine(view, in_size, slice(1, -1))  # the outer pixels may touch the clamped border
    assert m[:, 0, 1].abs().max() < 1e-3 and m[:, 1, 0].abs().max() < 1e-3  # no rotation, no shear
    width, height = m[:, 0, 0].abs() * size, m[:, 1, 1] * size  # in input pixels
    centre = m @ torch.tensor([(size - 1) / 2, (size - 1) / 2, 1.0], dtype=m.dtype)
    area, aspect = width * height / in_size**2, width / height
    assert area.min() >= 0.2 - 1e-3 and area.max() <= 1 + 1e-3
    assert aspect.min() >= 3 / 4 - 1e-3 and aspect.max() <= 4 / 3 + 1e-3
    for c, extent in ((centre[:, 0], width), (centre[:, 1], height)):  # the box stays inside the image
        assert (c - extent / 2).min() >= -0.5 - 1e-3 and (c + extent / 2).max() <= in_size - 0.5 + 1e-3
    flipped = (m[:, 0, 0] < 0).float().mean()
    assert 0.43 < flipped < 0.57
    # the same distribution as torchvision's RandomResizedCrop (which rounds the box to whole pixels)
    ref = torch.tensor(
        [
            T.RandomResizedCrop.get_params(torch.zeros(1, in_size, in_size), [0.2, 1.0], [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=torch.float64,
    )
    ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / in_size**2, ref[:, 3] / ref[:, 2]
    assert abs(area.mean() - ref_area.mean()) < 0.03 and abs(area.std() - ref_area.std()) < 0.03
    assert abs(aspect.log().abs().mean() - ref_aspect.log().abs().mean()) < 0.03


def test_rotation_and_translation_read_back_from_ramps():
    n, size, rotation, translate = 400, 32, 30.0, 0.1
    torch.manual_seed(1)
    view = bare(size=size, rotation=rotation, translate=translate)(ramps(n, size))
    # the centre 10 x 10 pixels map well inside the image for any angle and shift drawn here
    m = fit_affine(view, size, slice(11, 21))
    linear = m[:, :, :2]
    eye = torch.eye(2, dtype=m.dtype).expand_as(linear)
    torch.testing.assert_close(linear @ linear.transpose(1, 2), eye, atol=1e-3, rtol=0)  # a pure rotation
    assert (torch.linalg.det(linear) > 0).all()  # never mirrored
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert angle.abs().max() <= rotation + 0.05 and angle.min() < -0.8 * rotation and angle.max() > 0.8 * rotation
    assert abs(angle.std() - rotation / math.sqrt(3)) < 2  # uniform in [-30, 30]
    centre = torch.tensor([(size - 1) / 2, (size - 1) / 2, 1.0], dtype=m.dtype)
    # shift of the image before the rotation, in pixels: uniform in +-translate * size on each axis
    shift = (linear.transpose(1, 2) @ ((m @ centre) - (size - 1) / 2).unsqueeze(2)).squeeze(2)
    assert shift.abs().max() <= translate * size + 1e-2 and shift.abs().max() > 0.8 * translate * size
    assert abs(shift.std() - translate * size / math.sqrt(3)) < 0.3


# -- colour ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,low,high", [("brightness", 0.3, 1.7), ("contrast", 0.3, 1.7), ("saturation", 0.0, 2.0), ("hue", -0.5, 0.5)]
)
def test_colour_ops_match_torchvision_per_image(name, low, high):
    ours = {
        "brightness": adjust_brightness,
        "contrast": adjust_contrast,
        "saturation": adjust_saturation,
        "hue": adjust_hue,
    }[name]
    theirs = getattr(TF, f"adjust_{name}")
    x = images(16, size=8).float() / 255
    factors = torch.linspace(low, high, 16)
    expected = torch.stack([theirs(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(ours(x, factors), expected, atol=2e-5, rtol=0)


def test_grey_ops_match_torchvision():
    x = images(6, size=8).float() / 255
    torch.testing.assert_close(rgb_to_gray(x), torch.stack([TF.rgb_to_grayscale(img) for img in x]))
    grey, factors = x[:, :1], torch.linspace(0.5, 1.5, 6)
    expected = torch.stack([TF.adjust_contrast(img, float(f)) for img, f in zip(grey, factors)])
    torch.testing.assert_close(adjust_contrast(grey, factors), expected, atol=1e-6, rtol=0)


def test_zero_hue_shift_and_unit_saturation_are_identity():
    x = images(8).float() / 255
    torch.testing.assert_close(adjust_hue(x, torch.zeros(8)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.ones(8)), x, atol=1e-6, rtol=0)  # a full turn
    assert torch.equal(adjust_saturation(x, torch.ones(8)), x)


def test_jitter_is_per_sample_with_its_probability():
    n = 400
    x = images(n, size=8)
    eval_out = EvalTransform(size=8, **NORM3)(x)
    torch.manual_seed(0)
    out = bare(size=8, jitter_p=0.5, brightness=0.4, contrast=0, saturation=0, hue=0)(x)
    changed = (out - eval_out).flatten(1).abs().amax(1) > 1e-6
    assert 0.4 < changed.float().mean() < 0.6
    # a changed sample is its eval view times one factor in [0.6, 1.4] (where nothing clipped at 1)
    ok = (out < 1) & (eval_out > 0.1)
    for i in torch.nonzero(changed).flatten()[:50]:
        ratio = out[i][ok[i]] / eval_out[i][ok[i]]
        assert ratio.max() - ratio.min() < 1e-4 and 0.6 - 1e-4 <= ratio.mean() <= 1.4 + 1e-4


def test_random_grayscale_is_per_sample_luma():
    n = 400
    x = images(n, size=8)
    eval_out = EvalTransform(size=8, **NORM3)(x)
    torch.manual_seed(0)
    out = bare(size=8, grayscale=0.3)(x)
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert 0.23 < grey.float().mean() < 0.37
    torch.testing.assert_close(out[grey], rgb_to_gray(eval_out[grey]).expand(-1, 3, -1, -1))
    assert torch.equal(out[~grey], eval_out[~grey])


def test_grey_images_skip_colour_ops_but_keep_brightness():
    x = images(16, channels=1, size=16)
    eval_out = EvalTransform(size=16, **NORM1)(x)
    no_colour = bare(size=16, **GREY, jitter_p=1.0, brightness=0, contrast=0, saturation=0.4, hue=0.4, grayscale=1.0)
    torch.testing.assert_close(no_colour(x), eval_out, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    out = bare(size=16, **GREY, jitter_p=1.0, brightness=0.4, contrast=0, saturation=0.4, hue=0.4)(x)
    ok = (out < 1) & (eval_out > 0.1)
    ratios = torch.stack([(out[i][ok[i]] / eval_out[i][ok[i]]).mean() for i in range(16)])
    assert ratios.min() >= 0.6 - 1e-4 and ratios.max() <= 1.4 + 1e-4 and ratios.std() > 0.1


# -- blur, solarize, noise, cutout -------------------------------------------------------------------------------
def test_gaussian_blur_matches_torchvision_per_image():
    x = images(6, size=12).float() / 255
    sigma = torch.linspace(0.1, 2.0, 6)
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma, 5), expected, atol=1e-5, rtol=0)
    assert [blur_kernel_size(s) for s in (8, 16, 32, 64, 96, 224)] == [3, 3, 3, 7, 9, 23]


def test_blur_keeps_a_constant_image_and_smooths_noise():
    constant = torch.full((4, 3, 32, 32), 0.3)
    torch.testing.assert_close(bare(blur_p=1.0)(constant), constant, atol=1e-6, rtol=0)
    x = images(8)
    eval_out = EvalTransform(size=32, **NORM3)(x)
    blurred = bare(blur_p=1.0, blur_sigma=(1.0, 2.0))(x)
    # reflect padding re-weights the border: with the +-3 sigma kernel (13 taps) the mean moves by up to ~3e-3
    torch.testing.assert_close(blurred.mean((1, 2, 3)), eval_out.mean((1, 2, 3)), atol=4e-3, rtol=0)
    assert (blurred.std((2, 3)) < 0.7 * eval_out.std((2, 3))).all()


def test_solarize_inverts_bright_pixels():
    x = images(4)
    eval_out = EvalTransform(size=32, **NORM3)(x)
    torch.testing.assert_close(bare(solarize=1.0)(x), torch.where(eval_out >= 0.5, 1 - eval_out, eval_out))


def test_noise_has_its_std_and_stays_in_range():
    torch.manual_seed(0)
    out = bare(noise=0.1)(torch.full((32, 3, 32, 32), 0.5))
    assert abs((out - 0.5).std() - 0.1) < 0.002 and abs((out - 0.5).mean()) < 0.002
    dark = bare(noise=0.1)(torch.zeros(4, 3, 32, 32))
    assert dark.min() == 0 and dark.max() <= 1


def test_cutout_zeroes_one_square_per_chosen_sample():
    torch.manual_seed(0)
    out = bare(cutout_p=1.0, cutout_size=0.25)(torch.ones(64, 3, 32, 32))
    side = 8
    holes = out == 0
    assert torch.equal(holes[:, 0], holes[:, 1]) and torch.equal(holes[:, 0], holes[:, 2])
    hole = holes[:, 0]
    assert (hole.flatten(1).sum(1) == side * side).all()
    rows, cols = hole.any(2), hole.any(1)
    assert (rows.sum(1) == side).all() and (cols.sum(1) == side).all()  # a square, not a scatter
    assert len({(int(r.float().argmax()), int(c.float().argmax())) for r, c in zip(rows, cols)}) > 20
    some = bare(cutout_p=0.5, cutout_size=0.25)(torch.ones(400, 3, 32, 32))
    assert 0.4 < (some == 0).flatten(1).any(1).float().mean() < 0.6


# -- multi-view and config ---------------------------------------------------------------------------------------
def test_multiview_order_sizes_and_independence():
    large, small = BatchAugment(size=24, **RGB), BatchAugment(size=12, **RGB, scale=(0.05, 0.2))
    views = MultiViewAugment(large, 2, small, 3)(images(4))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])
    with pytest.raises(ValueError):
        MultiViewAugment(large, 2, None, 2)


SIMCLR_DATA = [
    "data=digits",
    "augment=simclr",
    "data.channels=3",
    "data.image_size=32",
    "data.small_size=16",
    "data.mean=[0.49,0.48,0.45]",
    "data.std=[0.25,0.24,0.26]",
]


def test_simclr_config_maps_to_views(cfg_factory):
    cfg = cfg_factory(*SIMCLR_DATA, "data.flip=true", fast=False)
    views = build_augment(cfg.augment, cfg.data, num_large=2, num_small=2)
    large, small = views.large, views.small
    assert (large.size, large.scale, small.size, small.scale) == (32, (0.2, 1.0), 16, (0.05, 0.2))
    assert (large.hflip, large.jitter_p, large.brightness, large.saturation, large.hue) == (0.5, 0.8, 0.4, 0.4, 0.1)
    assert (large.grayscale, large.blur_p, large.blur_sigma, large.cutout_p) == (0.2, 0.5, (0.1, 2.0), 0.0)
    assert torch.allclose(large.mean, torch.tensor([0.49, 0.48, 0.45]))
    assert [tuple(v.shape) for v in views(images(2))] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert build_augment(cfg.augment, cfg.data, num_large=2).small is None


def test_digits_config_maps_to_views(cfg_factory):
    cfg = cfg_factory("data=digits", "augment=digits", fast=False)
    views = build_augment(cfg.augment, cfg.data, num_large=1, num_small=1)
    large = views.large
    assert (large.size, large.channels, large.hflip, large.rotation, large.translate) == (16, 1, 0.0, 15.0, 0.1)
    assert (large.saturation, large.hue, large.grayscale, large.blur_p) == (0, 0, 0, 0)
    assert views.small.size == 8
    assert [tuple(v.shape) for v in views(images(2, channels=1, size=8))] == [(2, 1, 16, 16), (2, 1, 8, 8)]


def test_flip_forced_off_when_the_data_forbids_it(cfg_factory):
    cfg = cfg_factory(*SIMCLR_DATA, "data.flip=false", fast=False)
    views = build_augment(cfg.augment, cfg.data, num_large=1, num_small=1)
    assert views.large.hflip == 0.0 and views.small.hflip == 0.0
    # and so no view of a left-to-right ramp runs right to left
    geometry_only = {"color_jitter": {"p": 0.0}, "grayscale": 0.0, "blur": {"p": 0.0}, "hflip": 1.0}
    data = {**DATA, "image_size": 32, **RGB, "flip": False}
    torch.manual_seed(0)
    out = build_augment(geometry_only, data, 1).large(ramps(64, 32))
    assert (out[:, 0, :, 1:] >= out[:, 0, :, :-1] - 1e-6).all()
    flipped = build_augment(geometry_only, {**data, "flip": True}, 1).large(ramps(64, 32))
    assert (flipped[:, 0, :, 1:] <= flipped[:, 0, :, :-1] + 1e-6).all()


DATA = {"image_size": 16, "small_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "flip": False}


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"colour_jitter": {"p": 0.5}}, "augment.colour_jitter.p"),
        ({"blur": {"p": 0.5, "radius": 2}}, "augment.blur.radius"),
        ({"large": {"size": 16, "crop": 0.5}}, "augment.large.crop"),
        ({"blur": 0.5}, "augment.blur"),
    ],
)
def test_unknown_augment_key_is_named(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_augment(cfg, DATA, num_large=2)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"color_jitter": {"p": 1.5}}, "augment.color_jitter.p"),
        ({"small": {"scale": [0.5, 0.1]}}, "augment.small.scale"),
        ({"blur": {"sigma": [0.0, 1.0]}}, "augment.blur.sigma"),
    ],
)
def test_out_of_range_value_is_named(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_augment(cfg, DATA, num_large=1, num_small=1)


# -- the official pipelines' colour order and blur support ---------------------------------------------------------
def test_random_jitter_order_is_torchvisions_per_image():
    # torchvision's ColorJitter (MoCo, SwAV, InstDisc) and SimCLR's code apply the four ops in a random order
    n = 64
    x = images(n, size=8).float() / 255
    aug = bare(size=8, jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_random_order=True)
    torch.manual_seed(3)
    out = aug._jitter(x)
    torch.manual_seed(3)  # the same draws, in the module's order: the four factors, then the order
    factors = [
        torch.rand(n) * 0.8 + 0.6,
        torch.rand(n) * 0.8 + 0.6,
        torch.rand(n) * 0.8 + 0.6,
        torch.rand(n) * 0.2 - 0.1,
    ]
    orders = torch.rand(n, 4).argsort(1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(n):
        img = x[i]
        for j in orders[i].tolist():
            img = ops[j](img, float(factors[j][i]))
        expected.append(img)
    torch.testing.assert_close(out, torch.stack(expected), atol=5e-5, rtol=0)
    assert len({tuple(o) for o in orders.tolist()}) > 10  # many orders, not one
    fixed = bare(size=8, jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    torch.manual_seed(3)
    in_order = torch.stack(
        [
            ops[3](
                ops[2](ops[1](ops[0](x[i], float(factors[0][i])), float(factors[1][i])), float(factors[2][i])),
                float(factors[3][i]),
            )
            for i in range(n)
        ]
    )
    torch.testing.assert_close(fixed._jitter(x), in_order, atol=5e-5, rtol=0)


def test_grayscale_first_greys_before_the_jitter():
    # MoCo v1 / InstDisc: RandomGrayscale, then ColorJitter; a hue shift of a grey image changes nothing
    x = images(16, size=8)
    eval_out = EvalTransform(size=8, **NORM3)(x)
    hue_then_grey = bare(size=8, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0.4, grayscale=1.0)
    grey_then_hue = bare(
        size=8, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0.4, grayscale=1.0, grayscale_first=True
    )
    grey = rgb_to_gray(eval_out).expand(-1, 3, -1, -1)
    torch.testing.assert_close(grey_then_hue(x), grey, atol=1e-5, rtol=0)
    assert (hue_then_grey(x) - grey).abs().amax() > 0.05


def test_blur_kernel_covers_three_sigma():
    # a tenth of 32 px is 3 taps, which would cut sigma 2 px down to a box; the kernel reaches +-3 sigma instead
    assert blur_kernel_size(32, 2.0) == 13 and blur_kernel_size(224, 2.0) == 23 and blur_kernel_size(4, 2.0) == 7
    assert bare(size=32, blur_p=1.0, blur_sigma=(0.1, 2.0)).blur_kernel == 13
    x = images(4, size=32).float() / 255
    sigma = torch.full((4,), 2.0)
    wide = torch.stack([TF.gaussian_blur(img, [31, 31], [2.0, 2.0]) for img in x])  # the untruncated Gaussian
    assert (gaussian_blur(x, sigma, 13) - wide).abs().amax() < 0.01
    assert (gaussian_blur(x, sigma, 3) - wide).abs().amax() > 0.05
