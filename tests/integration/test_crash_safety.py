"""Nothing lost on a crash: atomic checkpoints, a stop at a NaN/Inf loss that keeps the last good checkpoint, clear
errors for corrupt data files, and a warning when the embeddings collapse or the loss stops moving."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, collapse_projector

from contrastive.callbacks import CollapseWarning, TrainingDiverged
from contrastive.checkpoints import AtomicCheckpointIO, atomic_torch_save
from contrastive.data.datasets import DataError
from contrastive.methods.base import ContrastiveMethod
from contrastive.train import train

STEPS_PER_EPOCH = 4


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        *overrides,
        "trainer.enable_progress_bar=false",
        "eval.init=false",
        "eval.pixels=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}
    )


# -- atomic checkpoints ------------------------------------------------------------------------------------------
def half_then_fail(targets: list):
    """A torch.save that writes half of the real bytes to its target, then fails as a full disk would."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        targets.append(getattr(f, "name", f))
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    return save


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    previous = {"weights": torch.arange(1000.0), "epoch": 3}
    atomic_torch_save(previous, target)
    before = target.read_bytes()
    targets: list = []
    monkeypatch.setattr(torch, "save", half_then_fail(targets))
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1000), "epoch": 4}, target)
    monkeypatch.undo()
    # the half-written bytes went to a temporary file in the same folder, which is gone
    assert len(targets) == 1 and Path(targets[0]).parent == tmp_path and Path(targets[0]) != target
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert target.read_bytes() == before
    loaded = torch.load(target, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], previous["weights"])


def test_save_is_fsynced_before_it_replaces_the_target(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    atomic_torch_save({"x": torch.ones(3)}, tmp_path / "sub" / "last.ckpt")
    # the file's data, then the rename, then the folder entry
    assert events == ["fsync", "replace last.ckpt", "fsync"]
    assert torch.load(tmp_path / "sub" / "last.ckpt", weights_only=True)["x"].sum() == 3


def test_crash_while_saving_in_a_run_keeps_the_last_good_checkpoint(cfg_factory, tmp_path, monkeypatch):
    targets: list = []
    failing = half_then_fail(targets)
    real_save = torch.save
    saves = {"n": 0}

    def second_save_fails(obj, f, *args, **kwargs):
        saves["n"] += 1
        return (failing if saves["n"] == 2 else real_save)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    with pytest.raises(OSError, match="No space left"):
        train(cfg_factory(*TINY, "trainer.max_epochs=3"))
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    # the Trainer wrote through the atomic plugin: the failed bytes went to a temporary file beside last.ckpt
    assert Path(targets[0]).parent == folder and Path(targets[0]).name.startswith(".last.ckpt.")
    assert sorted(os.listdir(folder)) == ["last.ckpt"]
    saved = torch.load(folder / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)


# -- divergence --------------------------------------------------------------------------------------------------
def poison_loss_from(monkeypatch, step: int, seen: list[int]) -> None:
    original = ContrastiveMethod.training_step

    def poisoned(self, batch, batch_idx):
        seen.append(self.global_step)
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= step else loss

    monkeypatch.setattr(ContrastiveMethod, "training_step", poisoned)


@pytest.mark.parametrize("check_every, last_step_run", [(1, 5), (50, 7)])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    cfg_factory, tmp_path, monkeypatch, check_every, last_step_run
):
    seen: list[int] = []
    poison_loss_from(monkeypatch, 5, seen)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg_factory(*TINY, "trainer.max_epochs=3", f"trainer.log_every_n_steps={check_every}"))
    message = str(err.value)
    assert "loss became NaN or infinite at step 5 (epoch 1)" in message
    assert (
        f"the last good checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} (end of epoch 0, step 4) was kept"
        in message
    )
    for cause in ("optim.lr=", "optim.warmup_epochs", "method.temperature="):
        assert cause in message
    # checked every step: stopped at once; otherwise at the end of the epoch, before validation and saving
    assert max(seen) == last_step_run
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_cli_huge_learning_rate_is_a_clear_error(tmp_path):
    result = cli(tmp_path, "optim.lr=1e30", "trainer.max_epochs=2", "data.batch_size=64", "backbone.width=8")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: training diverged: the loss became NaN or infinite at step" in result.stderr
    assert "optim.lr=1e+30" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# -- corrupt data --------------------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_root(root: Path, images: bytes, labels: bytes) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(images)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return raw


def fake_mnist(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10


def test_cli_truncated_data_file_names_the_file(tmp_path):
    images, labels = fake_mnist()
    raw = mnist_root(tmp_path / "data", idx_bytes(images, 2051)[:-100], idx_bytes(labels, 2049))
    result = cli(tmp_path, "data=mnist", f"data.root={tmp_path / 'data'}", "data.subset=test_split")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"file {raw / 't10k-images-idx3-ubyte'} is truncated: expected 47056 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_format_data_file_names_the_file(cfg_factory, tmp_path):
    _, labels = fake_mnist()
    # a labels file where the images belong
    raw = mnist_root(tmp_path / "data", idx_bytes(labels, 2049), idx_bytes(labels, 2049))
    cfg = cfg_factory("data=mnist", f"data.root={tmp_path / 'data'}", "data.subset=test_split", *TINY[2:])
    with pytest.raises(
        DataError,
        match=rf"file {raw / 't10k-images-idx3-ubyte'} is not an IDX image file "
        r"\(magic 2049, expected 2051\)",
    ):
        train(cfg)


# -- collapse --------------------------------------------------------------------------------------------------------
def collapse_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, CollapseWarning)]


def test_collapse_and_a_flat_loss_warn_once_each(cfg_factory, monkeypatch):
    collapse_projector(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = train(cfg_factory(*TINY, "trainer.max_epochs=4"))
    assert summary["embedding_std"] == 0
    messages = collapse_warnings(record)
    assert len(messages) == 2, messages
    collapse = next(m for m in messages if "collapsed" in m)
    stall = next(m for m in messages if "not moved" in m)
    assert "diag/embedding_std=0.00e+00" in collapse and "optim.lr" in collapse and "method.temperature" in collapse
    # a constant embedding gives SimCLR's loss its chance value, ln(2N - 1), every step
    loss = float(re.search(r"train/loss=([0-9.]+)", stall).group(1))
    assert loss == pytest.approx(np.log(2 * 16 - 1), abs=1e-5) and "optim.lr" in stall


def test_a_method_s_own_signs_of_collapse_go_through_the_same_alarm(cfg_factory, monkeypatch):
    asked = []

    def collapse_signs(self):
        asked.append(self.current_epoch)
        return "codes on one prototype" if self.current_epoch >= 1 else None

    monkeypatch.setattr(ContrastiveMethod, "collapse_signs", collapse_signs, raising=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(cfg_factory(*TINY, "trainer.max_epochs=5"))
    assert asked == [0, 1, 2, 3, 4]  # once per training epoch
    # three epochs in a row (1, 2, 3), then once only
    assert collapse_warnings(record) == ["codes on one prototype (for 3 epochs)"]


def test_a_learning_run_raises_no_collapse_warning(cfg_factory):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(cfg_factory(*TINY, "trainer.max_epochs=4"))
    assert collapse_warnings(record) == []
