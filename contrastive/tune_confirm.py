"""The confirmation stage of tuning: ``python -m contrastive.tune_confirm TABLE [TABLE ...] [--top 1] [--seeds 100]``.

A tuning study judges its trials at a shortened budget, which favours settings that learn fast over those that end
best. This stage takes, from each recorded study (``results/tuning/<method>/``, written by ``contrastive.tune_record``),
its ``--top`` best trials and its incumbent (the settings before the tuning), trains each at the benchmark's full
budget under ``experiment=confirm_<benchmark>`` (a tuning run: judged on the validation split, never reads test),
and writes the candidate with the best mean validation kNN over ``--seeds`` into the method's benchmark bundle. The
incumbent is a candidate, so the stage can keep the old settings, and wins a tie.

- the candidates are config files ``<sweep>/candidates/candidate/<method>_<name>.yaml`` (``+candidate=...``), all of
  the studies' candidates in one Hydra multirun (two at a time with the parallel launcher), each run in
  ``<sweep>/<candidate>_seed<seed>``; run again after a stop, finished runs are kept (``resume=auto``);
- per study: ``confirmation.csv`` (each candidate's settings, its short-budget validation kNN and its full-budget
  validation kNN per seed) and a ``confirmation`` block in ``study.yaml`` beside the trial table, each run's
  ``metrics.json`` / ``config.yaml`` under ``confirm/<candidate>_seed<seed>/``, and the winner in the bundle.

``--record-only`` reads the runs already there without training.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from contrastive.tune_record import OBJECTIVE, Study, TuningError, default_bundle, read_recorded, write_settings

INCUMBENT = "incumbent"


@dataclass
class Candidate:
    method: str
    name: str  # "incumbent" or "trial<N>"
    params: dict[str, Any]
    short_value: float | None  # the trial's validation kNN at the study's budget (None for the incumbent)
    values: dict[int, float] = field(default_factory=dict)  # seed -> validation kNN at the full budget
    epochs: int | None = None

    @property
    def key(self) -> str:
        return f"{self.method}_{self.name}"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None


def candidates(study: Study, top: int) -> list[Candidate]:
    """The study's incumbent, then its ``top`` best finished trials (best first)."""
    if not study.incumbent:
        raise TuningError(
            f"study {study.name}: its table has no incumbent_params (recorded before the confirmation stage): record "
            "it again with `python -m contrastive.tune_record <sweep>` while the bundle holds the settings before "
            "the tuning"
        )
    done = [t for t in study.trials if t.value is not None]
    ranked = sorted(done, key=lambda t: (-t.value, t.number))[:top]
    if not ranked:
        raise TuningError(f"study {study.name}: no finished trial to confirm")
    found = [Candidate(study.method, INCUMBENT, dict(study.incumbent), None)]
    for t in ranked:
        if t.params == study.incumbent:  # the incumbent itself was drawn: one candidate
            found[0].short_value = t.value
            continue
        found.append(Candidate(study.method, f"trial{t.number}", dict(t.params), t.value))
    return found


def write_candidates(found: list[Candidate], sweep: Path) -> Path:
    """Each candidate as ``<sweep>/candidates/candidate/<key>.yaml``; returns the search-path folder."""
    folder = sweep / "candidates" / "candidate"
    folder.mkdir(parents=True, exist_ok=True)
    for c in found:
        body = OmegaConf.create({})
        for key, value in c.params.items():
            OmegaConf.update(body, key, value, force_add=True)
        text = f"# @package _global_\n# {c.key}: written by contrastive.tune_confirm\n"
        text += f"defaults:\n  - override /method: {c.method}\n" + OmegaConf.to_yaml(body)
        (folder / f"{c.key}.yaml").write_text(text)
    return folder.parent


def run_candidates(
    found: list[Candidate], experiment: str, sweep: Path, seeds: list[int], jobs: int | None, extra: list[str]
) -> int:
    """One multirun over every candidate and seed; returns its exit code."""
    search = write_candidates(found, sweep).resolve()
    command = [
        sys.executable,
        *("-m", "contrastive.train", "-m", f"experiment={experiment}"),
        f"+candidate={','.join(c.key for c in found)}",
        f"seed={','.join(str(s) for s in seeds)}",
        f"hydra.searchpath=[file://{search}]",
        f"hydra.sweep.dir={sweep}",
        *([f"hydra.launcher.n_jobs={jobs}"] if jobs else []),
        *extra,
    ]
    print("running:", " ".join(command[1:]), flush=True)
    return subprocess.run(command, env=os.environ.copy()).returncode


def read_runs(found: list[Candidate], sweep: Path) -> None:
    """Fill each candidate's per-seed validation kNN from its finished runs in ``sweep``."""
    for c in found:
        for metrics_path in sorted(sweep.glob(f"{c.key}_seed*/metrics.json")):
            metrics = json.loads(metrics_path.read_text())
            if metrics.get("eval_split") != "validation":
                raise TuningError(
                    f"{metrics_path}: eval_split={metrics.get('eval_split')!r}; a confirmation run is judged on "
                    "validation only (experiment=confirm_* sets tuning=true and eval.split=validation)"
                )
            config = OmegaConf.load(metrics_path.parent / "config.yaml")
            for key, value in c.params.items():  # the run trained the candidate, not a stale file of that name
                if OmegaConf.select(config, key) != value:
                    raise TuningError(f"{metrics_path.parent}: {key}={OmegaConf.select(config, key)}, not {value}")
            c.values[int(config.seed)] = float(metrics[OBJECTIVE])
            c.epochs = int(metrics["epochs"])


def winner(found: list[Candidate]) -> Candidate:
    """The best mean validation kNN, the incumbent (listed first) on a tie; every candidate needs every seed."""
    seeds = {frozenset(c.values) for c in found}
    if len(seeds) != 1 or not next(iter(seeds)):
        missing = ", ".join(f"{c.key} has seeds {sorted(c.values)}" for c in found)
        raise TuningError(f"the confirmation runs are not all finished: {missing}; run the command again")
    return max(found, key=lambda c: c.mean)  # max keeps the first of equals


def write_confirmation(
    study: Study, table: Path, found: list[Candidate], best: Candidate, sweep: Path, experiment: str, today: str
) -> None:
    seeds = sorted(best.values)
    keys = list(study.space)
    with open(table / "confirmation.csv", "w", newline="") as f:
        writer = csv.writer(f)
        short = f"validation_knn_acc_{study_epochs(table)}_epochs"
        header = ["candidate", short, *(f"validation_knn_acc_seed{s}" for s in seeds), "validation_knn_acc_mean"]
        writer.writerow([*header, "chosen", *keys])
        for c in found:
            shortv = "" if c.short_value is None else f"{c.short_value:.2f}"
            row = [c.name, shortv, *(f"{c.values[s]:.2f}" for s in seeds), f"{c.mean:.2f}", c is best]
            writer.writerow([*row, *(c.params.get(k, "") for k in keys)])
    for c in found:
        for s in seeds:
            src, dest = sweep / f"{c.key}_seed{s}", table / "confirm" / f"{c.key}_seed{s}"
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.json", "config.yaml"):
                shutil.copy(src / name, dest / name)
    meta = yaml.safe_load((table / "study.yaml").read_text())
    meta["confirmation"] = {
        "experiment": experiment,
        "epochs": best.epochs,
        "seeds": seeds,
        "objective": "mean final kNN accuracy on the validation split over the seeds",
        "candidates": {
            c.name: {"validation_knn_acc": [c.values[s] for s in seeds], "mean": round(c.mean, 3)} for c in found
        },
        "chosen": best.name,
        "chosen_params": best.params,
        "sweep_dir": str(sweep),
        "recorded": today,
    }
    (table / "study.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def study_epochs(table: Path) -> int | str:
    """The trials' budget in epochs, from the recorded table's trial metrics (``?`` when none was copied)."""
    for path in sorted(Path(table).glob("trial_*/metrics.json")):
        return json.loads(path.read_text()).get("epochs", "?")
    return "?"


def bundle_text(study: Study, found: list[Candidate], best: Candidate, table: Path, command: str, today: str) -> str:
    scores = ", ".join(f"{c.name} {c.mean:.2f}" for c in found)
    seeds = ",".join(str(s) for s in sorted(best.values))
    what = (
        "the settings it had before the tuning (the incumbent), kept"
        if best.name == INCUMBENT
        else f"trial {best.name.removeprefix('trial')} of the study {study.name}, confirmed"
    )
    return (
        f"{study.method}'s searched settings here are {what} by the confirmation stage: at the full budget "
        f"({best.epochs} epochs, seed {seeds}) on the validation split the candidates scored {scores} (kNN). Tables: "
        f"{table}/trials.csv and {table}/confirmation.csv. Written by `{command}` on {today}"
    )


def confirm(
    tables: list[Path],
    top: int = 1,
    seeds: list[int] = (100,),
    sweep: Path | None = None,
    experiment: str | None = None,
    jobs: int | None = None,
    bundles: list[Path] | None = None,
    record_only: bool = False,
    extra: list[str] = (),
    today: str | None = None,
) -> list[tuple[Study, list[Candidate], Candidate]]:
    """Run (unless ``record_only``) and record the confirmation of every study in ``tables``."""
    studies = [read_recorded(t) for t in tables]
    experiments = {experiment or s.experiment.replace("tune_", "confirm_", 1) for s in studies}
    if len(experiments) != 1:
        raise TuningError(f"the tables come from different benchmarks ({sorted(experiments)}): confirm them apart")
    experiment = experiments.pop()
    sweep = Path(sweep) if sweep is not None else Path("runs") / "confirm" / experiment.removeprefix("confirm_")
    found = {s.name: candidates(s, top) for s in studies}
    every = [c for s in studies for c in found[s.name]]
    if not record_only:
        code = run_candidates(every, experiment, sweep, list(seeds), jobs, list(extra))
        if code != 0:
            raise TuningError(f"the confirmation runs exited with {code}: run the command again to resume them")
    today = today or datetime.date.today().isoformat()
    command = "python -m contrastive.tune_confirm " + " ".join(str(t) for t in tables)
    decided = []
    for i, (study, table) in enumerate(zip(studies, tables)):
        read_runs(found[study.name], sweep)
        best = winner(found[study.name])
        write_confirmation(study, Path(table), found[study.name], best, sweep, experiment, today)
        bundle = bundles[i] if bundles else default_bundle(study)
        write_settings(bundle, best.params, bundle_text(study, found[study.name], best, Path(table), command, today))
        decided.append((study, found[study.name], best))
    return decided


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.tune_confirm", description=__doc__.splitlines()[0])
    parser.add_argument("tables", type=Path, nargs="+", help="recorded trial tables (results/tuning/<method>)")
    parser.add_argument("--top", type=int, default=1, help="best trials per study to confirm beside the incumbent")
    parser.add_argument("--seeds", default="100", help="comma-separated seeds of every candidate (default 100)")
    parser.add_argument("--sweep", type=Path, default=None, help="the runs' folder (runs/confirm/<benchmark>)")
    parser.add_argument("--experiment", default=None, help="default: the study's experiment, tune_ -> confirm_")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (the experiment's launcher setting)")
    parser.add_argument("--bundle", type=Path, action="append", help="settings file per table, in order")
    parser.add_argument("--record-only", action="store_true", help="read the finished runs, train nothing")
    parser.add_argument(
        "-o", "--override", action="append", default=[], help="a Hydra override for every run (data.root=...)"
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.bundle and len(args.bundle) != len(args.tables):
        parser.error("--bundle: give one per table, in the tables' order")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: comma-separated integers")
    try:
        decided = confirm(
            args.tables,
            args.top,
            seeds,
            args.sweep,
            args.experiment,
            args.jobs,
            args.bundle,
            args.record_only,
            args.override,
        )
    except TuningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for study, found, best in decided:
        scores = ", ".join(f"{c.name} {c.mean:.2f}" for c in found)
        print(f"{study.name}: {scores} (validation kNN at {best.epochs} epochs) -> {best.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
