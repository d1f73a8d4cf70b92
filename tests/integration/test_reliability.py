"""Reliability, round two (issue 17): no code run from a checkpoint, no stale or poisoned "last good" state,
overrides on resume applied or refused, finished runs kept, sweeps that finish, signals, corrupt inputs named."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, collapse_projector, make_cfg
from torch import nn

from contrastive.checkpoints import read_checkpoint
from contrastive.data.datasets import DataError, ImageFolderDataset, read_idx
from contrastive.errors import ConfigError, TrainingDiverged
from contrastive.evaluate import main as evaluate_main
from contrastive.methods.base import ContrastiveMethod
from contrastive.train import train

STEPS = 4


def run(out: Path, *overrides: str) -> dict:
    return train(make_cfg([*TINY, *overrides], tmp_path=out))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "OMP_NUM_THREADS": "1"}


CLI_FAST = [
    "data=synthetic",
    *TINY,
    "method.proj_hidden_dim=32",
    "method.proj_out_dim=16",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run folder (read-only for the tests: copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished")
    run(out, "trainer.max_epochs=1")
    return out


# -- 1: no entry point unpickles arbitrary objects ---------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_evaluate_never_runs_code_from_a_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"cfg": {}, "num_train": 1}, "state_dict": {}, "x": Payload(marker)}, path)
    assert evaluate_main([f"ckpt={path}"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"error: ckpt='{path}' is not a contrastive checkpoint" in err and "Traceback" not in err


# -- 2: the last good checkpoint is good -----------------------------------------------------------------------
def poison_buffer_from(monkeypatch, step: int) -> None:
    """From ``step`` on, a BatchNorm running variance becomes infinite while the loss stays finite."""
    from contrastive.methods.base import InstanceDiscrimination

    original = InstanceDiscrimination.on_train_batch_end

    def poisoned(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step > step:  # after the optimiser step of `step`
            bn = next(m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))

    monkeypatch.setattr(InstanceDiscrimination, "on_train_batch_end", poisoned)


def test_non_finite_buffer_is_never_saved_as_good(tmp_path, monkeypatch):
    poison_buffer_from(monkeypatch, STEPS + 1)  # epoch 1
    with pytest.raises(TrainingDiverged) as err:
        run(tmp_path, "trainer.max_epochs=3")
    message = str(err.value)
    assert "running_var" in message and "not finite" in message
    assert f"the last good checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} (end of epoch 0" in message
    saved = load(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == STEPS
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def poison_loss_from(monkeypatch, step: int) -> None:
    original = ContrastiveMethod.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= step else loss

    monkeypatch.setattr(ContrastiveMethod, "training_step", poisoned)


def test_collapsed_checkpoint_is_not_called_good(tmp_path, monkeypatch):
    collapse_projector(monkeypatch)
    poison_loss_from(monkeypatch, STEPS + 1)
    with pytest.raises(TrainingDiverged) as err:
        run(tmp_path, "trainer.max_epochs=3", "trainer.log_every_n_steps=1")
    message = str(err.value)
    assert "last good" not in message
    assert f"{tmp_path / 'checkpoints' / 'last.ckpt'}" in message and "collapsed" in message
    assert "diag/embedding_std=0.00e+00" in message


def test_resumed_run_divergence_names_its_own_folder(tmp_path, monkeypatch, finished):
    poison_loss_from(monkeypatch, STEPS)
    with pytest.raises(TrainingDiverged) as err:
        run(
            tmp_path / "b",
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=1",
            f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}",
        )
    message = str(err.value)
    assert f"no checkpoint had been written in {tmp_path / 'b' / 'checkpoints'}" in message
    assert f"resumed from {finished / 'checkpoints' / 'last.ckpt'}, which is unchanged" in message


# -- 3: overrides on resume --------------------------------------------------------------------------------------
def test_optimiser_overrides_apply_on_resume(tmp_path, finished):
    ckpt = finished / "checkpoints" / "last.ckpt"
    common = ["optim.scheduler=constant", "optim.warmup_epochs=0", "trainer.max_epochs=2"]
    run(tmp_path / "same", *common, f"ckpt_path={ckpt}")
    run(tmp_path / "lower", *common, f"ckpt_path={ckpt}", "optim.lr=0.006", "optim.weight_decay=0.001")
    same = load(tmp_path / "same" / "checkpoints" / "last.ckpt")
    lower = load(tmp_path / "lower" / "checkpoints" / "last.ckpt")
    scale = 16 / 256  # optim.scale_lr: batch 16
    base = make_cfg(TINY).optim
    group, group_same = lower["optimizer_states"][0]["param_groups"][0], same["optimizer_states"][0]["param_groups"][0]
    assert group_same["lr"] == pytest.approx(base.lr * scale) and group_same["weight_decay"] == base.weight_decay
    assert group["lr"] == pytest.approx(0.006 * scale) and group["weight_decay"] == 0.001
    assert lower["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(0.006 * scale)
    # the override changed the trained weights
    key = "backbone.net.0.weight"
    assert not torch.equal(same["state_dict"][key], lower["state_dict"][key])


def test_resume_refuses_what_cannot_be_applied(tmp_path, finished):
    ckpt = finished / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"optim\.name=adamw.*trained with optim\.name='sgd'"):
        run(tmp_path, "trainer.max_epochs=2", "optim=adamw", f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError, match=r"cannot be applied on resume: seed \(checkpoint 0, now 3\)"):
        run(tmp_path, "trainer.max_epochs=2", "seed=3", f"ckpt_path={ckpt}")
    assert not (tmp_path / "config.yaml").exists()


# -- 4: last.ckpt is this run's newest epoch end ------------------------------------------------------------------
def test_last_checkpoint_written_every_epoch_without_validation(tmp_path):
    run(tmp_path, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2")
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3 * STEPS


def test_copied_run_folder_resumes_into_its_own_last_checkpoint(tmp_path, finished):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "metrics.json").unlink()  # as if interrupted after its first epoch
    run(copy, "trainer.max_epochs=2", "resume=auto")
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load(copy / "checkpoints" / "last.ckpt")["global_step"] == 2 * STEPS


def test_resume_auto_past_a_corrupt_last_checkpoint_replaces_it(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    run(tmp_path, "trainer.max_epochs=1", "resume=auto")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert load(folder / "last.ckpt")["global_step"] == STEPS


# -- 5: a finished run is not overwritten ------------------------------------------------------------------------
def test_new_run_into_a_finished_folder_is_refused(tmp_path, finished):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = {name: (copy / name).read_bytes() for name in ("config.yaml", "metrics.json")}
    with pytest.raises(ConfigError, match=r"already holds a run .*resume=auto.*new folder"):
        run(copy, "trainer.max_epochs=1")
    assert before == {name: (copy / name).read_bytes() for name in before}


def test_resume_auto_on_a_finished_run_keeps_its_summary(tmp_path, finished):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = json.loads((copy / "metrics.json").read_text())
    config = (copy / "config.yaml").read_text()
    summary = run(copy, "trainer.max_epochs=1", "resume=auto")
    text = (copy / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text) == before
    assert (copy / "config.yaml").read_text() == config
    assert summary["final_loss"] == before["final_loss"]
    # other settings would be reported under this run's name with the old figures: refused, nothing touched
    with pytest.raises(ConfigError, match=r"finished run with other settings: optim\.lr \(ran 0\.06, now 0\.01\)"):
        run(copy, "trainer.max_epochs=1", "resume=auto", "optim.lr=0.01")
    assert json.loads((copy / "metrics.json").read_text()) == before
    assert (copy / "config.yaml").read_text() == config


def test_json_never_holds_nan():
    from contrastive.errors import json_safe

    data = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}}
    assert json_safe(data) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


# -- 6: a sweep goes on past a failed job ------------------------------------------------------------------------
def test_multirun_continues_past_a_failed_job(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "-m",
        *CLI_FAST,
        "trainer.max_epochs=1",
        "method.temperature=0,0.1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env=cli_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()
    assert "error: method.temperature=0.0 must be > 0" in result.stderr
    assert "1 of 2 jobs failed: #0 (method.temperature=0) exit 2" in result.stderr
    assert "Traceback" not in result.stderr


# -- 7: a stopped run says so --------------------------------------------------------------------------------------
def test_sigterm_stops_with_a_message_and_a_non_zero_code(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "contrastive.train", *CLI_FAST, "trainer.max_epochs=500", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
    deadline = time.time() + 240
    while not (out / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "error: stopped by SIGTERM at step" in err
    assert f"{out / 'checkpoints' / 'last.ckpt'} holds the end of epoch" in err and "resume=auto" in err
    assert not (out / "metrics.json").exists()


# -- 8: values checked, internal schemas hidden, `+` refused -------------------------------------------------------
def test_misspelt_key_added_with_plus_is_refused(tmp_path):
    from contrastive.validate import validate

    cfg = make_cfg(["+method.temprature=0.1"], tmp_path=tmp_path)
    with pytest.raises(
        ConfigError, match=r"method\.temprature is not a key of method.*did you mean method\.temperature"
    ):
        validate(cfg)


def test_schema_entries_are_not_options(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(["method=instance_schema"])
    assert "instance_schema" in str(err.value) and "Available options" in str(err.value)
    assert "swav_schema" not in str(err.value)


def test_evaluate_checks_override_values_before_work(finished, capsys):
    ckpt = finished / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    assert evaluate_main([f"ckpt={ckpt}", "eval.linear_epochs=abc"]) == 2
    assert "eval.linear_epochs" in capsys.readouterr().err
    assert evaluate_main([f"ckpt={ckpt}", "eval.knn_k=0"]) == 2
    assert "eval.knn_k=0 must be >= 1" in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_hydra_errors_exit_like_ours(tmp_path):
    cmd = [sys.executable, "-m", "contrastive.train", "method=nope", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=REPO, env=cli_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Could not find 'method/nope'" in result.stderr and "instance_schema" not in result.stderr


# -- 9: corrupt inputs named ------------------------------------------------------------------------------------------
def test_damaged_gzip_stream_is_named(tmp_path):
    raw = (2049).to_bytes(4, "big") + (500).to_bytes(4, "big") + bytes(np.arange(500) % 10)
    data = bytearray(gzip.compress(raw))
    data[20:30] = b"\xff" * 10  # inside the deflate stream
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"file {path} is a truncated or damaged gzip file"):
        read_idx(path, "labels")


def image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.jpg")
    return root


def test_truncated_jpeg_is_named(tmp_path):
    root = image_folder(tmp_path)
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    ds = ImageFolderDataset(root / "train", 16, 3)
    with pytest.raises(DataError, match=rf"file {bad} is truncated or damaged"):
        ds[1]


def test_decompression_bomb_is_named(tmp_path, monkeypatch):
    from PIL import Image

    root = image_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is more than twice this
    ds = ImageFolderDataset(root / "train", 16, 3)
    with pytest.raises(DataError, match=rf"file {root / 'train' / 'a' / '0.jpg'} is a decompression bomb"):
        ds[0]


def test_loader_worker_error_prints_clean():
    from contrastive.errors import clean_error_message

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ncontrastive.data.datasets.DataError: file /a/b.jpg is truncated\n'
    )
    assert clean_error_message(wrapped) == "file /a/b.jpg is truncated"


# -- 10: a checkpoint's checksums are verified ---------------------------------------------------------------------
def flip_tensor_bytes(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # the local header: 30 bytes + name + extra field, then the stored (uncompressed) bytes
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start : start + 4] = bytes(b ^ 0xFF for b in data[start : start + 4])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path, finished, capsys):
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(finished / "checkpoints" / "last.ckpt", ckpt)
    flip_tensor_bytes(ckpt)
    with pytest.raises(ValueError, match=r"checksum"):
        read_checkpoint(ckpt)
    assert evaluate_main([f"ckpt={ckpt}"]) == 2
    assert "checksum" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=rf"ckpt_path='{ckpt}'.*checksum"):
        run(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={ckpt}")


def test_resume_reads_its_checkpoint_through_the_one_reader(tmp_path, finished, monkeypatch):
    """Lightning's load on resume goes through read_checkpoint as well (checksums, tensors only), not its torch.load."""
    from lightning.fabric.plugins.io import torch_io

    from contrastive import checkpoints

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    monkeypatch.setattr(torch_io, "pl_load", lambda *a, **k: pytest.fail("read by Lightning's own torch.load"))
    reads = []
    real = checkpoints.read_checkpoint
    monkeypatch.setattr(checkpoints, "read_checkpoint", lambda path: (reads.append(Path(path)), real(path))[1])
    summary = run(copy, "trainer.max_epochs=2", "resume=auto")
    assert summary["epochs"] == 2
    assert copy / "checkpoints" / "last.ckpt" in reads
    flip_tensor_bytes(copy / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="checksum"):
        checkpoints.AtomicCheckpointIO().load_checkpoint(copy / "checkpoints" / "last.ckpt", weights_only=True)


# -- also --------------------------------------------------------------------------------------------------------------
def test_stale_temporary_checkpoints_are_removed(tmp_path, finished):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    stale = copy / "checkpoints" / ".last.ckpt.123.abcd1234.tmp"
    stale.write_bytes(b"half")
    run(copy, "trainer.max_epochs=2", "resume=auto")
    assert not stale.exists()


def test_data_root_that_is_a_file(tmp_path):
    path = tmp_path / "cifar.tar"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=rf"data\.root='{path}' is a file, not a folder"):
        run(tmp_path / "run", "data=cifar10", f"data.root={path}")


def test_read_only_checkpoint_folder_fails_before_training(tmp_path, monkeypatch):
    # tests may run as root, for whom a read-only mode does not stop a write: refuse the write itself
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):
        if "checkpoints" in str(file) and any(m in mode for m in "wxa"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: read_only(self, "wb").write(data))
    with pytest.raises(
        ConfigError, match=rf"cannot write checkpoints into {tmp_path / 'checkpoints'} \(Permission denied\)"
    ):
        run(tmp_path, "trainer.max_epochs=1")
    assert not (tmp_path / "config.yaml").exists()


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, monkeypatch):
    # a path whose checkpoint temporary file would exceed PATH_MAX (the folders themselves fit)
    out = tmp_path
    while len(str(out)) < 4096 - 30:
        out = out / ("d" * min(200, 4096 - 30 - len(str(out)) - 1))
    steps: list[int] = []
    original = ContrastiveMethod.training_step
    monkeypatch.setattr(
        ContrastiveMethod, "training_step", lambda self, b, i: (steps.append(i), original(self, b, i))[1]
    )
    with pytest.raises(ConfigError, match=r"cannot write checkpoints into"):
        run(out, "trainer.max_epochs=1")
    assert steps == []


# -- round three (issue 31) ----------------------------------------------------------------------------------------
# a run (the command line's) that pauses at its first training step until the file `go` beside its folder appears
PAUSED_RUN = """
import sys, time
from pathlib import Path
from contrastive.errors import run_cli
from contrastive.methods.base import ContrastiveMethod
from contrastive.train import main

where, step = Path(sys.argv[1]), ContrastiveMethod.training_step
def paused(self, batch, batch_idx):
    (where / "training").touch()
    deadline = time.time() + 120
    while not (where / "go").exists() and time.time() < deadline:
        time.sleep(0.1)
    return step(self, batch, batch_idx)
ContrastiveMethod.training_step = paused
sys.argv = ["contrastive.train", *sys.argv[2:]]
run_cli(main)
"""


def test_second_live_run_into_a_folder_is_refused(tmp_path):
    """Issue 31, 5: a run started into the folder of a run still in its first epoch (no checkpoint yet) is refused
    with exit 2 naming the first run's pid; the first run is left to finish."""
    out = tmp_path / "run"
    args = [*CLI_FAST, "trainer.max_epochs=1", f"hydra.run.dir={out}"]
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=cli_env(),
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "training").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "training").exists(), first.communicate()[1][-3000:]
        second = subprocess.run(
            [sys.executable, "-m", "contrastive.train", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=cli_env(),
        )
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"error: the run folder {out} is in use by another run (pid {first.pid} on " in second.stderr
    assert first.returncode == 0, err[-3000:]
    assert json.loads((out / "metrics.json").read_text())["global_steps"] == STEPS
    assert not (out / ".run.lock").exists()
