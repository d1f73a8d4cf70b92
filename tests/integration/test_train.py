"""End-to-end: train(cfg) on synthetic data, the CLI in a subprocess, and clear errors for bad data paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contrastive.train import train


def test_simclr_loss_falls_and_metrics_written(cfg_factory, tmp_path):
    cfg = cfg_factory("method=simclr", "trainer.max_epochs=4", "data.size=512", "data.batch_size=64")
    metrics = train(cfg)
    history = metrics["history"]
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "method",
        "data",
        "backbone",
        "epochs",
        "global_batch_size",
        "knn_acc",
        "knn_acc_1shot",
        "knn_acc_10shot",
        "init_knn_acc_1shot",
        "linear_acc",
        "images_per_sec",
        "peak_mem_mb",
        "train_time_s",
    ):
        assert key in saved, key
    assert saved["method"] == "simclr" and saved["epochs"] == 4 and saved["global_batch_size"] == 64
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "logs" / "metrics.csv").is_file()
    assert 0 <= saved["knn_acc"] <= 100 and saved["images_per_sec"] > 0


def test_cli_writes_metrics(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        "data=synthetic",
        "data.size=128",
        "data.batch_size=32",
        "backbone.width=8",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.linear_epochs=0",
        "eval.fewshot_seeds=1",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "simclr" and metrics["data"] == "synthetic"
    assert "knn_acc" in result.stdout


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_data_root_is_a_clear_cli_error(tmp_path, name):
    missing = tmp_path / "nope"
    cmd = [
        sys.executable,
        "-m",
        "contrastive.train",
        f"data={name}",
        f"data.root={missing}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "data.root" in result.stderr
    assert "Traceback" not in result.stderr
