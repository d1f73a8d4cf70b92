"""Images a user holds as arrays (``data=npz``) and CIFAR-10 in torchvision's own file format (``data=cifar10``):
each layout loads to the exact pixels written, and each bad file is a clear error naming it."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from contrastive.config import DataConfig
from contrastive.data.datasets import DataError, load_splits, split_indices

CIFAR_NPZ = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10" / "cifar10_test.npz"


def npz_cfg(path: Path | str, **overrides):
    base = dict(name="npz", file=str(path), channels=3, num_classes=10, val_fraction=0.2, split_seed=0)
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {**base, **overrides})


def nhwc(n: int = 50, size: int = 6, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), np.arange(n) % 10


# -- happy paths -------------------------------------------------------------------------------------------------
def test_images_labels_split_by_val_fraction(tmp_path):
    images, labels = nhwc()
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    train, val = load_splits(npz_cfg(tmp_path / "set.npz"))
    # the same seeded split as every single-split source, computed directly
    train_idx, val_idx = split_indices(50, 0.2, 0)
    assert (len(train), len(val)) == (40, 10)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert train.images.dtype == torch.uint8 and train.images.shape == (40, 3, 6, 6)
    assert torch.equal(train.images, expected[train_idx]) and torch.equal(val.images, expected[val_idx])
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels[train_idx.numpy()].tolist()
    image, label, index = val[3]
    assert torch.equal(image, expected[val_idx[3]]) and label == labels[val_idx[3]] and index == 3
    other, _ = load_splits(npz_cfg(tmp_path / "set.npz", split_seed=1))
    assert not torch.equal(other.images, train.images)


@pytest.mark.parametrize("layout", ["nchw", "nhw"])
def test_channel_first_and_grey_layouts_match_channel_last(tmp_path, layout):
    images, labels = nhwc(channels=1 if layout == "nhw" else 3)
    stored = images[..., 0] if layout == "nhw" else images.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    np.savez(tmp_path / "b.npz", images=stored, labels=labels)
    channels = 1 if layout == "nhw" else 3
    reference, _ = load_splits(npz_cfg(tmp_path / "a.npz", channels=channels))
    train, _ = load_splits(npz_cfg(tmp_path / "b.npz", channels=channels))
    assert train.images.shape == (40, channels, 6, 6) and torch.equal(train.images, reference.images)


def test_non_square_images_and_single_channel_axis(tmp_path):
    # [N, 3, 3, 8]: channels could be axis 1 or 3; only axis 1 leaves a square image (3 x 8 is not)
    images = np.random.default_rng(2).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", images=images, labels=np.arange(20) % 10)
    train, _ = load_splits(npz_cfg(tmp_path / "c.npz"))
    assert train.images.shape == (16, 3, 8, 8)
    wide = np.random.default_rng(3).integers(0, 256, (20, 4, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "w.npz", images=wide, labels=np.arange(20) % 10)
    train, val = load_splits(npz_cfg(tmp_path / "w.npz"))
    assert train.images.shape == (16, 3, 4, 9)


def test_medmnist_layout_uses_train_and_test(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {}
    for split, n in (("train", 30), ("val", 5), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 7, 7), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4).astype(np.uint8)[:, None]  # MedMNIST stores [N, 1]
    np.savez_compressed(tmp_path / "pathmnist.npz", **arrays)
    train, val = load_splits(npz_cfg("pathmnist.npz", root=str(tmp_path), channels=1, num_classes=4))
    assert (len(train), len(val)) == (30, 12)
    assert torch.equal(train.images, torch.from_numpy(arrays["train_images"]).unsqueeze(1))
    assert torch.equal(val.images, torch.from_numpy(arrays["test_images"]).unsqueeze(1))
    assert val.labels.tolist() == (np.arange(12) % 4).tolist() and val.labels.dtype == torch.int64


def test_file_relative_to_root_or_absolute(tmp_path):
    images, labels = nhwc()
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "set.npz", images=images, labels=labels)
    a, _ = load_splits(npz_cfg("sub/set.npz", root=str(tmp_path)))
    b, _ = load_splits(npz_cfg(tmp_path / "sub" / "set.npz", root="/elsewhere"))
    assert torch.equal(a.images, b.images)


# -- bad input: each error names the file -------------------------------------------------------------------------
def write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def expect_error(cfg, *fragments: str) -> str:
    with pytest.raises(DataError) as err:
        load_splits(cfg)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_unset_or_missing_file(tmp_path):
    expect_error(npz_cfg(""), "data.file is not set")
    expect_error(
        npz_cfg("nope.npz", root=str(tmp_path)), "data.file='nope.npz'", str(tmp_path / "nope.npz"), "not found"
    )


def test_missing_key_named(tmp_path):
    images, labels = nhwc()
    path = write(tmp_path / "x.npz", images=images, targets=labels)
    expect_error(npz_cfg(path), str(path), "no 'labels'", "it has images, targets")
    path = write(tmp_path / "m.npz", train_images=images, train_labels=labels, val_images=images, val_labels=labels)
    expect_error(npz_cfg(path), str(path), "no 'test_images', 'test_labels'")


def test_wrong_dtypes_named(tmp_path):
    images, labels = nhwc()
    path = write(tmp_path / "f.npz", images=images.astype(np.float32) / 255, labels=labels)
    expect_error(npz_cfg(path), str(path), "'images' has dtype float32, expected uint8")
    path = write(tmp_path / "l.npz", images=images, labels=labels.astype(np.float64))
    expect_error(npz_cfg(path), str(path), "'labels' has dtype float64, expected integer")
    path = write(tmp_path / "n.npz", images=images, labels=labels - 1)
    expect_error(npz_cfg(path), str(path), "negative labels")


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((50, 36), "shape (50, 36), expected [N, H, W]"),
        ((50, 6, 6, 3, 1), "shape (50, 6, 6, 3, 1)"),
        ((50, 6, 6, 4), "cannot tell the channel axis (data.channels=3 at neither end)"),
        ((50, 3, 3, 3), "cannot tell the channel axis (data.channels=3 at both ends)"),
        ((50, 3, 5, 3), "cannot tell the channel axis (data.channels=3 at both ends)"),
    ],
)
def test_wrong_image_shapes_named(tmp_path, shape, fragment):
    path = write(tmp_path / "s.npz", images=np.zeros(shape, np.uint8), labels=np.arange(50) % 10)
    expect_error(npz_cfg(path), str(path), fragment)


def test_grey_images_with_three_channels_configured(tmp_path):
    path = write(tmp_path / "g.npz", images=np.zeros((50, 6, 6), np.uint8), labels=np.arange(50) % 10)
    expect_error(npz_cfg(path), "data.channels=3 but npz images have 1: set data.channels=1")


def test_length_mismatch_and_label_shape_named(tmp_path):
    images, labels = nhwc()
    path = write(tmp_path / "len.npz", images=images, labels=labels[:49])
    expect_error(npz_cfg(path), str(path), "'labels' holds 49 labels but the images number 50")
    path = write(tmp_path / "multi.npz", images=images, labels=np.zeros((50, 3), np.int64))
    expect_error(npz_cfg(path), str(path), "'labels' has shape (50, 3)")


def test_pickled_content_is_refused(tmp_path):
    images, labels = nhwc()
    objects = np.empty(50, dtype=object)
    objects[:] = [str(i) for i in labels]
    path = write(tmp_path / "obj.npz", images=images, labels=objects)  # savez pickles object arrays
    expect_error(npz_cfg(path), str(path), "'labels' holds pickled objects")
    pickled = tmp_path / "dict.npz"
    pickled.write_bytes(pickle.dumps({"images": images, "labels": labels}))
    expect_error(npz_cfg(pickled), str(pickled), "pickled data, which is not read")
    single = tmp_path / "one.npy"
    np.save(single, images)
    expect_error(npz_cfg(single), str(single), "single .npy array")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(write(tmp_path / "ok.npz", images=images, labels=labels).read_bytes()[:100])
    expect_error(npz_cfg(broken), str(broken))


def npz_with_member(path: Path, name: str, member: bytes, compress: bool = False, **arrays) -> Path:
    """An .npz with ``arrays`` saved as NumPy does, and the raw bytes ``member`` stored as ``name``.npy."""
    import zipfile

    kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", kind) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(key + ".npy", buffer.getvalue())
        archive.writestr(name + ".npy", member)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_header_declaring_a_huge_array_is_refused_before_reading(tmp_path):
    """Issue 31, 7: a member whose header declares 279 GiB over a few bytes is refused naming the file, and no
    allocation of the declared size is attempted."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (300000, 1000, 1000)}
    )
    member = header.getvalue() + bytes(64)  # the header (magic included) and 64 bytes of data
    images, labels = nhwc()
    path = npz_with_member(tmp_path / "huge.npz", "images", member, labels=labels)
    expect_error(
        npz_cfg(path), f"file {path}", "'images' is truncated", "(300000, 1000, 1000)", "300,000,000,000 bytes"
    )


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_truncated_member_is_reported_as_truncated_not_pickled(tmp_path, compress):
    """Issue 31, 11: a member cut short (as a copy that stopped) is called truncated, never "pickled objects"."""
    images, labels = nhwc()
    whole = npy_bytes(images)
    path = npz_with_member(tmp_path / "cut.npz", "images", whole[: len(whole) // 2], compress, labels=labels)
    message = expect_error(npz_cfg(path), f"file {path}", "'images' is truncated")
    assert "pickled" not in message


def test_label_far_above_the_number_of_images_is_refused_as_such(tmp_path):
    """Issue 31, 9: one label of 10^9 is refused as a label that cannot be a class index, without advice to set
    data.num_classes to it (a head and tables of 10^9 classes)."""
    images, labels = nhwc()
    labels = labels.copy()
    labels[7] = 10**9
    path = write(tmp_path / "big_label.npz", images=images, labels=labels)
    message = expect_error(npz_cfg(path), f"file {path}", "a label of 1000000000 with 50 images", "renumber")
    assert "num_classes=1000000001" not in message


def test_one_class_is_refused_for_the_labelled_evaluation(tmp_path):
    """Issue 31, 10: with one class every accuracy would be 100%."""
    images, _ = nhwc()
    path = write(tmp_path / "one.npz", images=images, labels=np.full(50, 3))
    expect_error(npz_cfg(path, num_classes=4), f"file {path}", "every image has the label 3", "at least two classes")


def test_gaps_in_the_labels_are_named_in_a_warning(tmp_path):
    """Issue 31, 13: classes 0-3 and 9 of ten: the missing classes 4-8 are named."""
    images, _ = nhwc()
    path = write(tmp_path / "gaps.npz", images=images, labels=np.array([0, 1, 2, 3, 9] * 10))
    with pytest.warns(UserWarning, match=r"no image has the classes 4, 5, 6, 7, 8 \(labels 0\.\.9\)"):
        load_splits(npz_cfg(path))


def test_cli_exit_code_and_message_for_a_bad_archive(tmp_path):
    path = write(tmp_path / "bad.npz", images=np.zeros((8, 4, 4, 3), np.float32), labels=np.arange(8))
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "data=npz",
        f"data.file={path}",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(path) in result.stderr and "expected uint8" in result.stderr and "Traceback" not in result.stderr


# -- end to end ------------------------------------------------------------------------------------------------------
def test_trains_from_an_npz(cfg_factory, tmp_path):
    from contrastive.train import train

    images, labels = nhwc(n=96, size=16, seed=5)
    path = write(tmp_path / "set.npz", images=images, labels=labels)
    cfg = cfg_factory(
        "data=npz",
        f"data.file={path}",
        "data.image_size=16",
        "data.small_size=8",
        "data.batch_size=16",
        "augment=simclr",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"] == saved["data"] == "npz" and 0 <= saved["knn_acc"] <= 100
    assert len(saved["history"]) == 1


@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason="shared CIFAR-10 test npz absent")
def test_shared_cifar10_npz_split():
    train, val = load_splits(npz_cfg(CIFAR_NPZ))
    assert (len(train), len(val)) == (8000, 2000) and train.images.shape[1:] == (3, 32, 32)
    counts = torch.bincount(train.labels, minlength=10) + torch.bincount(val.labels, minlength=10)
    assert counts.tolist() == [1000] * 10
    # the archive's README states the published per-channel mean on the 0-1 scale
    mean = torch.cat([train.images, val.images]).double().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4942, 0.4851, 0.4504], dtype=torch.float64), atol=1e-4)


# -- CIFAR-10 in torchvision's files ---------------------------------------------------------------------------------
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2's ``str`` (SHORT_BINSTRING / BINSTRING), as the release's files were written by
    Python 2's cPickle: torchvision's ``pickle.load(f, encoding="latin1")`` turns them into ``str`` keys (a file
    pickled by Python 3 with ``bytes`` keys would not load: torchvision looks up ``entry["data"]``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py`` as the release has it: Python 2 pickles of dicts with b'data' (uint8 [N, 3072],
    the channel planes R, G, B of each 32x32 image in turn) and b'labels'; batches.meta with b'label_names'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR_TRAIN + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.permutation(np.arange(per_batch) % 10)]
        entry = {
            b"batch_label": name.encode(),
            b"data": data,
            b"labels": labels,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(py2_pickle(entry))
        written[name] = (data, labels)
    meta = {
        b"label_names": [f"class{i}".encode() for i in range(10)],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return written


@pytest.fixture
def cifar_files_trusted(monkeypatch):
    """torchvision checks each file's md5 against the published release; files written here cannot match, so the
    check is waived and everything after it (the unpickling, the reshape, the layout) runs as for a user."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


def cifar_cfg(root: Path):
    return OmegaConf.merge(
        OmegaConf.structured(DataConfig), dict(name="cifar10", root=str(root), channels=3, num_classes=10)
    )


def test_cifar10_batches_load_pixel_exact(tmp_path, cifar_files_trusted):
    written = write_cifar10(tmp_path)
    train, val = load_splits(cifar_cfg(tmp_path))
    assert (len(train), len(val)) == (100, 20) and train.images.shape[1:] == (3, 32, 32)
    # the rows are channel planes: row r of batch b is image r, red plane first, row-major within a plane
    data, labels = written["data_batch_3"]
    image, label, index = train[2 * 20 + 7]
    assert torch.equal(image, torch.from_numpy(data[7].reshape(3, 32, 32))) and label == labels[7]
    assert image[1, 4, 5] == data[7][1024 + 4 * 32 + 5]
    test_data, test_labels = written["test_batch"]
    assert torch.equal(val.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert val.labels.tolist() == test_labels


def test_cifar10_batches_train_end_to_end(tmp_path, cfg_factory, cifar_files_trusted):
    from contrastive.train import train

    write_cifar10(tmp_path / "data", per_batch=12)
    cfg = cfg_factory(
        "data=cifar10", f"data.root={tmp_path / 'data'}", "data.batch_size=16", "augment=simclr", "trainer.max_epochs=1"
    )
    saved = train(cfg)
    assert saved["data"] == "cifar10" and len(saved["history"]) == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["data"] == "cifar10"


def test_cifar10_written_files_fail_the_md5_check_clearly(tmp_path):
    # without the waiver the same files are refused as not the published release, with the folder named
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="corrupted") as err:
        load_splits(cifar_cfg(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason="shared CIFAR-10 test npz absent")
def test_compare_cifar10_cpu_experiment_loads_the_split():
    from conftest import make_cfg

    from contrastive.validate import validate

    cfg = make_cfg(["experiment=compare_cifar10_cpu", f"data.root={CIFAR_NPZ.parents[1]}"], fast=False)
    validate(cfg)
    assert (cfg.data.name, cfg.data.image_size, cfg.augment.color_jitter.p, cfg.backbone.name) == (
        "npz",
        32,
        0.8,
        "small_cnn",
    )
    train, val, test = load_splits(cfg.data, with_test=True)
    direct, held_out = load_splits(npz_cfg(CIFAR_NPZ))
    # three splits (experiment/base/cifar10_cpu): the same 8,000 training images as the two-way split recorded runs
    # trained on, and its 2,000 held-out images halved into test (first) and validation
    assert (len(train), len(val), len(test)) == (8000, 1000, 1000) and torch.equal(train.images, direct.images)
    assert torch.equal(torch.cat([test.images, val.images]).sort(0).values, held_out.images.sort(0).values)
