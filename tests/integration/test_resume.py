"""Exact resume: a run that crashed and was resumed ends bitwise where an uninterrupted run ends (CPU, deterministic),
for every method; ``resume=auto`` finds the run folder's checkpoint; incompatible checkpoints are refused."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_cfg

from contrastive.callbacks import RNGState, rng_state, set_rng_state
from contrastive.checkpoints import find_resume_checkpoint
from contrastive.errors import ConfigError
from contrastive.methods.base import ContrastiveMethod
from contrastive.train import train

# 80 images -> 64 for training: 4 steps of 16 per epoch, 3 epochs; the crash hits the first step of the last epoch
TINY = [
    "data.size=80",
    "data.batch_size=16",
    "backbone.width=4",
    "method.probe_size=16",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "eval.init=false",
    "eval.pixels=false",
    "eval.final=false",
]
STEPS_PER_EPOCH, CRASH_STEP = 4, 8
METHODS = {
    "simclr": [],
    "memory_bank": [],
    "moco": ["method.queue_size=32"],
    # a queue that fills after two steps, so the resumed run continues with a full, active queue
    "swav": ["method.num_prototypes=8", "method.feature_queue_size=32"],
}


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    original = ContrastiveMethod.training_step

    def crashing(self, batch, batch_idx):
        if self.global_step == step:
            raise Crash(f"simulated crash at step {step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ContrastiveMethod, "training_step", crashing)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b, where: str = "checkpoint") -> None:
    """Same structure, and every tensor with the same dtype, shape and bytes (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        assert a == b or both_nan, f"{where}: {a!r} != {b!r}"


def without_timing(history: list[dict]) -> list[dict]:
    """History records less their wall-clock times, which no two runs share."""
    return [{k: v for k, v in record.items() if k != "wall_s"} for record in history]


def rng_key(checkpoint: dict) -> str:
    return next(k for k in checkpoint["callbacks"] if k.startswith(RNGState.__qualname__))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per method, made on first use: (its final checkpoint's path, contents, summary)."""
    runs: dict[str, tuple[Path, dict, dict]] = {}

    def get(method: str) -> tuple[Path, dict, dict]:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"full_{method}")
            summary = train(make_cfg([f"method={method}", *TINY, *METHODS[method]], tmp_path=out))
            path = out / "checkpoints" / "last.ckpt"
            runs[method] = path, load(path), summary
        return runs[method]

    return get


def crash_then_resume(monkeypatch, out: Path, method: str, resume: list[str]) -> dict:
    overrides = [f"method={method}", *TINY, *METHODS[method]]
    with monkeypatch.context() as patch:
        crash_at(patch, CRASH_STEP)
        with pytest.raises(Crash):
            train(make_cfg(overrides, tmp_path=out))
    saved = load(out / "checkpoints" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (CRASH_STEP // STEPS_PER_EPOCH - 1, CRASH_STEP)
    return train(make_cfg(overrides + resume, tmp_path=out))


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_ends_bitwise_like_an_uninterrupted_one(method, tmp_path, monkeypatch, uninterrupted):
    _, full, full_summary = uninterrupted(method)
    summary = crash_then_resume(monkeypatch, tmp_path, method, [f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    resumed = load(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == full["global_step"] == 3 * STEPS_PER_EPOCH
    # weights and every buffer: momentum encoder, queue, bank, prototypes, BN statistics
    assert_bitwise_equal(full["state_dict"], resumed["state_dict"], "state_dict")
    assert_bitwise_equal(full["optimizer_states"], resumed["optimizer_states"], "optimizer_states")
    assert_bitwise_equal(full["lr_schedulers"], resumed["lr_schedulers"], "lr_schedulers")
    assert_bitwise_equal(full["callbacks"][rng_key(full)], resumed["callbacks"][rng_key(resumed)], "rng")
    # the per-epoch history (losses, kNN, diagnostics) covers all epochs, the first two from the checkpoint
    assert [r["epoch"] for r in summary["history"]] == [0, 1, 2]
    assert without_timing(summary["history"]) == without_timing(full_summary["history"])


def test_resume_auto_continues_the_run_folder(tmp_path, monkeypatch, uninterrupted, caplog):
    _, full, _ = uninterrupted("simclr")
    with caplog.at_level(logging.INFO, logger="contrastive"):
        crash_then_resume(monkeypatch, tmp_path, "simclr", ["resume=auto"])
    assert f"resume=auto: resuming from {tmp_path / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert_bitwise_equal(full["state_dict"], load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"])
    # Lightning's CSV logger would delete the interrupted part's log; it is kept beside the new one
    (kept,) = (tmp_path / "logs").glob("metrics.before-resume-*.csv")
    with kept.open() as f:
        assert {row["epoch"] for row in csv.DictReader(f) if row["train/loss_epoch"]} == {"0", "1"}
    with (tmp_path / "logs" / "metrics.csv").open() as f:
        assert {row["epoch"] for row in csv.DictReader(f) if row["train/loss_epoch"]} == {"2"}


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="contrastive"):
        summary = train(make_cfg(["method=simclr", *TINY, "trainer.max_epochs=1", "resume=auto"], tmp_path=tmp_path))
    assert f"resume=auto: no simclr checkpoint in {tmp_path / 'checkpoints'}; starting a fresh run" in caplog.text
    assert summary["epochs"] == 1 and summary["global_steps"] == STEPS_PER_EPOCH


def fake_checkpoint(path: Path, method: str, mtime: float) -> Path:
    torch.save({"hyper_parameters": {"cfg": {"method": {"name": method}}}, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_find_resume_checkpoint_takes_the_newest_of_the_method(tmp_path):
    old = fake_checkpoint(tmp_path / "last.ckpt", "moco", 1000)
    newer = fake_checkpoint(tmp_path / "last-v1.ckpt", "moco", 2000)
    fake_checkpoint(tmp_path / "last-v2.ckpt", "simclr", 3000)
    broken = tmp_path / "last-v3.ckpt"
    broken.write_bytes(b"not a checkpoint")
    os.utime(broken, (4000, 4000))
    (tmp_path / ".last.ckpt.123.abcd1234.tmp").write_bytes(b"half")  # a save cut short: never a candidate
    path, line = find_resume_checkpoint(tmp_path, "moco")
    assert path == newer != old
    assert line == f"resume=auto: resuming from {newer}"
    path, line = find_resume_checkpoint(tmp_path, "swav")
    assert path is None
    assert line == (
        f"resume=auto: no swav checkpoint in {tmp_path}; skipped last-v3.ckpt (unreadable), "
        "last-v2.ckpt (method simclr), last-v1.ckpt (method moco), last.ckpt (method moco); "
        "starting a fresh run"
    )
    assert find_resume_checkpoint(tmp_path / "absent", "moco")[0] is None


@pytest.mark.parametrize("finished", [False, True], ids=["interrupted", "finished"])
def test_resume_auto_with_another_method_is_refused_and_keeps_the_run(tmp_path, finished):
    """An interrupted (or finished) MoCo run folder is never trained over by resume=auto with method=simclr: refused
    before any work, naming the folder and both methods, and not advising the resume=auto it was given."""
    (tmp_path / "checkpoints").mkdir()
    ckpt = fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", "moco", 1000)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch,train/loss_epoch\n0,1.0\n")
    if finished:
        (tmp_path / "metrics.json").write_text('{"method": "moco"}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cfg = make_cfg(["method=simclr", *TINY, "resume=auto"], tmp_path=tmp_path)
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    message = str(caught.value)
    assert str(tmp_path) in message and "method=moco" in message and "method=simclr" in message
    assert "continue it with resume=auto" not in message
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert ckpt.is_file()


def test_resume_auto_on_a_finished_summary_without_checkpoint_gives_no_resume_advice(tmp_path):
    (tmp_path / "metrics.json").write_text('{"method": "simclr"}')
    with pytest.raises(ConfigError, match="already holds a finished run") as caught:
        train(make_cfg(["method=simclr", *TINY, "resume=auto"], tmp_path=tmp_path))
    assert "resume=auto" not in str(caught.value)


def test_checkpoint_of_another_shape_is_refused(tmp_path, uninterrupted):
    ckpt = uninterrupted("simclr")[0]
    cfg = make_cfg(["method=simclr", *TINY, "backbone.width=8", f"ckpt_path={ckpt}"], tmp_path=tmp_path / "run")
    with pytest.raises(
        ConfigError,
        match=r"does not fit this config's model \(backbone\.net\.0\.weight has shape "
        r"\[4, 1, 3, 3\], this config gives \[8, 1, 3, 3\]",
    ):
        train(cfg)


def test_rng_state_round_trip():
    state = rng_state()
    drawn = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state)
    again = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


def test_cli_resume_continues_where_it_stopped(tmp_path):
    first = train(make_cfg(["method=simclr", *TINY, "trainer.max_epochs=1"], tmp_path=tmp_path / "first"))
    assert first["global_steps"] == STEPS_PER_EPOCH
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "data=synthetic",
        "method=simclr",
        *TINY,
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "method.proj_hidden_dim=32",
        "method.proj_out_dim=16",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={tmp_path / 'second'}",
    ]
    result = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_steps"] == 2 * STEPS_PER_EPOCH
    assert [r["epoch"] for r in metrics["history"]] == [0, 1]
    assert metrics["history"][0] == first["history"][0]


def test_resume_auto_keeps_a_finished_run_only_with_its_settings(tmp_path, caplog):
    overrides = ["method=simclr", *TINY, "trainer.max_epochs=1", "resume=auto"]
    first = train(make_cfg(overrides, tmp_path=tmp_path))
    with caplog.at_level(logging.INFO, logger="contrastive"):
        again = train(make_cfg([*overrides, "data.num_workers=0"], tmp_path=tmp_path))
    assert "had already finished" in caplog.text and again["final_loss"] == first["final_loss"]
    # the same folder asked for other settings (a retuned temperature): refused before anything trains
    kept = (tmp_path / "metrics.json").read_text()
    with pytest.raises(
        ConfigError, match=r"finished run with other settings: method\.temperature \(ran 0\.2, now 0\.3\)"
    ):
        train(make_cfg([*overrides, "method.temperature=0.3"], tmp_path=tmp_path))
    assert (tmp_path / "metrics.json").read_text() == kept
