"""Data sets and the data module: splits, items, batching, the IDX reader, and clear errors."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader

from contrastive.config import DataConfig
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.data.datasets import (
    DataError,
    ImageTensorDataset,
    collate,
    load_splits,
    make_synthetic,
    read_idx,
    split_indices,
)
from contrastive.errors import ConfigError

MNIST_RAW = Path(__file__).resolve().parents[3] / "shared" / "data" / "MNIST" / "raw"
needs_mnist = pytest.mark.skipif(
    not (MNIST_RAW / "t10k-images-idx3-ubyte.gz").is_file(), reason="shared MNIST t10k files absent"
)
# class counts of the MNIST test set (t10k), a published property of the files
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = False) -> Path:
    """An IDX file of unsigned bytes, written by hand from the format's definition."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


# -- digits / synthetic -----------------------------------------------------------------------------------
def test_digits_shapes_values_and_split():
    train, val = load_splits(data_cfg(name="digits"))
    assert (len(train), len(val)) == (1797 - 359, 359)
    assert train.images.shape == (1438, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    digits = load_digits()
    tr_idx, va_idx = split_indices(1797, 0.2, 0)
    expected = np.rint(digits.images[tr_idx.numpy()] * 255 / 16).astype(np.uint8)
    assert np.array_equal(train.images[:, 0].numpy(), expected)
    assert np.array_equal(val.labels.numpy(), digits.target[va_idx.numpy()])
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


def test_digits_split_deterministic_disjoint_and_seeded():
    a_train, a_val = split_indices(1797, 0.2, 0)
    b_train, b_val = split_indices(1797, 0.2, 0)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert set(a_train.tolist()).isdisjoint(a_val.tolist())
    assert sorted(a_train.tolist() + a_val.tolist()) == list(range(1797))
    c_train, _ = split_indices(1797, 0.2, 1)
    assert not torch.equal(a_train, c_train)
    first, second = load_splits(data_cfg(name="digits")), load_splits(data_cfg(name="digits"))
    assert torch.equal(first[0].images, second[0].images) and torch.equal(first[1].labels, second[1].labels)


def test_synthetic_deterministic_balanced_any_shape():
    a = make_synthetic(300, 12, 3, 5, seed=7)
    b = make_synthetic(300, 12, 3, 5, seed=7)
    c = make_synthetic(300, 12, 3, 5, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (300, 3, 12, 12) and a[0].dtype == torch.uint8
    assert torch.bincount(a[1]).tolist() == [60] * 5
    train, val = load_splits(data_cfg(name="synthetic", size=100, image_size=10, split_seed=3))
    assert (len(train), len(val)) == (80, 20) and train.images.shape[1:] == (1, 10, 10)


def test_synthetic_raw_pixel_knn_above_chance_below_perfect():
    train, val = load_splits(data_cfg(name="synthetic"))  # the defaults: 2048 images, 10 classes, 16x16
    knn = KNeighborsClassifier(n_neighbors=5).fit(train.images.flatten(1).numpy(), train.labels.numpy())
    acc = knn.score(val.images.flatten(1).numpy(), val.labels.numpy())
    assert 0.4 < acc < 0.97, acc  # chance is 0.1


# -- items and batching -----------------------------------------------------------------------------------
def random_dataset(n: int = 50, shape: tuple[int, ...] = (3, 5, 4)) -> ImageTensorDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
    return ImageTensorDataset(images, torch.randint(0, 7, (n,), generator=gen))


def test_items_are_image_label_index():
    ds = random_dataset()
    for i in (0, 17, 49):
        image, label, index = ds[i]
        assert image.dtype == torch.uint8 and torch.equal(image, ds.images[i])
        assert label == int(ds.labels[i]) and index == i


@pytest.mark.parametrize("collate_fn", [None, collate], ids=["default_collate", "collate"])
def test_dataloader_batches_match_direct_indexing(collate_fn, monkeypatch):
    ds = random_dataset()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    expected = []
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in order[start : start + 16]]
        expected.append(
            (
                torch.stack([x for x, _, _ in items]),
                torch.tensor([y for _, y, _ in items]),
                torch.tensor([i for _, _, i in items]),
            )
        )

    def no_single_items(self, index):
        raise AssertionError("the DataLoader should fetch whole batches through __getitems__")

    monkeypatch.setattr(ImageTensorDataset, "__getitem__", no_single_items)
    batches = list(DataLoader(ds, batch_size=16, sampler=order, collate_fn=collate_fn))
    assert len(batches) == len(expected) == 4
    for (images, labels, index), (e_images, e_labels, e_index) in zip(batches, expected):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(images, e_images) and torch.equal(labels, e_labels) and torch.equal(index, e_index)


def test_dataloader_with_a_worker_matches():
    ds = random_dataset(40)
    loader = DataLoader(ds, batch_size=16, num_workers=1, collate_fn=collate)
    images, labels, index = (torch.cat(t) for t in zip(*loader))
    assert torch.equal(images, ds.images) and torch.equal(labels, ds.labels)
    assert torch.equal(index, torch.arange(40))


# -- data module ------------------------------------------------------------------------------------------
def test_datamodule_loaders():
    dm = ContrastiveDataModule(data_cfg(name="synthetic", size=210, batch_size=32, channels=2, num_classes=3))
    dm.setup("fit")
    assert dm.num_train == 168 and dm.num_classes == 3 and dm.channels == 2
    train = dm.train_dataloader()
    assert train.drop_last and train.pin_memory == torch.cuda.is_available()
    batches = list(train)
    assert [len(b[2]) for b in batches] == [32] * 5  # 168 = 5 * 32 + 8 dropped
    seen = torch.cat([b[2] for b in batches])
    assert len(set(seen.tolist())) == 160 and not torch.equal(seen, torch.arange(160))  # shuffled, no repeats
    for images, labels, index in batches[:2]:
        assert torch.equal(images, dm.train_set.images[index]) and torch.equal(labels, dm.train_set.labels[index])
    vals = dm.val_dataloader()
    assert len(vals) == 2 and not any(loader.drop_last for loader in vals)
    for loader, dataset in zip(vals, (dm.train_set, dm.val_set)):
        images, labels, index = (torch.cat(t) for t in zip(*loader))
        assert torch.equal(index, torch.arange(len(dataset))) and torch.equal(images, dataset.images)
    assert len(vals[1].dataset) == 42
    train_loader, val_loader = dm.eval_loaders()
    assert train_loader.dataset is dm.train_set and val_loader.dataset is dm.val_set


def test_datamodule_loads_once():
    dm = ContrastiveDataModule(data_cfg(name="digits"))
    dm.setup("fit")
    first = dm.train_set
    dm.setup("validate")
    assert dm.train_set is first


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "mnist"])
def test_missing_root_is_a_clear_error(tmp_path, name):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        load_splits(data_cfg(name=name, root=str(missing), download=False, channels=3))
    message = str(err.value)
    assert str(missing) in message and "data.root" in message and "data.download" in message


@pytest.mark.parametrize(
    "name, needed", [("cifar10", "data_batch_1"), ("stl10", "train_X.bin"), ("mnist", "train-images-idx3-ubyte")]
)
def test_missing_files_inside_root_named(tmp_path, name, needed):
    with pytest.raises(DataError, match="data.root") as err:
        load_splits(data_cfg(name=name, root=str(tmp_path), channels=3))
    assert needed in str(err.value) and str(tmp_path) in str(err.value) and "data.download" in str(err.value)


def test_unknown_name_lists_allowed():
    with pytest.raises(ConfigError) as err:  # the data check's own rule, also run before any work
        load_splits(data_cfg(name="imagenette"))
    for allowed in ("digits", "synthetic", "mnist", "cifar10", "cifar100", "stl10", "imagefolder"):
        assert allowed in str(err.value)
    assert "data.name='imagenette'" in str(err.value)


def test_wrong_num_classes_or_channels_named():
    with pytest.raises(DataError, match=r"data.num_classes=5 .* set data.num_classes=10"):
        load_splits(data_cfg(name="digits", num_classes=5))
    with pytest.raises(DataError, match=r"data.channels=3 .* set data.channels=1"):
        load_splits(data_cfg(name="digits", channels=3))


# -- IDX / MNIST ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    read_images = read_idx(write_idx(tmp_path / "img", images, compress=compress), "images")
    read_labels = read_idx(write_idx(tmp_path / "lab", labels, compress=compress), "labels")
    assert read_images.dtype == torch.uint8 and np.array_equal(read_images.numpy(), images)
    assert np.array_equal(read_labels.numpy(), labels)


def test_idx_errors_name_the_file(tmp_path):
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    good = write_idx(tmp_path / "good", images).read_bytes()
    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good[:-5])
    with pytest.raises(DataError, match="truncated: expected 52 bytes for shape \\[4, 3, 3\\], got 47") as err:
        read_idx(truncated, "images")
    assert str(truncated) in str(err.value)
    wrong = write_idx(tmp_path / "wrong-magic", images, magic=1234)
    with pytest.raises(DataError, match="not an IDX image file \\(magic 1234") as err:
        read_idx(wrong, "images")
    assert str(wrong) in str(err.value)
    labels = write_idx(tmp_path / "labels", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="magic 2049"):
        read_idx(labels, "images")
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(broken_gz, "images")


def test_mnist_layout_from_written_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 30), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train, val = load_splits(data_cfg(name="mnist", root=str(tmp_path)))
    assert (len(train), len(val)) == (30, 20) and train.images.shape[1:] == (1, 28, 28)
    train, val = load_splits(data_cfg(name="mnist", root=str(tmp_path), subset="test_split"))
    assert (len(train), len(val)) == (16, 4)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(19) % 10)
    with pytest.raises(DataError, match="20 images but 19 labels"):
        load_splits(data_cfg(name="mnist", root=str(tmp_path), subset="test_split"))


@needs_mnist
def test_idx_reader_on_real_mnist(tmp_path):
    from torchvision.datasets.mnist import read_image_file

    images = read_idx(MNIST_RAW / "t10k-images-idx3-ubyte.gz", "images")
    labels = read_idx(MNIST_RAW / "t10k-labels-idx1-ubyte.gz", "labels")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels.long()).tolist() == T10K_COUNTS
    plain = tmp_path / "t10k-images-idx3-ubyte"
    with gzip.open(MNIST_RAW / "t10k-images-idx3-ubyte.gz") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert torch.equal(read_idx(plain, "images"), images)
    assert torch.equal(read_image_file(str(plain)), images)  # torchvision's own reader agrees
    truncated = tmp_path / "cut-idx3-ubyte"
    truncated.write_bytes(plain.read_bytes()[:100_000])
    with pytest.raises(DataError, match=f"{truncated}.*truncated: expected 7840016 bytes"):
        read_idx(truncated, "images")


@needs_mnist
def test_mnist_test_split_from_shared_files():
    cfg = data_cfg(name="mnist", root=str(MNIST_RAW.parents[1]), subset="test_split")
    train, val = load_splits(cfg)
    assert (len(train), len(val)) == (8000, 2000)
    assert train.images.shape == (8000, 1, 28, 28) and set(val.labels.tolist()) == set(range(10))
    again, _ = load_splits(cfg)
    assert torch.equal(again.images, train.images)
    counts = torch.bincount(train.labels, minlength=10) + torch.bincount(val.labels, minlength=10)
    assert counts.tolist() == T10K_COUNTS


# -- image folder ------------------------------------------------------------------------------------------------
def test_imagefolder_resizes_and_centre_crops(tmp_path):
    from PIL import Image

    stripes = np.zeros((10, 30, 3), dtype=np.uint8)
    stripes[:, 10:20] = 255  # white middle third: the centre crop of the 8-pixel-high resize is white
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(stripes).save(tmp_path / split / cls / "x.png")
    cfg = data_cfg(name="imagefolder", root=str(tmp_path), load_size=8, channels=3, num_classes=2)
    train, val = load_splits(cfg)
    image, label, index = train[1]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and (label, index) == (1, 1)
    assert image[:, :, 3:5].min() == 255 and image.float().mean() > 200
    assert train.labels.tolist() == [0, 1]
    images, labels, index = next(iter(DataLoader(val, batch_size=2, collate_fn=collate)))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1] and index.tolist() == [0, 1]
    with pytest.raises(DataError, match="data.num_classes=1000 .* set data.num_classes=2"):
        load_splits(data_cfg(name="imagefolder", root=str(tmp_path), load_size=8, channels=3, num_classes=1000))
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val/ not found"):
        load_splits(cfg)


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written from the format's definition: ``array`` uint16 [H, W] (grey) or [H, W, 3] (RGB)."""
    import struct
    import zlib

    array = np.asarray(array, dtype=">u2")
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = b"".join(b"\x00" + row.tobytes() for row in array.reshape(h, w * channels))  # filter 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[channels], 0, 0, 0)  # bit depth 16, grey or RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("stored", ["grey", "rgb"])
def test_imagefolder_scales_16_bit_pngs_to_8_bits(tmp_path, stored, channels):
    """Issue 31, 6: a 16-bit PNG keeps its contrast (value >> 8 per sample), never clipped to white."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (8, 8) if stored == "grey" else (8, 8, 3)
    pixels = {cls: rng.integers(0, 65536, shape, dtype=np.uint16) for cls in ("a", "b")}
    for split in ("train", "val"):
        for cls, array in pixels.items():
            (tmp_path / split / cls).mkdir(parents=True)
            write_png16(tmp_path / split / cls / "x.png", array)
    with Image.open(tmp_path / "train" / "a" / "x.png") as img:
        assert img.mode == ("I;16" if stored == "grey" else "RGB")  # a real 16-bit PNG, as Pillow reads it
    cfg = data_cfg(name="imagefolder", root=str(tmp_path), load_size=8, channels=channels, num_classes=2)
    train, _ = load_splits(cfg)
    for i, cls in enumerate(("a", "b")):
        expected = Image.fromarray((pixels[cls] >> 8).astype(np.uint8)).convert("L" if channels == 1 else "RGB")
        image, label, _ = train[i]
        assert label == i and torch.equal(
            image, torch.from_numpy(np.array(expected)).reshape(8, 8, -1).permute(2, 0, 1)
        )
    assert 60 < float(image.float().mean()) < 200  # random samples: mid-grey on average, not white


def test_imagefolder_refuses_32_bit_pixels_of_unknown_range(tmp_path):
    from PIL import Image

    from contrastive.data.datasets import ImageFolderDataset

    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 1000.0, np.float32)).save(tmp_path / "a" / "x.tif")
    with pytest.raises(DataError, match=r"x\.tif has 32-bit floating-point pixels \(mode F\)"):
        ImageFolderDataset(tmp_path, 8, 1)[0]
