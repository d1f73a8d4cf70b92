"""The loggers end to end, from the command line: wandb (offline) and TensorBoard write their files, and the metrics
in them are the ones the CSV log holds."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO

# the shared quick run, without its logger (each test picks one)
RUN = [o for o in FAST if not o.startswith("logger=")] + ["eval.init=false", "eval.pixels=false"]


def run_cli(out: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "contrastive.train", *RUN, *overrides, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]


def csv_last(out: Path, key: str) -> float:
    rows = [r for r in csv.DictReader((out / "logs" / "metrics.csv").open()) if r.get(key)]
    return float(rows[-1][key])


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, block, pending = 7, 32768, b""  # the file opens with a 7-byte W&B header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_writes_its_metrics(tmp_path):
    run_cli(tmp_path, "logger=wandb", "logger.offline=true", env={"WANDB_SILENT": "true"})
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(tmp_path.rglob("*"))
    history: dict[str, list[float]] = {}
    for record in wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    assert len(history["val/knn_acc"]) == 2  # one per epoch
    assert history["val/knn_acc"][-1] == pytest.approx(csv_last(tmp_path, "val/knn_acc"))
    assert history["train/loss_epoch"][-1] == pytest.approx(csv_last(tmp_path, "train/loss_epoch"))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


def test_tensorboard_run_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli(tmp_path, "logger=tensorboard")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val/knn_acc", "train/loss_epoch", "diag/uniformity"} <= set(tags), tags
    knn = acc.Scalars("val/knn_acc")
    assert len(knn) == 2
    assert knn[-1].value == pytest.approx(csv_last(tmp_path, "val/knn_acc"))
    assert (tmp_path / "logs" / "metrics.csv").is_file()  # the report reads the CSV beside it
