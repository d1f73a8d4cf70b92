"""Data sets as uint8 images: ``item -> (image [C, H, W] uint8, label, index)``.

Augmentation happens later, batch-wise on the device, so the data sets only decode and store pixels. ``load_splits``
turns a ``data`` config into its splits (train, validation, and test with ``data.test_fraction``); every failure to
find or read the data is a ``DataError`` whose message names the path and the override that fixes it.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate, get_worker_info

from contrastive.errors import DataError, DataWarning, require


class ImageBatch(Sequence):
    """What ``ImageTensorDataset.__getitems__`` returns: a gathered batch that still reads as a sequence of
    ``(image, label, index)`` items, so torch's default collate accepts it; ``collate`` takes its tensors as they
    are instead of stacking the items back together."""

    def __init__(self, images: Tensor, labels: Tensor, index: Tensor) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.images[i], int(self.labels[i]), int(self.index[i])

    def __iter__(self) -> Iterator[tuple[Tensor, int, int]]:
        # default_collate iterates: one unbind and two tolist calls instead of 3N scalar reads
        return zip(self.images.unbind(0), self.labels.tolist(), self.index.tolist())


def collate(batch: Any) -> Any:
    """The DataLoader's collate: an ``ImageBatch`` as ``[images, labels, index]``; anything else as torch's
    default collate would (the same result, without re-stacking)."""
    if isinstance(batch, ImageBatch):
        return [batch.images, batch.labels, batch.index]
    return default_collate(batch)


class ImageTensorDataset(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` + int64 labels ``[N]``; item -> ``(image, label, index)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), int(index)

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        """A whole batch by one gather per tensor (the DataLoader calls this instead of one item at a time)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8)
        if get_worker_info() is not None:
            # a worker's batch travels to the main process through shared memory: gather straight into it
            images.share_memory_()
        # index_select, not images[index]: several times faster for uint8 on the CPU
        torch.index_select(self.images, 0, index, out=images)
        return ImageBatch(images, self.labels.index_select(0, index), index)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0


def eight_bit(img: Any, path: str | Path) -> Any:
    """``img`` with 8-bit samples. Pillow opens 16-bit grey PNGs and TIFFs as ``I;16`` (and 16-bit PGMs as ``I``,
    scaled to 0..65535), whose ``convert`` to ``L`` or ``RGB`` clips every value above 255 to white: keep their high
    byte instead, as Pillow itself decodes 16-bit colour PNGs. Other 32-bit modes have no known range."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        pixels = np.asarray(img).astype(np.uint32) >> 8
        return Image.fromarray(pixels.astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "integer" if img.mode == "I" else "floating-point"
        raise DataError(
            f"file {path} has 32-bit {kind} pixels (mode {img.mode}) whose range is unknown: convert it to an "
            "8-bit or 16-bit image (PNG), or remove it"
        )
    return img


class ImageFolderDataset(Dataset):
    """``torchvision.datasets.ImageFolder`` decoded lazily per item: shorter side resized to ``load_size``, then
    centre-cropped to ``load_size`` x ``load_size``; item -> ``(image uint8 [C, S, S], label, index)``."""

    def __init__(self, folder: Path, load_size: int, channels: int) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(folder))
        except FileNotFoundError as err:
            raise DataError(f"{folder}: {err}: put one sub-folder of images per class there, or set data.root") from err
        self.load_size = load_size
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.classes: list[str] = self.folder.classes
        self.labels = torch.tensor(self.folder.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.folder)

    def open(self, index: int):
        """The decoded image at its own resolution (PIL) and its label; the training crops of
        ``contrastive.data.crops`` are cut from it."""
        from PIL import Image

        path, label = self.folder.samples[index]
        try:
            with Image.open(path) as img:
                img = eight_bit(img, path).convert(self.mode)
        except DataError:
            raise
        except Image.DecompressionBombError as err:
            raise DataError(f"file {path} is a decompression bomb ({err}): remove it from the data set") from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or undecodable files
            raise DataError(f"file {path} is truncated or damaged ({err}): replace or remove it") from None
        return img, label

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img, label = self.open(index)
        img = TF.resize(img, self.load_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.load_size, self.load_size])
        return TF.pil_to_tensor(img), label, int(index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# -- helpers -------------------------------------------------------------------------------------------------
def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``range(n)`` into (train, val) index tensors, each in ascending order."""
    train, val, _ = split_three(n, val_fraction, 0.0, seed)
    return train, val


def split_three(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded random split of ``range(n)`` into (train, validation, test) index tensors, each in ascending order.
    One permutation serves both layouts: the test split is its head and validation follows, so with
    ``test_fraction == 0`` validation is the head as it always was (recorded runs keep their images), and a test
    split of the size validation had holds the same images validation held before."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.test_fraction={test_fraction} must be in [0, 1) and leave training images beside "
            f"data.val_fraction={val_fraction} (their sum must be < 1)"
        )
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if not 0 < n_val < n or (test_fraction > 0 and n_test == 0) or n_val + n_test >= n:
        raise DataError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave an empty split of {n} "
            "images"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return train.sort().values, val.sort().values, test.sort().values


def test_fraction(cfg: Any) -> float:
    # configs built before the key existed (and plain dicts in tests) have two splits
    return float(cfg.get("test_fraction", 0.0) or 0.0)


def _split(images: Tensor, labels: Tensor, cfg: Any) -> tuple[ImageTensorDataset, ...]:
    """A pool of labelled images -> (train, validation), or (train, validation, test) with data.test_fraction."""
    parts = split_three(len(labels), cfg.val_fraction, test_fraction(cfg), cfg.split_seed)
    parts = parts if test_fraction(cfg) > 0 else parts[:2]
    return tuple(ImageTensorDataset(images[index], labels[index]) for index in parts)


class LabelledSubset(Subset):
    """A subset of a data set read image by image (imagefolder) that still knows its labels and classes."""

    @property
    def labels(self) -> Tensor:
        return torch.as_tensor(self.dataset.labels)[torch.as_tensor(self.indices, dtype=torch.int64)]

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def _carve_validation(train: Dataset, cfg: Any) -> tuple[Dataset, Dataset]:
    """A set that ships its own train / held-out pair, made three-way: validation is ``data.val_fraction`` of its
    training set (seeded), and its own held-out set becomes the test split."""
    keep, val = split_indices(len(train), cfg.val_fraction, cfg.split_seed)
    if isinstance(train, ImageTensorDataset):
        return ImageTensorDataset(train.images[keep], train.labels[keep]), ImageTensorDataset(
            train.images[val], train.labels[val]
        )
    return LabelledSubset(train, keep.tolist()), LabelledSubset(train, val.tolist())


def _where(cfg: Any) -> str:
    """``data.root='...'``, with the absolute path when the configured one is relative."""
    given = str(cfg.root)
    full = str(Path(given).expanduser().resolve())
    return f"data.root={given!r}" + ("" if full == given else f" ({full})")


def _root(cfg: Any, holds: str, downloadable: bool = True) -> Path:
    """The configured root, which must exist unless a download will create it."""
    fix = f"set data.root=<folder holding {holds}>"
    if downloadable and not cfg.download:
        fix += " or data.download=true"
    if cfg.root is None:
        raise DataError(f"data.root is not set: {fix}")
    root = Path(str(cfg.root)).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{_where(cfg)} is a file, not a folder: {fix}")
    if not root.is_dir() and not cfg.download:
        raise DataError(f"{_where(cfg)} does not exist: {fix}")
    return root


def _require_files(cfg: Any, folder: Path, names: Sequence[str], holds: str) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{_where(cfg)}: {', '.join(missing)} not found in {folder}: "
            f"set data.root=<folder holding {holds}> or data.download=true"
        )


def _download(cfg: Any, make: Callable[[], Any]) -> None:
    """Run a torchvision download, turning its failure into one clear error."""
    try:
        make()
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"data.download=true: downloading {cfg.name} into {cfg.root} failed ({err}); "
            f"place the files there yourself and set data.download=false"
        ) from err


# -- IDX (MNIST) ---------------------------------------------------------------------------------------------
IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path: str | Path, kind: str) -> Tensor:
    """Read an IDX file of unsigned bytes (gzip-compressed or not): ``images`` -> uint8 ``[N, H, W]``,
    ``labels`` -> uint8 ``[N]``."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:  # zlib.error: a damaged deflate stream
            raise DataError(
                f"file {path} is a truncated or damaged gzip file ({err}): replace it, or delete it "
                "and set data.download=true"
            ) from err
    expected_magic = IDX_MAGIC[kind]
    if len(raw) < 4:
        raise DataError(f"file {path} is truncated: expected an IDX header, got {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"file {path} is not an IDX {kind[:-1]} file (magic {magic}, expected {expected_magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"file {path} is truncated: expected a {header}-byte header, got {len(raw)} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"file {path} is {state}: expected {expected} bytes for shape {dims}, got {len(raw)}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _find_idx(cfg: Any, raw_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    raise DataError(
        f"{_where(cfg)}: {stem}(.gz) not found in {raw_dir}: "
        f"set data.root=<folder holding MNIST/raw> or data.download=true"
    )


def _read_mnist(cfg: Any, raw_dir: Path, prefix: str) -> tuple[Tensor, Tensor]:
    images = read_idx(_find_idx(cfg, raw_dir, f"{prefix}-images-idx3-ubyte"), "images")
    labels = read_idx(_find_idx(cfg, raw_dir, f"{prefix}-labels-idx1-ubyte"), "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{raw_dir}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images.unsqueeze(1), labels.to(torch.int64)


# -- loaders, one per data.name ----------------------------------------------------------------------------
def _digits(cfg: Any) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # pixel values are 0..16
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    return _split(images, torch.from_numpy(digits.target).to(torch.int64), cfg)


def make_synthetic(size: int, image_size: int, channels: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``size`` uint8 images, balanced over ``num_classes`` classes: each class is a random smooth pattern, each
    image its class pattern shifted by a random sub-pixel offset, with random contrast and brightness, a random
    class-independent smooth distractor and pixel noise. Deterministic given the arguments."""
    gen = torch.Generator().manual_seed(seed)

    def smooth(n: int) -> Tensor:
        # a 4x4 field upsampled: the same smoothness at every image size keeps the task equally hard; one grey
        # field tinted per channel, so that more channels do not add independent evidence
        field = torch.randn(n, 1, 4, 4, generator=gen)
        field = F.interpolate(field, size=(image_size, image_size), mode="bicubic", align_corners=False)
        field = (field - field.mean((1, 2, 3), keepdim=True)) / field.std((1, 2, 3), keepdim=True)
        return field * (1 + 0.3 * torch.randn(n, channels, 1, 1, generator=gen))

    patterns = smooth(num_classes)
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=gen)]
    shift = (torch.rand(size, 2, generator=gen) * 2 - 1) * 0.35  # up to 0.35 of the half-width each way
    contrast = 0.6 + 0.8 * torch.rand(size, 1, 1, 1, generator=gen)
    brightness = 0.3 * torch.randn(size, 1, 1, 1, generator=gen)
    theta = torch.zeros(size, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    images = torch.empty(size, channels, image_size, image_size, dtype=torch.uint8)
    for start in range(0, size, 1024):
        end = min(start + 1024, size)
        grid = F.affine_grid(theta[start:end], [end - start, channels, image_size, image_size], align_corners=False)
        signal = F.grid_sample(patterns[labels[start:end]], grid, padding_mode="reflection", align_corners=False)
        x = contrast[start:end] * signal + smooth(end - start) + brightness[start:end]
        x = x + 0.5 * torch.randn(x.shape, generator=gen)
        images[start:end] = (0.5 + 0.15 * x).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images, labels


def _synthetic(cfg: Any) -> tuple[Dataset, Dataset]:
    for key in ("size", "num_classes", "image_size", "channels"):
        if getattr(cfg, key) < 1:
            raise DataError(f"data.{key}={getattr(cfg, key)} must be >= 1")
    images, labels = make_synthetic(cfg.size, cfg.image_size, cfg.channels, cfg.num_classes, cfg.split_seed)
    return _split(images, labels, cfg)


def _mnist(cfg: Any) -> tuple[Dataset, Dataset]:
    if cfg.subset not in (None, "test_split"):
        raise DataError(f"data.subset={cfg.subset!r} is not known for mnist; choose null or test_split")
    root = _root(cfg, "MNIST/raw")
    raw_dir = root / "MNIST" / "raw"
    prefixes = ["t10k"] if cfg.subset == "test_split" else ["train", "t10k"]
    if cfg.download:
        from torchvision.datasets import MNIST

        _download(cfg, lambda: MNIST(str(root), train=False, download=True))
    loaded = [_read_mnist(cfg, raw_dir, prefix) for prefix in prefixes]
    if cfg.subset == "test_split":
        return _split(*loaded[0], cfg)
    return ImageTensorDataset(*loaded[0]), ImageTensorDataset(*loaded[1])


def _hwc(data: Any) -> Tensor:
    return torch.as_tensor(data).permute(0, 3, 1, 2).contiguous()


def _cifar(cfg: Any) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder, files = {
        "cifar10": (
            CIFAR10,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
        ),
        "cifar100": (CIFAR100, "cifar-100-python", ["train", "test", "meta"]),
    }[cfg.name]
    root = _root(cfg, folder)
    if cfg.download:
        _download(cfg, lambda: cls(str(root), train=True, download=True))
    else:
        _require_files(cfg, root / folder, files, folder)
    sets = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError as err:
            raise DataError(
                f"{_where(cfg)}: {root / folder} is corrupted ({err}): "
                "replace its files, or delete them and set data.download=true"
            ) from err
        sets.append(ImageTensorDataset(_hwc(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return sets[0], sets[1]


STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]


def _stl10(cfg: Any) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import STL10

    root = _root(cfg, "stl10_binary")
    if cfg.download:
        _download(cfg, lambda: STL10(str(root), split="train", download=True))
    else:
        # torchvision checks all of these, the unlabeled split included, before reading any
        _require_files(cfg, root / "stl10_binary", STL10_FILES, "stl10_binary")
    sets = []
    for split in ("train", "test"):
        try:
            ds = STL10(str(root), split=split, download=False)
        except RuntimeError as err:
            raise DataError(
                f"{_where(cfg)}: {root / 'stl10_binary'} is corrupted ({err}): "
                "replace its files, or delete them and set data.download=true"
            ) from err
        sets.append(ImageTensorDataset(torch.as_tensor(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)))
    return sets[0], sets[1]


def _imagefolder(cfg: Any) -> tuple[Dataset, Dataset]:
    if cfg.download:
        raise DataError(
            "data.download=true: imagefolder cannot be downloaded; set data.download=false and "
            "data.root=<folder holding train/ and val/>"
        )
    root = _root(cfg, "train/ and val/", downloadable=False)
    if cfg.load_size <= 0:
        raise DataError(f"data.load_size={cfg.load_size} must be > 0 for imagefolder (the stored image size)")
    if cfg.channels not in (1, 3):
        raise DataError(f"data.channels={cfg.channels}: imagefolder decodes to 1 (grey) or 3 (RGB) channels")
    missing = [f"{name}/" for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise DataError(
            f"{_where(cfg)}: {', '.join(missing)} not found in {root}: "
            "set data.root=<folder holding train/ and val/, one sub-folder per class in each>"
        )
    train, val = (ImageFolderDataset(root / name, cfg.load_size, cfg.channels) for name in ("train", "val"))
    if train.classes != val.classes:
        raise DataError(
            f"{_where(cfg)}: train/ and val/ have different class folders ({len(train.classes)} vs {len(val.classes)})"
        )
    return train, val


# -- NumPy archives ------------------------------------------------------------------------------------------
NPZ_SPLITS = {
    "images": ("images", "labels"),
    "medmnist": ("train_images", "train_labels", "test_images", "test_labels"),
}


def _npz_path(cfg: Any) -> Path:
    if not cfg.file:
        raise DataError(
            "data.file is not set: set data.file=<path to an .npz archive> (relative to data.root unless absolute)"
        )
    path = Path(str(cfg.file)).expanduser()
    if not path.is_absolute() and cfg.root is not None:
        path = Path(str(cfg.root)).expanduser() / path
    if not path.is_file():
        where = "" if cfg.root is None or Path(str(cfg.file)).is_absolute() else f" under {_where(cfg)}"
        raise DataError(
            f"data.file={cfg.file!r}{where}: {path} not found: set data.file (and data.root) to an .npz archive"
        )
    return path


def _npz_array(archive: Any, path: Path, key: str) -> Any:
    """The array ``key`` of an open .npz, read only after its header was checked against the member's size: a
    damaged or hostile header could otherwise make NumPy allocate whatever shape it declares before reading."""
    import zipfile
    import zlib

    names = archive.zip.namelist()
    member = key + ".npy" if key + ".npy" in names else key
    info = archive.zip.getinfo(member)
    # the size the zip directory declares; a stored (uncompressed) member cannot hold more than its stored bytes
    size = min(info.file_size, info.compress_size) if info.compress_type == zipfile.ZIP_STORED else info.file_size
    try:
        with archive.zip.open(member) as f:
            shape, dtype, header = _npy_header(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"file {path}: the header of {key!r} is damaged ({err}): save the archive again") from None
    if dtype.hasobject:
        # numpy refuses object arrays without pickle: such a file could run code when read
        raise DataError(
            f"file {path}: key {key!r} holds pickled objects (dtype object), which are not read; "
            "save plain uint8 / integer arrays instead"
        )
    needed = math.prod(shape) * dtype.itemsize
    if needed > size - header:
        raise DataError(
            f"file {path}: {key!r} is truncated: its header declares shape {shape} of {dtype} ({needed:,} bytes) "
            f"but it holds {max(size - header, 0):,}; save the archive again"
        )
    try:
        return archive[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"file {path}: {key!r} is truncated or damaged ({err}): save the archive again") from None
    except MemoryError:
        raise DataError(
            f"file {path}: {key!r} ({needed:,} bytes of shape {shape}) does not fit in memory: use a smaller archive"
        ) from None


def _npy_header(f: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape, dtype, header length) of the .npy stream ``f``, read without its data."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = npy.read_array_header_2_0(f)
    else:  # 3.0 (a UTF-8 header): no public reader of the header alone
        shape, _, dtype = npy._read_array_header(f, version)
    return tuple(int(d) for d in shape), dtype, f.tell()


def npz_images(array: Any, path: Path, key: str, channels: int) -> Tensor:
    """uint8 ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` -> uint8 ``[N, C, H, W]`` (C = ``channels``)."""
    import numpy as np

    if array.dtype != np.uint8:
        raise DataError(
            f"file {path}: {key!r} has dtype {array.dtype}, expected uint8 pixels 0..255: convert with "
            "(x * 255).round().astype('uint8') if they are floats in [0, 1]"
        )
    shape = array.shape
    if array.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(1)
    if array.ndim != 4:
        raise DataError(f"file {path}: {key!r} has shape {shape}, expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
    # channels last (NumPy / PIL) or first (torch): the axis that holds data.channels, with square images
    # deciding when both could
    last, first = shape[3] == channels, shape[1] == channels
    side = "both ends" if last and first else "neither end"
    if last and first:
        last, first = shape[1] == shape[2], shape[2] == shape[3]
    if last == first:
        raise DataError(
            f"file {path}: {key!r} has shape {shape}: cannot tell the channel axis (data.channels="
            f"{channels} at {side}); expected [N, H, W, {channels}] or [N, {channels}, H, W], or set "
            "data.channels to the images' channel count"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.permute(0, 3, 1, 2).contiguous() if last else tensor


def npz_labels(array: Any, path: Path, key: str, n: int) -> Tensor:
    """Integer class indices ``[N]`` (or ``[N, 1]``, as MedMNIST stores them) -> int64 ``[N]``."""
    import numpy as np

    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"file {path}: {key!r} has dtype {array.dtype}, expected integer class indices")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(
            f"file {path}: {key!r} has shape {array.shape}, expected [N] class indices (multi-label "
            "sets are not supported)"
        )
    if len(array) != n:
        raise DataError(f"file {path}: {key!r} holds {len(array)} labels but the images number {n}")
    if len(array) and array.min() < 0:
        raise DataError(f"file {path}: {key!r} holds negative labels (min {array.min()}); expected 0..classes-1")
    return torch.from_numpy(array.astype(np.int64))


def _npz(cfg: Any) -> tuple[Dataset, Dataset]:
    """``images`` + ``labels``, split by ``data.val_fraction``; or MedMNIST's layout: ``train_*`` for training,
    ``test_*`` for evaluation (``val_*``, for model selection, is not used)."""
    import zipfile

    import numpy as np

    path = _npz_path(cfg)
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(
            f"file {path} is not an .npz archive (NumPy reads it as pickled data, which is not read): "
            "save the arrays with numpy.savez"
        ) from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"file {path} is not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"file {path} is a single .npy array, not an .npz archive: save it with "
            "numpy.savez(path, images=..., labels=...)"
        )
    with archive:
        keys = set(archive.files)
        layout = "medmnist" if "train_images" in keys else "images"
        missing = [key for key in NPZ_SPLITS[layout] if key not in keys]
        if missing:
            raise DataError(
                f"file {path}: no {', '.join(map(repr, missing))} (it has {', '.join(sorted(keys))}); "
                "expected 'images' and 'labels', or train_images, train_labels, test_images, "
                "test_labels"
            )
        pairs = []
        for prefix in ("",) if layout == "images" else ("train_", "test_"):
            key = prefix + "images"
            images = npz_images(_npz_array(archive, path, key), path, key, cfg.channels)
            key = prefix + "labels"
            labels = npz_labels(_npz_array(archive, path, key), path, key, images.shape[0])
            pairs.append((images, labels))
    if layout == "images":
        return _split(*pairs[0], cfg)
    if pairs[0][0].shape[1:] != pairs[1][0].shape[1:]:
        raise DataError(
            f"file {path}: train_images {tuple(pairs[0][0].shape[1:])} and test_images "
            f"{tuple(pairs[1][0].shape[1:])} differ in image shape"
        )
    return ImageTensorDataset(*pairs[0]), ImageTensorDataset(*pairs[1])


LOADERS: dict[str, Callable[[Any], tuple[Dataset, Dataset]]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _mnist,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "stl10": _stl10,
    "imagefolder": _imagefolder,
    "npz": _npz,
}


def check_labels(train: Any, val: Any, data_cfg: Any, test: Any = None) -> None:
    """Labels that class indices can be: not beyond the number of images (a label of 10^9 would make every
    per-class table that large), at least two classes for the labelled evaluation (with one, every accuracy is
    100%), and a warning naming the classes below the largest label that no image has."""
    import warnings

    labels = torch.cat([torch.as_tensor(s.labels) for s in (train, val, test) if s is not None])
    source = f"file {_npz_path(data_cfg)}" if data_cfg.name == "npz" else f"data={data_cfg.name}"
    if not len(labels):
        raise DataError(f"{source} holds no images")
    largest, images = int(labels.max()), len(labels)
    if largest >= images:
        raise DataError(
            f"{source}: a label of {largest} with {images} images: labels must be class indices 0..classes-1, "
            "so most of these classes would have no image; renumber them (numpy.unique(labels, return_inverse=True))"
        )
    present = torch.unique(labels).tolist()
    if len(present) < 2:
        raise DataError(
            f"{source}: every image has the label {present[0]}: the labelled evaluation (kNN, few-shot, linear "
            "probe) needs at least two classes, with one every accuracy is 100%; use a data set with two or more"
        )
    missing = sorted(set(range(largest + 1)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        warnings.warn(
            f"{source}: no image has the class{'es' if len(missing) > 1 else ''} {shown} (labels 0..{largest}): "
            "gaps in the labels count as classes in the evaluation; renumber the labels if these classes do not "
            "exist",
            DataWarning,
            stacklevel=3,
        )


def check_name(name: str) -> None:
    require(name in LOADERS, f"data.name={name!r} is not known; choose one of {', '.join(LOADERS)}")


def load_splits(data_cfg: Any, with_test: bool = False) -> tuple[Dataset, ...]:
    """(train, validation) for ``data_cfg.name``; train serves self-supervised training (labels only for
    monitoring). ``with_test``: (train, validation, test), test None unless ``data.test_fraction > 0``. A pool of
    images (digits, synthetic, an npz of images + labels, mnist's test_split) is split three ways by the fractions;
    a set with its own held-out set (cifar, stl10, mnist, MedMNIST npz, imagefolder's val/) keeps that set as the
    test split and takes validation from its training set (``data.val_fraction`` of it)."""
    check_name(data_cfg.name)
    sets = LOADERS[data_cfg.name](data_cfg)
    if len(sets) == 3:
        train, val, test = sets
    elif test_fraction(data_cfg) > 0:
        (train, val), test = _carve_validation(sets[0], data_cfg), sets[1]
    else:
        (train, val), test = sets, None
    check_labels(train, val, data_cfg, test)
    found = max(s.num_classes for s in (train, val, test) if s is not None)
    if found != data_cfg.num_classes:
        raise DataError(
            f"data.num_classes={data_cfg.num_classes} but {data_cfg.name} has {found} classes: "
            f"set data.num_classes={found}"
        )
    channels = train[0][0].shape[0]
    if channels != data_cfg.channels:
        raise DataError(
            f"data.channels={data_cfg.channels} but {data_cfg.name} images have {channels}: "
            f"set data.channels={channels}"
        )
    return (train, val, test) if with_test else (train, val)
