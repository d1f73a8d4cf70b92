"""benchmarks/peer.py (issue 32) without lightly: the verdicts on fabricated figures, the report from fabricated run
folders, and the exit when lightly is missing. The comparison itself needs lightly's venv and hours: slow."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "benchmarks" / "peer.py"  # outside the installed package: imported from its folder
sys.path.insert(0, str(PEER.parent))
peer = importlib.import_module("peer")


def pair(project, lightly, method="moco", contender="lightly"):
    return peer.Pair(method, contender, list(project), list(lightly), list(range(len(project))))


def test_close_curves_are_equivalent():
    (comp,) = peer.compare_pairs([pair([60.1, 61.0, 59.8], [60.3, 60.9, 60.0])])
    assert comp.outcome == "equivalent"
    assert peer.verdict(comp, "moco", "lightly").startswith("equivalent within ±2")


def test_a_gap_beyond_the_margin_is_a_named_difference():
    (comp,) = peer.compare_pairs([pair([60.1, 61.0, 59.8], [55.0, 56.2, 54.9])])
    text = peer.verdict(comp, "moco", "lightly")
    assert comp.outcome == "worse" and text.startswith("different: the project ahead by 4.93")
    assert "differences by construction" in text  # the MoCo pair lists its causes (lightly #564, ...)


def test_a_small_gap_with_noise_is_undecided_and_one_seed_is_no_test():
    (comp,) = peer.compare_pairs([pair([60.0, 64.0, 56.0], [59.0, 66.0, 55.0])])
    assert peer.verdict(comp, "swav", "lightly").startswith("undecided")
    (one,) = peer.compare_pairs([pair([60.0], [58.5])])
    assert peer.verdict(one, "swav", "lightly") == "no test (1 seed): lightly - project -1.50"


def test_holm_runs_over_every_pair():
    comps = peer.compare_pairs([pair([60.1, 61.0, 59.8], [60.3, 60.9, 60.0]), pair([50, 52, 51], [50.5, 51.5, 51.2])])
    assert all(c.p_equiv_adjusted is not None and c.p_equiv_adjusted >= c.p_equiv for c in comps)


def fake_run(folder: Path, knn: float, curve: list[float], wall: float) -> None:
    folder.mkdir(parents=True)
    history = [{"epoch": i, "knn_acc": v} for i, v in enumerate(curve)]
    summary = {"knn_acc": knn, "history": history, "peer_wall_s": wall, "epochs": len(curve)}
    summary |= {"split_sizes": {"train": 80, "validation": 10, "test": 10}}
    summary |= {"eval_split": "test", "monitor_split": "validation"}
    (folder / "metrics.json").write_text(json.dumps(summary))


def test_report_from_run_folders(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, shift in enumerate([0.0, 0.3, -0.2]):
        fake_run(runs / f"seed{seed}" / "simclr-project", 50 + shift, [40, 45, 50 + shift], 100)
        fake_run(runs / f"seed{seed}" / "simclr-lightly", 50.2 + shift, [40, 45.5, 50.2 + shift], 110)
        fake_run(runs / f"seed{seed}" / "simclr-lightly_pipeline", 44 + shift, [38, 41, 44 + shift], 90)
    text = peer.report(runs, out, 2.0, "python benchmarks/peer.py")
    table = json.loads((out / "peer.json").read_text())
    verdicts = {(p["method"], p["contender"]): p["verdict"] for p in table["pairs"]}
    assert verdicts[("simclr", "lightly")].startswith("equivalent")
    assert verdicts[("simclr", "lightly_pipeline")].startswith("different: the project ahead by 6.00")
    assert table["runs"]["simclr/lightly/seed1"]["curve"] == [40, 45.5, 50.5]
    assert (out / "curves.png").stat().st_size > 0 and (out / "README.md").read_text() == text
    assert "memory_bank: no peer" in text and "#564" in text
    assert "80 train / 10 validation / 10 test; per-epoch kNN on validation, final kNN on test" in text


@pytest.mark.skipif(importlib.util.find_spec("lightly") is not None, reason="lightly is importable here")
def test_without_lightly_it_says_how_to_get_it_and_exits_non_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CONTRASTIVE_LIGHTLY_PYTHON", peer.REEXEC_FLAG)}
    done = subprocess.run(
        [sys.executable, str(PEER), "--lightly", str(tmp_path / "no-python"), "--runs", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == peer.MISSING_LIGHTLY
    assert "--install-lightly" in done.stderr and "not a dependency" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained


# -- with lightly (its own venv): .venv-lightly/bin/python -m pytest -m slow tests/integration/test_peer.py ----------
needs_lightly = pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly is not importable")
DATA = ROOT.parent / "shared" / "data"


def built_pair(method):
    import lightning as L
    from omegaconf import OmegaConf

    from contrastive import methods

    cfg = OmegaConf.create(peer.compose(method, 0, 2, str(DATA)))
    L.seed_everything(0, verbose=False)
    project = methods.build_method(cfg, 8000)
    L.seed_everything(0, verbose=False)
    return cfg, project, peer.PEERS[(method, "lightly")](cfg, 8000)


def one_step(model):
    import torch

    from contrastive.negatives.base import Step

    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(128, 3, 32, 32, generator=gen) for _ in range(2)]
    return model.contrastive_loss(views, Step(torch.arange(128), torch.zeros(128, dtype=torch.long), 0, 0, None)).loss


@pytest.mark.slow
@needs_lightly
@pytest.mark.skipif(not (DATA / "cifar10" / "cifar10_test.npz").is_file(), reason="no CIFAR-10 archive")
def test_lightly_sides_start_from_the_project_init_and_simclr_steps_alike():
    """Same start for every pair; SimCLR's step is the same loss and gradient, so its runs differ only by rounding
    amplified over training (noise); SwAV's differs by lightly's prototype bias."""
    import torch

    for method in ("simclr", "moco", "swav"):
        _, project, lightly = built_pair(method)
        for x, y in zip(project.backbone.state_dict().values(), lightly.backbone.state_dict().values()):
            assert torch.equal(x, y)
        for x, y in zip(project.projector.state_dict().values(), lightly.projector.layers.state_dict().values()):
            assert torch.equal(x, y)
    assert torch.equal(project.prototypes.weight, lightly.prototypes.heads[0].weight)
    _, project, lightly = built_pair("simclr")
    a, b = one_step(project), one_step(lightly)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-6)
    for p, q in zip(project.backbone.parameters(), lightly.backbone.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * p.grad.abs().max()  # float rounding only
