"""Run folders as data: a run's summary, overrides and config; runs grouped by method, swept values and seeds."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

# Override keys that name the run rather than a hyperparameter of it; runs differing only in `seed` are one group.
_IGNORED_KEYS = ("method", "output_dir", "ckpt_path", "resume", "seed")
_FAMILY_BY_NEGATIVES = {
    "batch": "end-to-end",
    "bank": "memory bank",
    "queue": "momentum queue",
    "prototypes": "clustering",
}
_FAMILY_BY_METHOD = {
    "simclr": "end-to-end",
    "memory_bank": "memory bank",
    "moco": "momentum queue",
    "swav": "clustering",
}
_INSTANCE_FAMILIES = ("end-to-end", "memory bank", "momentum queue")


class NoRunsError(ValueError):
    """No readable ``metrics.json`` below the folder given."""


def _as_float(value: Any) -> float | None:
    """A finite number from a JSON value or an override string; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def parse_overrides(items: Iterable[Any]) -> dict[str, str]:
    """Hydra override strings -> {key: value}; ``+``/``++`` prefixes dropped, deletions (``~key``) skipped."""
    out: dict[str, str] = {}
    for item in items:
        if isinstance(item, str) and "=" in item and not item.startswith("~"):
            key, value = item.split("=", 1)
            out[key.lstrip("+").strip()] = value.strip()
    return out


# Runs recorded before the splits were named held out one evaluation set, read by the per-epoch monitor too (on the
# CIFAR-10 split: the union of today's validation and test halves).
UNNAMED_SPLIT = "held-out (one evaluation set, recorded before the splits were named)"


@dataclass
class Run:
    """One run folder: its summary metrics and its Hydra overrides."""

    name: str
    path: Path
    metrics: dict[str, Any]
    overrides: dict[str, str]

    @property
    def method(self) -> str:
        return str(self.metrics.get("method") or self.overrides.get("method") or "unknown")

    @property
    def family(self) -> str | None:
        """The survey's architecture: as the run recorded it (``family`` in metrics.json), else, for results written
        before that key, from the negatives' source or the method's name."""
        recorded = self.metrics.get("family")
        if isinstance(recorded, str) and recorded.strip():
            return recorded.strip()
        return _FAMILY_BY_NEGATIVES.get(str(self.metrics.get("negatives"))) or _FAMILY_BY_METHOD.get(self.method)

    @property
    def eval_split(self) -> str:
        """The split of the final figures (metrics.json ``eval_split``)."""
        return str(self.metrics.get("eval_split") or UNNAMED_SPLIT)

    @property
    def monitor_split(self) -> str:
        """The split of the per-epoch figures: validation since the splits were named, else the one held-out set."""
        named = "validation" if self.metrics.get("eval_split") else "the same held-out set"
        return str(self.metrics.get("monitor_split") or named)

    @property
    def seed(self) -> float | str | None:
        return self.value("seed")

    @property
    def setting(self) -> tuple[str, str, str]:
        """What must match for two runs to be compared as 'comparable settings'."""
        return tuple(str(self.metrics.get(key)) for key in ("data", "backbone", "epochs"))

    def num(self, key: str) -> float | None:
        return _as_float(self.metrics.get(key))

    @cached_property
    def config(self) -> dict[str, Any]:
        for path in (self.path / "config.yaml", self.path / ".hydra" / "config.yaml"):
            if path.is_file():
                try:
                    loaded = yaml.safe_load(path.read_text())
                except yaml.YAMLError:
                    continue
                if isinstance(loaded, dict):
                    return loaded
        return {}

    def value(self, key: str) -> float | str | None:
        """The run's value of an override key, a number where it parses as one. A run that did not override the
        key (the default point of a sweep) gets it from its saved config, if the folder has one."""
        raw: Any = self.overrides.get(key)
        if raw is None:
            node: Any = self.config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None or isinstance(node, (dict, list)):
                return None
            raw = str(node).lower() if isinstance(node, bool) else str(node)
        number = _as_float(raw)
        return number if number is not None else raw


def load_runs(root: Path) -> list[Run]:
    """Every run folder below ``root`` (a folder holding ``metrics.json``); unreadable files are skipped."""
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(metrics, dict):
            print(f"warning: skipping {path}: not a JSON object", file=sys.stderr)
            continue
        run_dir = path.parent
        raw = metrics.get("overrides")
        hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
        if not raw and hydra_overrides.is_file():
            raw = yaml.safe_load(hydra_overrides.read_text())
        name = run_dir.relative_to(root).as_posix() if run_dir != root else root.name
        runs.append(Run(name, run_dir, metrics, parse_overrides(raw or [])))
    return runs


def _ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key == "hydra" or key.startswith("hydra.")


def _by(runs: Iterable[Run], key: Callable[[Run], Any]) -> dict[Any, list[Run]]:
    groups: dict[Any, list[Run]] = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return dict(groups)


def swept_keys(runs: list[Run]) -> dict[str, list[str]]:
    """Per method, the override keys whose values differ across that method's runs."""
    out = {}
    for method, group in _by(runs, lambda r: r.method).items():
        keys = sorted({key for run in group for key in run.overrides if not _ignored(key)})
        out[method] = [key for key in keys if len({run.value(key) for run in group}) > 1]
    return out


def _sort_value(value: float | str | None) -> tuple[int, float | str]:
    if isinstance(value, float):
        return 0, value
    return (1, value) if value is not None else (2, "")


def _short(value: float | str | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else value


def run_labels(runs: list[Run], swept: dict[str, list[str]]) -> dict[str, str]:
    """Method plus its swept values (``moco queue_size=1024``); the folder name is added where that is ambiguous."""
    labels = {}
    for run in runs:
        parts = [f"{key.rsplit('.', 1)[-1]}={_short(run.value(key))}" for key in swept.get(run.method, [])]
        labels[run.name] = " ".join([run.method, *parts])
    counts = defaultdict(int)
    for label in labels.values():
        counts[label] += 1
    return {name: label if counts[label] == 1 else f"{label} ({name})" for name, label in labels.items()}


def run_groups(runs: list[Run], swept: dict[str, list[str]]) -> dict[str, list[Run]]:
    """Runs that differ only in ``seed`` (or in nothing), under the label of the group: method + swept values."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        parts = [f"{key.rsplit('.', 1)[-1]}={_short(run.value(key))}" for key in swept.get(run.method, [])]
        groups[" ".join([run.method, *parts])].append(run)
    return dict(groups)


def _values(group: Iterable[Run], key: str) -> list[float]:
    return [v for v in (run.num(key) for run in group) if v is not None]


def knn_curve(run: Run) -> list[tuple[float, float | None, float]]:
    """(training images seen, wall-clock seconds since the start of training or None, kNN) after each epoch."""
    batch = run.num("global_batch_size")
    points = []
    for rec in run.metrics.get("history") or []:
        if not isinstance(rec, dict):
            continue
        step, acc = _as_float(rec.get("step")), _as_float(rec.get("knn_acc"))
        if step is not None and acc is not None and batch is not None:
            points.append((step * batch, _as_float(rec.get("wall_s")), acc))
    return points


def accuracy_target(runs: list[Run]) -> float | None:
    """The kNN accuracy every run with a history reaches: the lowest of their best epochs, rounded down."""
    best = [max(acc for _, _, acc in curve) for curve in map(knn_curve, runs) if curve]
    return float(math.floor(min(best))) if best else None


def time_to_accuracy(run: Run, target: float) -> tuple[float, float | None] | None:
    """Images seen and seconds at the end of the first epoch whose kNN reached ``target``; None if none did."""
    return next(((images, wall) for images, wall, acc in knn_curve(run) if acc >= target), None)


def values_by_x(group: list[Run], x_of: Callable[[Run], Any], key: str = "knn_acc") -> list[tuple[float, list[float]]]:
    """(x, every run's ``key`` at that x), sorted by x; runs lacking either skipped. The plots draw the mean as a
    line and each run as a dot, so the seed spread shows."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for run in group:
        x, y = _as_float(x_of(run)), run.num(key)
        if x is not None and y is not None:
            by_x[x].append(y)
    return sorted(by_x.items())


# Summary keys that the configuration decides (not the training's outcome): runs that differ in one are not copies,
# even where their overrides match (a queue size set by an experiment file rather than on the command line).
_CONFIG_KEYS = (
    "method",
    "family",
    "data",
    "backbone",
    "epochs",
    "global_steps",
    "global_batch_size",
    "negatives",
    "key_encoder",
    "negatives_per_query",
    "dictionary_size",
    "dictionary_ratio",
)


def _replicate_key(run: Run) -> tuple:
    """What makes a run a replicate of its group: its seed and configuration (overrides and the summary's config
    figures); without a seed, its whole summary (an exact copy)."""
    seed = run.seed
    if seed is None:
        return ("copy", json.dumps(run.metrics, sort_keys=True, default=str))
    overrides = sorted((k, v) for k, v in run.overrides.items() if not _ignored(k))
    config = [(key, json.dumps(run.metrics.get(key), default=str)) for key in _CONFIG_KEYS]
    return ("seed", seed, tuple(overrides), tuple(config))


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per replicate: runs of one group (same configuration) with the same seed are copies (a backup, a
    re-run, a parent folder holding results too) and count once. Returns the runs kept and a line per group that
    had copies, naming them."""
    groups = run_groups(runs, swept_keys(runs))
    kept_ids, notes = set(), []
    for label, group in groups.items():
        by_key = _by(group, lambda r: (r.setting, _replicate_key(r)))
        copies = []
        for (_, key), members in by_key.items():
            members = sorted(members, key=lambda r: (r.name.count("/"), r.name))
            kept_ids.add(id(members[0]))
            if len(members) > 1:
                copies.append((key, members))
        if not copies:
            continue
        seeds = [
            f"{len(m)} copies of seed {_short(k[1])}"
            if k[0] == "seed"
            else f"{len(m)} identical copies of `{m[0].name}`"
            for k, m in copies
        ]
        if len(seeds) > 6:
            runs_in = sum(len(m) for _, m in copies)
            seeds = [f"{runs_in} runs that are copies of {len(copies)} replicates"]
        kept = [m[0].name for _, m in copies]
        notes.append(
            f"`{label}`: {', '.join(seeds)} counted once each (same seed and configuration: one replicate; kept "
            + ", ".join(f"`{name}`" for name in kept[:3])
            + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
            + ")"
        )
    return [run for run in runs if id(run) in kept_ids], notes


def _seeded(group: Iterable[Run], key: str) -> list[tuple[Any, float]]:
    return [(run.seed, v) for run in group if (v := run.num(key)) is not None]


def compare_runs(a: Iterable[Run], b: Iterable[Run], key: str, margin: float | None = None, **kwargs: Any):
    """``key`` of runs ``a`` minus runs ``b``: paired by seed where both sides ran exactly the same seeds (once each),
    else Welch's test; ``kwargs`` go to :func:`contrastive.report.stats.compare`."""
    from contrastive.report.stats import compare

    va, vb = _seeded(a, key), _seeded(b, key)
    seeds_a, seeds_b = [s for s, _ in va], [s for s, _ in vb]
    paired = (
        None not in seeds_a
        and len(set(seeds_a)) == len(seeds_a) == len(seeds_b) == len(set(seeds_b))
        and set(seeds_a) == set(seeds_b)
        and bool(va)
    )
    if paired:
        by_seed = dict(vb)
        return compare([v for _, v in va], [by_seed[s] for s, _ in va], margin, paired=True, **kwargs)
    return compare([v for _, v in va], [v for _, v in vb], margin, **kwargs)


def compare_within(group: Iterable[Run], key_a: str, key_b: str, margin: float | None = None, **kwargs: Any):
    """Two figures of the same runs (a stage against another, final against initialisation): paired per run."""
    from contrastive.report.stats import compare

    pairs = [(x, y) for run in group if (x := run.num(key_a)) is not None and (y := run.num(key_b)) is not None]
    return compare([x for x, _ in pairs], [y for _, y in pairs], margin, paired=True, **kwargs)
