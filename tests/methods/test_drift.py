"""The drift measure: 0 for an encoder that did not change, growing with a known perturbation of its weights, on the
exact views behind the stored keys; recorded per epoch by the bank and queue methods, without touching training."""

from __future__ import annotations

import json

import torch
from conftest import make_cfg

from contrastive.metrics.drift import DriftProbe
from contrastive.report import Run, survey_claims
from contrastive.train import train


def encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 8),
    ).eval()


def test_drift_is_zero_without_change_and_grows_with_the_perturbation():
    net, probe = encoder(), DriftProbe(slots=4, rows=3)
    for step in range(4):
        probe.record(step * 10, torch.randn(5, 1, 8, 8), net)
    unchanged = probe.measure(35, net, window=100)
    assert unchanged["drift"] == 0.0 and unchanged["drift_samples"] == 12
    assert unchanged["drift_age_steps"] == 35 - (0 + 10 + 20 + 30) / 4
    drifts = []
    original = [p.detach().clone() for p in net.parameters()]
    for scale in (0.01, 0.1, 1.0):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p, p0 in zip(net.parameters(), original):
                p.copy_(p0 + scale * torch.randn(p.shape, generator=gen))
        drifts.append(probe.measure(35, net, window=100)["drift"])
    assert 0 < drifts[0] < drifts[1] < drifts[2]


def test_drift_reads_the_stored_views_and_their_keys_when_written():
    net, probe = encoder(), DriftProbe(slots=2, rows=2)
    views = torch.randn(2, 1, 8, 8)
    probe.record(0, views, net)
    with torch.no_grad():
        net[-1].weight.mul_(-1)  # every key flips sign: cosine -1 with the written one
        net[-1].bias.mul_(-1)
    assert abs(probe.measure(1, net, window=10)["drift"] - 2.0) < 1e-5
    assert probe.measure(11, net, window=10) == {}  # outside the window: no longer in the dictionary


def test_runs_record_drift_age_and_regime(tmp_path):
    for method, extra in (("memory_bank", []), ("moco", ["method.queue_size=64"])):
        out = tmp_path / method
        train(
            make_cfg(
                [f"method={method}", *extra, "eval.init=false", "eval.pixels=false", "eval.final=false"], tmp_path=out
            )
        )
        saved = json.loads((out / "metrics.json").read_text())
        assert 0 <= saved["drift"] <= 2 and saved["drift_age_steps"] >= 0
        per_epoch = 205 // 32  # 256 synthetic images, 205 for training
        assert abs(saved["drift_age_epochs"] - saved["drift_age_steps"] / per_epoch) < 1e-4
        ratio = 1.0 if method == "memory_bank" else 64 / 205  # a bank holds the whole training set
        assert abs(saved["dictionary_ratio"] - ratio) < 1e-4
        assert all("drift" in record for record in saved["history"])


def test_claim_b_is_judged_on_drift_when_recorded(tmp_path):
    def run(name, family_method, drift, seed):
        metrics = {
            "method": family_method,
            "knn_acc": 50.0,
            "drift": drift,
            "drift_age_epochs": 0.5,
            "dictionary_ratio": 1.0,
            "staleness": 0.5,
        }
        return Run(f"{name}{seed}", tmp_path, metrics, {"seed": str(seed)})

    runs = [run("b", "memory_bank", 0.10 + s / 100, s) for s in range(3)] + [
        run("m", "moco", 0.02 + s / 100, s) for s in range(3)
    ]
    claim = survey_claims(runs)[1]
    assert claim.verdict == "holds" and "encoder drift" in claim.rule and "regime" in claim.evidence
