"""The tuning path (issue 29): Hydra's Optuna sweeper really runs the trials, each judged on the validation split
(never test), and ``contrastive.tune_record`` writes the best trial's settings and the trial table."""

from __future__ import annotations

import csv
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
    # the method's defaults before the recording, kept as the confirmation stage's baseline
    assert study["incumbent_params"]["method.temperature"] == 0.2 and study["incumbent_params"]["optim.lr"] == 0.06

    # the confirmation stage: the best trial and the incumbent at the full budget, judged on validation
    confirm = tmp_path / "confirm"
    fast = ("trainer.max_steps=4", "trainer.enable_progress_bar=false", "eval.fewshot_seeds=1", "backbone.width=8")
    fast += ("method.probe_size=16", "diagnostics=false", "data.batch_size=64")
    run(
        "contrastive.tune_confirm",
        str(table),
        "--bundle",
        str(bundle),
        "--sweep",
        str(confirm),
        "--seeds",
        "0",
        *(f"-o{o}" for o in fast),
    )
    best_trial = f"trial{study['best_trial']}"
    knn = {}
    for name in ("incumbent", best_trial):
        metrics = json.loads((confirm / f"simclr_{name}_seed0" / "metrics.json").read_text())
        assert metrics["eval_split"] == "validation" and metrics["split_sizes"]["test"] > 0
        assert not any(key.startswith(("pixels_", "init_")) for key in metrics)
        knn[name] = metrics["knn_acc"]
        ran = yaml.safe_load((confirm / f"simclr_{name}_seed0" / "config.yaml").read_text())
        expected = study["incumbent_params"] if name == "incumbent" else study["best_params"]
        assert ran["method"]["temperature"] == expected["method.temperature"] and ran["tuning"] is True
    chosen = max(knn, key=lambda name: (knn[name], name == "incumbent"))
    with open(table / "confirmation.csv") as f:
        rows = {row["candidate"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(knn) and {n for n, r in rows.items() if r["chosen"] == "True"} == {chosen}
    assert float(rows[best_trial]["validation_knn_acc_seed0"]) == pytest.approx(knn[best_trial], abs=0.005)
    chosen_params = study["incumbent_params"] if chosen == "incumbent" else study["best_params"]
    text = bundle.read_text()
    assert f"{table}/confirmation.csv" in text and "# Written by hand: kept." in text
    written = yaml.safe_load(text)
    for key, value in chosen_params.items():
        group, name = key.split(".")
        assert written[group][name] == value, key
    assert yaml.safe_load((table / "study.yaml").read_text())["confirmation"]["chosen"] == chosen
    assert report([str(table)]) == 0
    assert "## Confirmation at the full budget" in (table / "comparison.md").read_text()


def test_the_confirmation_keeps_the_incumbent_on_a_tie_and_needs_every_run():
    from contrastive.tune_confirm import Candidate, winner
    from contrastive.tune_record import TuningError

    incumbent = Candidate("moco", "incumbent", {"optim.lr": 0.06}, None, {100: 45.0, 101: 47.0})
    trial = Candidate("moco", "trial3", {"optim.lr": 0.02}, 44.0, {100: 47.0, 101: 45.0})
    assert winner([incumbent, trial]) is incumbent
    trial.values[101] = 45.5
    assert winner([incumbent, trial]) is trial
    del trial.values[101]
    with pytest.raises(TuningError, match=r"not all finished: .*moco_trial3 has seeds \[100\]"):
        winner([incumbent, trial])


def test_a_confirmation_run_judged_on_test_is_refused(tmp_path):
    from contrastive.tune_confirm import Candidate, read_runs
    from contrastive.tune_record import TuningError

    run = tmp_path / "swav_incumbent_seed100"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"eval_split": "test", "knn_acc": 50.0, "epochs": 20}))
    (run / "config.yaml").write_text("seed: 100\noptim: {lr: 0.06}\n")
    with pytest.raises(TuningError, match="eval_split='test'; a confirmation run is judged on validation only"):
        read_runs([Candidate("swav", "incumbent", {"optim.lr": 0.06}, None)], tmp_path)


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
