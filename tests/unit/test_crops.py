"""data.crops=full: training views cut from each whole image at its own resolution, as RandomResizedCrop does in
the official pipelines; evaluation as Resize(256) + CenterCrop(224)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from contrastive.data.augment import BatchAugment, EvalTransform, MultiViewAugment
from contrastive.data.crops import CroppedViews, CropSpec, crop_box

WIDTH, HEIGHT = 300, 120  # a wide image: a centre square would lose 60 % of it


class Wide:
    """A data set of one non-square image whose pixels encode their own column (red) and row (green)."""

    def __init__(self) -> None:
        cols = np.linspace(0, 255, WIDTH)[None, :].repeat(HEIGHT, 0)
        rows = np.linspace(0, 255, HEIGHT)[:, None].repeat(WIDTH, 1)
        self.image = Image.fromarray(np.stack([cols, rows, np.full_like(cols, 128)], 2).astype(np.uint8))

    def __len__(self) -> int:
        return 1

    def open(self, index: int):
        return self.image.copy(), 7


def test_crops_are_torchvisions_random_resized_crop_of_the_whole_image():
    data = Wide()
    specs = [CropSpec(32, 3, (0.08, 1.0)), CropSpec(16, 2, (0.05, 0.14))]
    torch.manual_seed(0)
    (large, small), label, index = CroppedViews(data, specs)[0]
    assert (large.shape, small.shape, large.dtype, label, index) == ((3, 3, 32, 32), (2, 3, 16, 16), torch.uint8, 7, 0)
    torch.manual_seed(0)  # the same draws, written out: box over the whole 300 x 120 image, antialiased resample
    expected = []
    for size, count, scale in ((32, 3, (0.08, 1.0)), (16, 2, (0.05, 0.14))):
        for _ in range(count):
            top, left, h, w = RandomResizedCrop.get_params(torch.empty(3, HEIGHT, WIDTH), list(scale), [3 / 4, 4 / 3])
            expected.append(
                TF.pil_to_tensor(
                    TF.resized_crop(
                        data.image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True
                    )
                )
            )
    assert torch.equal(large, torch.stack(expected[:3])) and torch.equal(small, torch.stack(expected[3:]))


def test_crop_boxes_cover_the_full_extent_of_a_non_square_image():
    torch.manual_seed(1)
    boxes = [crop_box(WIDTH, HEIGHT, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(400)]
    lefts = [left for _, left, _, _ in boxes]
    rights = [left + w for _, left, _, w in boxes]
    # the stored centre square spans columns 90-210: crops now reach both ends of the image
    assert min(lefts) <= 2 and max(rights) >= WIDTH - 2
    assert sum(r <= 90 or left >= 210 for left, r in zip(lefts, rights)) > 0  # some lie wholly outside the square
    areas = [h * w / (WIDTH * HEIGHT) for _, _, h, w in boxes]
    assert min(areas) >= 0.2 - 0.01 and max(areas) <= 1.0
    # a full-extent crop shrunk to 32 px is antialiased: it equals PIL's area-aware resize of the whole image
    whole = TF.pil_to_tensor(TF.resized_crop(Wide().image, 0, 0, HEIGHT, WIDTH, [32, 32], antialias=True))
    assert torch.equal(whole, TF.pil_to_tensor(Wide().image.resize((32, 32), Image.BILINEAR)))


def test_augment_skips_its_crop_for_cut_views():
    aug = MultiViewAugment(
        BatchAugment(size=8, channels=3, mean=[0.0] * 3, std=[1.0] * 3, hflip=1.0, jitter_p=0, grayscale=0, blur_p=0), 2
    )
    crops = torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8)
    views = aug([crops])
    assert len(views) == 2
    for v, view in enumerate(views):  # view v holds every image's crop v, mirrored (hflip=1), nothing else
        torch.testing.assert_close(view, crops[:, v].float().flip(-1) / 255)
    with pytest.raises(ValueError, match="counts"):
        aug([crops[:, :1]])


def test_eval_is_resize_256_then_centre_crop_224():
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    out = EvalTransform(size=224, mean=[0.0] * 3, std=[1.0] * 3, crop=0.875)(x)
    torch.testing.assert_close(out, TF.center_crop(x, [224, 224]).float() / 255)


def make_folder(root) -> None:
    gen = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                size = (int(gen.integers(40, 90)), int(gen.integers(30, 60)))  # non-square, varied
                pixels = gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("method", ["simclr", pytest.param("swav", marks=pytest.mark.slow)])
def test_imagefolder_full_crops_train_from_the_cli(tmp_path, method):
    make_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        f"method={method}",
        "data=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.num_classes=2",
        "data.image_size=24",
        "data.small_size=12",
        "data.load_size=28",
        "data.batch_size=4",
        "data.num_workers=0",
        "backbone.width=8",
        "method.proj_hidden_dim=16",
        "method.proj_out_dim=8",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "eval.linear_epochs=0",
        "eval.fewshot_seeds=1",
        "eval.shots=[1]",
        f"output_dir={out}",
    ]
    if method == "swav":
        cmd += ["method.num_prototypes=4", "method.num_small_views=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == method and np.isfinite(summary["final_loss"])
