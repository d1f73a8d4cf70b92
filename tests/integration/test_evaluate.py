"""Offline evaluation of a checkpoint: same figures as the run's own summary, overrides honoured, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_cfg

from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.evaluate import evaluate_checkpoint, main
from contrastive.methods import METHODS
from contrastive.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny MoCo run (a momentum encoder and a queue in the checkpoint), shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    train(
        make_cfg(
            ["method=moco", "method.queue_size=128", "trainer.max_epochs=1", "eval.init=false", "eval.pixels=false"],
            tmp_path=out,
        )
    )
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contrastive.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )


def test_checkpoint_reproduces_the_runs_figures(run):
    saved = json.loads((run / "metrics.json").read_text())
    got = evaluate_checkpoint(run / "checkpoints" / "last.ckpt")
    assert got.pop("method") == "moco" and got.pop("data") == "synthetic"
    assert got.pop("ckpt") == str(run / "checkpoints" / "last.ckpt")
    assert {"knn_acc", "knn_acc_1shot", "knn_acc_10shot", "fewshot_linear_acc_1shot"} <= set(got)
    assert got == {k: saved[k] for k in got}


def test_cli_prints_the_same_figures(run):
    saved = json.loads((run / "metrics.json").read_text())
    result = cli(f"ckpt={run / 'checkpoints' / 'last.ckpt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed["knn_acc"] == saved["knn_acc"]
    assert printed["knn_acc_1shot"] == saved["knn_acc_1shot"]
    assert printed["knn_acc_10shot"] == saved["knn_acc_10shot"]


def test_eval_override_is_applied(run):
    """``eval.knn_k=1`` makes the weighted kNN a nearest-neighbour classifier: compare with a direct loop."""
    ckpt = run / "checkpoints" / "last.ckpt"
    got = evaluate_checkpoint(ckpt, {"eval": {"knn_k": 1, "shots": [1]}})
    assert "knn_acc_10shot" not in got and "knn_acc_1shot" in got

    model = METHODS["moco"].load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = ContrastiveDataModule(model.cfg.data)
    with torch.no_grad():
        train_loader, val_loader = dm.eval_loaders()
        encoded = [
            [(model.backbone(model.eval_transform(x)), y) for x, y, _ in loader]
            for loader in (train_loader, val_loader)
        ]
        (train_feats, train_labels), (val_feats, val_labels) = ([torch.cat(t) for t in zip(*e)] for e in encoded)
    train_feats, val_feats = F.normalize(train_feats, dim=1), F.normalize(val_feats, dim=1)
    correct = 0
    for f, y in zip(val_feats, val_labels):
        nearest = max(range(len(train_feats)), key=lambda j: float(train_feats[j] @ f))
        correct += int(train_labels[nearest] == y)
    assert got["knn_acc"] == pytest.approx(100 * correct / len(val_labels), abs=0.01)


def test_unknown_override_key_is_an_error(run, capsys):
    assert main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "eval.knn=5"]) == 2
    err = capsys.readouterr().err
    assert "eval.knn" in err and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_cli_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    result = cli(f"ckpt={missing}")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_ckpt_argument_prints_usage(capsys):
    assert main(["eval.knn_k=5"]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["text", "tensor", "dict", "lightning"])
def test_non_contrastive_file_is_a_clear_error(tmp_path, capsys, content):
    path = tmp_path / "other.ckpt"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "dict":
        torch.save({"weight": torch.zeros(3)}, path)
    else:  # a Lightning checkpoint of some other module: hyperparameters, but not ours
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="not a contrastive checkpoint"):
        evaluate_checkpoint(path)
    assert main([f"ckpt={path}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a contrastive checkpoint" in err


def test_features_are_extracted_without_autograd_graphs():
    """Each feature kept with its image's autograd graph held every activation of the evaluation: about 8 GB on the
    8,000 CIFAR-10 training images of the CPU benchmark (a tuning trial was killed for memory)."""
    from conftest import build

    from contrastive.evaluate import extract_features

    model, dm = build(make_cfg([]))
    feats, _ = extract_features(model.backbone, model.eval_transform, dm.eval_loaders()[1], torch.device("cpu"))
    assert not feats.requires_grad and feats.grad_fn is None
