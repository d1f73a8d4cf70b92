"""The tuning path (issue 29): Hydra's Optuna sweeper really runs the trials, each judged on the validation split
(never test), and ``contrastive.tune_record`` writes the best trial's settings and the trial table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TUNE = REPO / "conf" / "tune"
METHODS = ("simclr", "memory_bank", "moco", "swav")

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the tune extra: pip install -e '.[tune]'")


def test_every_method_has_a_search_space_of_the_same_shape():
    spaces = {m: yaml.safe_load((TUNE / f"{m}.yaml").read_text())["hydra"]["sweeper"]["params"] for m in METHODS}
    shared = list(spaces["simclr"].items())[:2]
    for method, space in spaces.items():
        items = list(space.items())
        assert items[:2] == shared, method  # the learning rate and the temperature over the same ranges
        assert len(items) == 5, method
        for key, spec in items[2:]:  # then three keys of the method's own, three values each
            assert re.fullmatch(r"choice\([^,()]+(, [^,()]+){2}\)", spec), (method, key, spec)


def test_a_two_trial_sweep_selects_on_validation_and_records_the_best(tmp_path):
    sweep, bundle, table = tmp_path / "sweep", tmp_path / "conf" / "simclr.yaml", tmp_path / "table"
    bundle.parent.mkdir()
    bundle.write_text("# @package _global_\n# Written by hand: kept.\nmethod:\n  proj_layers: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        *("experiment=tune_digits", "+tune=simclr", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2"),
        *("trainer.max_steps=3", "trainer.enable_progress_bar=false", "eval.fewshot_seeds=1", "backbone.width=8"),
        *("method.probe_size=16", "diagnostics=false", "data.batch_size=64"),
    ]

    def run(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

    run("contrastive.train", "-m", *command)
    # the sweeper ran: its study's result, and one run folder per trial with the sampler's settings
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(sweep.glob("trial_*/metrics.json"))
    assert len(trials) == 2
    values = {}
    for path in trials:
        metrics = json.loads(path.read_text())
        # judged on validation; the test split exists (data.test_fraction) and was never read
        assert metrics["eval_split"] == metrics["monitor_split"] == "validation"
        assert metrics["split_sizes"]["test"] > 0
        assert not any(key.startswith(("pixels_", "init_")) for key in metrics)
        values[path.parent.name] = metrics["knn_acc"]
    assert best["best_value"] == max(values.values())

    run("contrastive.tune_record", str(sweep), "--bundle", str(bundle), "--table", str(table))
    # the chosen settings, written into the bundle under a header naming the study, the table and the date
    text = bundle.read_text()
    header = " ".join(line.removeprefix("# [tuned] ") for line in text.splitlines() if line.startswith("# [tuned] "))
    assert "tune_digits_simclr" in header and f"{table}/trials.csv" in header and re.search(r"\d{4}-\d\d-\d\d", header)
    assert "# Written by hand: kept." in text
    written = yaml.safe_load(text)
    for key, value in best["best_params"].items():
        group, name = key.split(".")
        assert written[group][name] == value, key
    assert written["method"]["proj_layers"] == 2
    rows = (table / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,validation_knn_acc,optim.lr,method.temperature") and len(rows) == 3
    study = yaml.safe_load((table / "study.yaml").read_text())
    assert study["best_validation_knn_acc"] == best["best_value"] and study["sampler"]["seed"] == 0

    from contrastive.report.build import main as report

    assert report([str(table)]) == 0
    assert (table / "knn_per_trial.png").is_file() and "**validation**" in (table / "comparison.md").read_text()


def test_recording_refuses_a_trial_judged_on_test(tmp_path):
    from contrastive.tune_record import TuningError, read_sweep

    trial = tmp_path / "trial_0"
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"},
                    "overrides": {"task": []},
                    "job": {"num": 0},
                    "runtime": {"choices": {}},
                }
            }
        )
    )
    (trial / ".hydra" / "config.yaml").write_text("method: {name: simclr}\n")
    (trial / "metrics.json").write_text(json.dumps({"eval_split": "test", "knn_acc": 50.0}))
    with pytest.raises(TuningError, match="eval_split='test'; a tuning trial is judged on validation only"):
        read_sweep(tmp_path)
