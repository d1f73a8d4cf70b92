"""Record a tuning sweep: ``python -m contrastive.tune_record SWEEP_DIR [--bundle FILE] [--table DIR]``.

A sweep of ``experiment=tune_* +tune=<method>`` (Hydra's Optuna sweeper) leaves one run folder per trial. This reads
them back, checks that every trial was judged on the validation split, takes the best (the highest validation kNN;
the earliest trial on a tie, as Optuna does), and writes

- the trial table (``--table``, default ``results/tuning/<method>/``): ``trials.csv`` (every trial's settings, its
  validation kNN and how it ended), ``study.yaml`` (the study, its search space, sampler and budget, the best trial)
  and each trial's ``metrics.json`` and ``config.yaml`` under ``trial_<n>/``;
- the best trial's settings into the method's benchmark bundle (``--bundle``, default
  ``conf/experiment/<base>/<method>.yaml`` of the sweep's benchmark), under a header naming the study, the table and
  the date; the bundle's other keys and its earlier header are kept.

``python -m contrastive.report DIR`` reads either folder (the sweep, or the recorded table) as a tuning report.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

TUNED = "# [tuned] "  # the bundle's header lines this command writes (and replaces on the next recording)
OBJECTIVE = "knn_acc"  # with eval_split == validation: what the trials returned to the sampler


class TuningError(Exception):
    """A sweep that cannot be recorded (unfinished, or judged on the wrong split); the message says why."""


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    value: float | None  # validation kNN; None unless the trial finished
    state: str  # complete, diverged, failed, running
    folder: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    method: str
    experiment: str
    base: str | None
    space: dict[str, str]  # key -> the sweeper's distribution, as written in conf/tune/<method>.yaml
    n_trials: int
    sampler: dict[str, Any]
    trials: list[Trial]
    finished: bool  # the sweeper wrote optimization_results.yaml
    wall_time_s: float | None = None
    sweep_dir: str = ""
    recorded: str = ""  # the date of the recording (a recorded table)
    # the searched keys' values before this study's first recording: the confirmation stage's baseline candidate
    incumbent: dict[str, Any] | None = None
    confirmation: dict[str, Any] | None = None  # what contrastive.tune_confirm decided (a recorded table)

    @property
    def best(self) -> Trial | None:
        done = [t for t in self.trials if t.value is not None and math.isfinite(t.value)]
        return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _value(text: str) -> Any:
    """An override's value as YAML reads it (0.0001 -> float, 256 -> int, -1 -> int, false -> bool)."""
    return yaml.safe_load(text)


def _trial_folders(sweep: Path) -> list[Path]:
    return sorted((p.parent.parent for p in sweep.glob("*/.hydra/hydra.yaml")), key=lambda p: p.name)


def read_sweep(sweep: Path) -> Study:
    """The study behind a sweep folder of ``experiment=tune_*``, one :class:`Trial` per run folder."""
    sweep = Path(sweep)
    folders = _trial_folders(sweep)
    if not folders:
        raise TuningError(f"{sweep}: no trial folder (no */.hydra/hydra.yaml): not a sweep of experiment=tune_*")
    trials, hydra_cfg, config = [], None, None
    for folder in folders:
        hydra_cfg = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        config = OmegaConf.load(folder / ".hydra" / "config.yaml")
        if "optuna" not in str(hydra_cfg.sweeper.get("_target_", "")).lower():
            target = hydra_cfg.sweeper.get("_target_")
            raise TuningError(f"{folder}: not a trial of the Optuna sweeper (hydra.sweeper._target_={target})")
        space = dict(hydra_cfg.sweeper.get("params") or {})
        task = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in hydra_cfg.overrides.task if "=" in o}
        params = {key: _value(task[key]) for key in space if key in task}
        metrics_path, record_path = folder / "metrics.json", folder / ".hydra" / "contrastive_exit.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if metrics:
            split = metrics.get("eval_split")
            if split != "validation":
                raise TuningError(
                    f"{folder}/metrics.json: eval_split={split!r}; a tuning trial is judged on validation only "
                    "(experiment=tune_* sets tuning=true and eval.split=validation)"
                )
            state, value = "complete", float(metrics[OBJECTIVE])
        elif record is not None and record.get("error"):
            state = "diverged" if "diverg" in record["error"].lower() else "failed"
            value = None
        else:
            state, value = "running", None
        trials.append(Trial(int(hydra_cfg.job.num), params, value, state, folder, metrics))
    resolved = OmegaConf.merge(config, {"hydra": {"sweeper": hydra_cfg.sweeper}})
    sampler = OmegaConf.to_container(hydra_cfg.sweeper.sampler)
    starts = [(f / ".hydra" / "config.yaml").stat().st_mtime for f in folders]
    ends = [(f / "metrics.json").stat().st_mtime for f in folders if (f / "metrics.json").is_file()]
    choices = hydra_cfg.runtime.choices
    return Study(
        name=str(OmegaConf.select(resolved, "hydra.sweeper.study_name")),
        method=str(config.method.name),
        experiment=str(choices.get("experiment")),
        base=choices.get("experiment/base") if choices.get("experiment/base") not in (None, "null") else None,
        space={key: str(value) for key, value in space.items()},
        n_trials=int(hydra_cfg.sweeper.n_trials),
        sampler={k: v for k, v in sampler.items() if k in ("_target_", "seed", "n_startup_trials")},
        trials=sorted(trials, key=lambda t: t.number),
        finished=(sweep / "optimization_results.yaml").is_file(),
        wall_time_s=round(max(ends) - min(starts), 1) if ends else None,
        sweep_dir=str(sweep),
    )


def read_recorded(folder: Path) -> Study:
    """A recorded trial table (``study.yaml`` + ``trials.csv``) back as a :class:`Study`."""
    meta = yaml.safe_load((Path(folder) / "study.yaml").read_text())
    trials = []
    with open(Path(folder) / "trials.csv", newline="") as f:
        for row in csv.DictReader(f):
            value = row.pop("validation_knn_acc")
            number, state = int(row.pop("trial")), row.pop("state")
            params = {key: _value(row[key]) for key in meta["search_space"] if key in row}
            trials.append(Trial(number, params, float(value) if value else None, state))
    return Study(
        name=meta["study"],
        method=meta["method"],
        experiment=meta["experiment"],
        base=meta.get("benchmark"),
        space=meta["search_space"],
        n_trials=meta["n_trials"],
        sampler=meta["sampler"],
        trials=trials,
        finished=True,
        wall_time_s=meta.get("wall_time_s"),
        sweep_dir=meta.get("sweep_dir", ""),
        recorded=meta.get("recorded", ""),
        incumbent=meta.get("incumbent_params"),
        confirmation=meta.get("confirmation"),
    )


def read_study(folder: Path) -> Study:
    """A sweep folder or a recorded table, whichever ``folder`` is."""
    return read_recorded(folder) if (Path(folder) / "study.yaml").is_file() else read_sweep(folder)


def is_tuning_folder(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "study.yaml").is_file() or (folder / "optimization_results.yaml").is_file()


def _check_finished(study: Study) -> Trial:
    if not study.finished:
        raise TuningError(
            f"{study.sweep_dir}: the sweep has not finished (no optimization_results.yaml; {len(study.trials)} of "
            f"{study.n_trials} trials started): run its command again, finished trials are kept"
        )
    best = study.best
    if best is None:
        raise TuningError(f"{study.sweep_dir}: no trial finished with a validation kNN")
    optuna = yaml.safe_load((Path(study.sweep_dir) / "optimization_results.yaml").read_text())
    if not math.isclose(float(optuna["best_value"]), best.value, abs_tol=1e-6):
        raise TuningError(
            f"{study.sweep_dir}: the sampler's best value {optuna['best_value']} is not the best trial's validation "
            f"kNN {best.value} (trial {best.number}): the folder mixes sweeps"
        )
    return best


def write_table(study: Study, out: Path, today: str) -> None:
    """``trials.csv``, ``study.yaml`` and each trial's ``metrics.json`` / ``config.yaml`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    best = study.best
    keys = list(study.space)
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "validation_knn_acc", *keys, "epochs", "train_time_s"])
        for t in study.trials:
            value = "" if t.value is None or not math.isfinite(t.value) else f"{t.value:.2f}"
            row = [t.number, t.state, value, *(t.params.get(k, "") for k in keys)]
            writer.writerow([*row, t.metrics.get("epochs", ""), t.metrics.get("train_time_s", "")])
    for t in study.trials:
        if t.folder is not None and t.metrics:
            (out / f"trial_{t.number}").mkdir(exist_ok=True)
            shutil.copy(t.folder / "metrics.json", out / f"trial_{t.number}" / "metrics.json")
            shutil.copy(t.folder / "config.yaml", out / f"trial_{t.number}" / "config.yaml")
    meta = {
        "study": study.name,
        "method": study.method,
        "experiment": study.experiment,
        "benchmark": study.base,
        "objective": "final kNN accuracy on the validation split (metrics.json knn_acc, eval_split validation)",
        "sampler": study.sampler,
        "n_trials": study.n_trials,
        "search_space": study.space,
        "best_trial": best.number,
        "best_validation_knn_acc": best.value,
        "best_params": best.params,
        "incumbent_params": study.incumbent,
        "wall_time_s": study.wall_time_s,
        "sweep_dir": study.sweep_dir,
        "recorded": today,
    }
    (out / "study.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def write_bundle(study: Study, bundle: Path, table: Path, today: str) -> None:
    """The best trial's settings into ``bundle`` (created if absent), its other keys and earlier header kept."""
    best = study.best
    wall = f", {study.wall_time_s / 60:.0f} min of sweeping" if study.wall_time_s else ""
    text = (
        f"{study.method}'s searched settings here are the best of the {len(study.trials)} trials of the study "
        f"{study.name} (experiment={study.experiment}, Optuna's {study.sampler.get('_target_', '').split('.')[-1]}, "
        f"seed {study.sampler.get('seed')}{wall}): trial {best.number}, validation kNN {best.value:.2f}, "
        f"selected on the validation split only. Trial table: {table}/trials.csv. Written by `python -m "
        f"contrastive.tune_record {study.sweep_dir}` on {today}"
    )
    write_settings(bundle, best.params, text)


def write_settings(bundle: Path, params: dict[str, Any], text: str) -> None:
    """``params`` into ``bundle`` (created if absent) under a ``# [tuned]`` header saying ``text``; the bundle's other
    keys and hand-written header lines are kept, an earlier ``# [tuned]`` block replaced."""
    lines = bundle.read_text().splitlines() if bundle.is_file() else []
    header = [line for line in lines if line.startswith("#")]
    kept = [line for line in header if not line.startswith(TUNED) and line.strip() != "# @package _global_"]
    body = OmegaConf.create("\n".join(line for line in lines if not line.startswith("#")) or "{}")
    for key, value in params.items():
        OmegaConf.update(body, key, value, force_add=True)
    text += "; the lines below this block were written by hand." if kept else "."
    # paths and commands stay whole on one line, so the header can be searched for them
    lines = textwrap.wrap(text, 120 - len(TUNED), break_long_words=False, break_on_hyphens=False)
    tuned = [TUNED + line for line in lines]
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text("\n".join(["# @package _global_", *tuned, *kept, OmegaConf.to_yaml(body).rstrip()]) + "\n")


def default_bundle(study: Study) -> Path:
    if study.base is None:
        raise TuningError(
            f"experiment={study.experiment} names no benchmark (experiment/base): give the file to write with --bundle"
        )
    import contrastive.conf

    return Path(contrastive.conf.__file__).parent / "experiment" / study.base / f"{study.method}.yaml"


def composed_params(experiment: str, method: str, keys: list[str]) -> dict[str, Any]:
    """The values ``keys`` take in ``experiment=<experiment> +tune=<method>`` as the config files stand now."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from contrastive.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("contrastive.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", f"+tune={method}"])
    values = {key: OmegaConf.select(cfg, key) for key in keys}
    return {key: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for key, v in values.items()}


def incumbent_params(study: Study, table: Path) -> dict[str, Any]:
    """The searched keys' values before the study was first recorded: kept from an earlier recording of the same
    study in ``table``, else read from the configs as they stand (the bundle not yet rewritten)."""
    earlier = Path(table) / "study.yaml"
    if earlier.is_file():
        meta = yaml.safe_load(earlier.read_text())
        if meta.get("study") == study.name and meta.get("incumbent_params"):
            return meta["incumbent_params"]
    return composed_params(study.experiment, study.method, list(study.space))


def record(sweep: Path, bundle: Path | None = None, table: Path | None = None, today: str | None = None) -> Study:
    """Check ``sweep``, write its trial table and its best settings; returns the study."""
    study = read_sweep(sweep)
    _check_finished(study)
    today = today or datetime.date.today().isoformat()
    table = Path(table) if table is not None else Path("results") / "tuning" / study.method
    bundle = Path(bundle) if bundle is not None else default_bundle(study)
    study.incumbent = incumbent_params(study, table)
    write_table(study, table, today)
    write_bundle(study, bundle, table, today)
    return study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.tune_record", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder of experiment=tune_* +tune=<method>")
    parser.add_argument("--bundle", type=Path, default=None, help="settings file to write the best trial into")
    parser.add_argument("--table", type=Path, default=None, help="folder of the trial table (results/tuning/<method>)")
    args = parser.parse_args(argv)
    try:
        study = record(args.sweep, args.bundle, args.table)
    except TuningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = study.best
    print(f"{study.name}: best of {len(study.trials)} trials is trial {best.number}, validation kNN {best.value:.2f}")
    print("  " + " ".join(f"{k}={v}" for k, v in best.params.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
