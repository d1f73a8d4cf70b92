"""A folder of runs -> ``comparison.md`` (table, plots, sweeps, the survey's claims checked) and PNG plots beside it.

``python -m contrastive.report DIR [--out DIR]`` reads every ``metrics.json`` below DIR (a Hydra multirun folder or
any folder of run folders); :func:`make_report` does the same from Python and returns the markdown's path.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from contrastive.stats import ALPHA, FAILS, HOLDS, UNMEASURED, compare, summarize, within_noise

SWAV_MARGIN = 5.0  # points of kNN accuracy within which clustering counts as "comparable" (claim f)
# Override keys that name the run rather than a hyperparameter of it; runs differing only in `seed` are one group.
_IGNORED_KEYS = ("method", "output_dir", "ckpt_path", "resume", "seed")
_FAMILY_BY_NEGATIVES = {"batch": "end-to-end", "bank": "memory bank", "queue": "momentum queue",
                        "prototypes": "clustering"}
_FAMILY_BY_METHOD = {"simclr": "end-to-end", "memory_bank": "memory bank", "moco": "momentum queue",
                     "swav": "clustering"}
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
        """The survey's architecture: from the negatives' source, else from the method's name."""
        return _FAMILY_BY_NEGATIVES.get(str(self.metrics.get("negatives"))) or _FAMILY_BY_METHOD.get(self.method)

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


# ---------------------------------------------------------------------------------------------------- table


def _fmt(value: Any, digits: int | None) -> str:
    """``digits=None``: text; otherwise a number with that many decimals; '-' for missing/null/non-numeric."""
    if digits is None:
        return "-" if value is None or value == "" else str(value).replace("|", "\\|")
    number = _as_float(value)
    return "-" if number is None else f"{number:,.{digits}f}"


# (header, metrics key, decimals or None for text)
COLUMNS: list[tuple[str, str, int | None]] = [
    ("method", "method", None), ("backbone", "backbone", None), ("data", "data", None), ("epochs", "epochs", 0),
    ("batch", "global_batch_size", 0), ("negatives/query", "negatives_per_query", 0), ("kNN", "knn_acc", 1),
    ("1-shot kNN", "knn_acc_1shot", 1), ("10-shot kNN", "knn_acc_10shot", 1), ("linear (online)", "linear_acc", 1),
    ("offline linear", "offline_linear_acc", 1), ("staleness", "staleness", 3),
    ("false-neg. rate", "false_negative_rate", 3), ("alignment", "alignment", 3), ("uniformity", "uniformity", 3),
    ("images/s", "images_per_sec", 0), ("peak mem (MB)", "peak_mem_mb", 0), ("time (s)", "train_time_s", 1),
]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    rows = [[f"`{_fmt(run.name, None)}`", *(_fmt(run.metrics.get(key), digits) for _, key, digits in COLUMNS)]
            for run in runs]
    return _md_table(["run", *(header for header, _, _ in COLUMNS)], rows)


GROUP_COLUMNS = [("kNN", "knn_acc"), ("1-shot kNN", "knn_acc_1shot"), ("10-shot kNN", "knn_acc_10shot"),
                 ("linear (online)", "linear_acc"), ("offline linear", "offline_linear_acc"),
                 ("time (s)", "train_time_s")]


def groups_table(groups: dict[str, list[Run]]) -> str:
    """Mean and 95% interval of each figure over a group's runs (its seeds)."""
    rows = []
    for label, group in groups.items():
        cells = []
        for _, key in GROUP_COLUMNS:
            values = _values(group, key)
            cells.append(str(summarize(values)) if values else "-")
        seeds = sorted({_short(run.value("seed")) for run in group if run.value("seed") is not None})
        rows.append([_fmt(label, None), str(len(group)), ", ".join(seeds) or "-", *cells])
    return _md_table(["group", "runs", "seeds", *(header for header, _ in GROUP_COLUMNS)], rows)


def budget_line(runs: list[Run]) -> str:
    """Whether the runs compare at equal optimiser steps, at equal epochs, or neither."""
    steps = sorted({v for v in (run.num("global_steps") for run in runs) if v is not None})
    epochs = sorted({v for v in (run.num("epochs") for run in runs) if v is not None})
    span = lambda values: f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g} to {values[-1]:g}"
    if not steps or not epochs:
        return "Budget: not recorded (no `global_steps` / `epochs` in metrics.json)."
    if len(steps) == 1 and len(epochs) == 1:
        return f"Budget: equal steps and epochs ({span(steps)} optimiser steps, {span(epochs)} epochs per run)."
    if len(steps) == 1:
        return f"Budget: equal optimiser steps ({span(steps)} per run; epochs {span(epochs)})."
    if len(epochs) == 1:
        return f"Budget: equal epochs ({span(epochs)} per run; optimiser steps {span(steps)})."
    return f"Budget: unequal (optimiser steps {span(steps)}, epochs {span(epochs)}): compare with care."


def baselines_line(runs: list[Run]) -> str:
    """Raw-pixel kNN (from the first run that measured it) and each method's random-init 1-shot kNN."""
    parts = []
    pixel_keys = [("kNN", "pixels_knn_acc"), ("1-shot kNN", "pixels_knn_acc_1shot"),
                  ("10-shot kNN", "pixels_knn_acc_10shot")]
    source = next((run for run in runs if any(run.num(key) is not None for _, key in pixel_keys)), None)
    if source is not None:
        figures = ", ".join(f"{name} {_fmt(source.metrics.get(key), 1)}" for name, key in pixel_keys)
        parts.append(f"Raw pixels (from `{source.name}`): {figures}.")
    else:
        parts.append("Raw pixels: not measured.")
    init = []
    for method, group in _by(runs, lambda r: r.method).items():
        values = [v for v in (run.num("init_knn_acc_1shot") for run in group) if v is not None]
        if values:
            init.append(f"{method} {_mean(values):.1f}" + (f" (mean of {len(values)})" if len(values) > 1 else ""))
    parts.append("Random-init encoder, 1-shot kNN: " + (", ".join(init) + "." if init else "not measured."))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- plots

_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _colors(runs: list[Run]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {method: palette[i % len(palette)] for i, method in enumerate(sorted({run.method for run in runs}))}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is (notebooks keep theirs)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _set_log2(ax: Any) -> None:
    """Log2 x axis with plain-number tick labels (256, not 2^8)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _log2_axis(ax: Any, values: list[float]) -> None:
    """Log2 x axis where the values span enough for it to help."""
    if values and min(values) > 0 and max(values) / min(values) >= 8:
        _set_log2(ax)


def plot_knn_per_epoch(runs: list[Run], labels: dict[str, str], path: Path) -> bool:
    colors, fig = _colors(runs), Figure(figsize=(7.5, 4.5))
    ax, drawn, seen = fig.subplots(), False, defaultdict(int)
    for run in runs:
        points = [(rec["epoch"], rec["knn_acc"]) for rec in run.metrics.get("history") or []
                  if isinstance(rec, dict) and _as_float(rec.get("epoch")) is not None
                  and _as_float(rec.get("knn_acc")) is not None]
        if not points:
            continue
        i = seen[run.method]
        seen[run.method] += 1
        # History epochs are 0-based (recorded during the epoch); +1 counts epochs completed, as the table does.
        ax.plot([e + 1 for e, _ in points], [a for _, a in points], color=colors[run.method], label=labels[run.name],
                linestyle=_LINESTYLES[i % len(_LINESTYLES)], marker=_MARKERS[i % len(_MARKERS)], markersize=3)
        drawn = True
    if not drawn:
        return False
    ax.set(xlabel="epochs trained", ylabel="kNN accuracy (%)", title="kNN accuracy during training")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


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


def time_to_accuracy_section(groups: dict[str, list[Run]], target: float | None, out: Path) -> list[str]:
    lines = ["## Time to accuracy", ""]
    runs = [run for group in groups.values() for run in group]
    if target is None:
        return [*lines, "No run has a per-epoch kNN history with its step count.", ""]
    if plot_time_to_accuracy(runs, target, out / "time_to_accuracy.png"):
        lines += ["![kNN accuracy against images seen and seconds](time_to_accuracy.png)", "",
                  (f"*kNN accuracy after each epoch against training images seen (left) and wall-clock seconds "
                   f"since training started, evaluation included (right); dotted: the target {target:g}%.*"), ""]
    rows = []
    for label, group in groups.items():
        reached = [time_to_accuracy(run, target) for run in group]
        images = [r[0] for r in reached if r is not None]
        seconds = [r[1] for r in reached if r is not None and r[1] is not None]
        rows.append([_fmt(label, None), f"{len(images)}/{len(group)}",
                     f"{summarize(images).mean:,.0f}" if images else "not reached",
                     str(summarize(seconds)) if seconds else "-"])
    lines += [f"Target: {target:g}% kNN, the lowest best-epoch kNN among the runs (so every run reaches it); "
              "the first epoch at or above it counts (images and seconds: mean over the group's runs, seconds "
              "with its 95% interval).", "",
              _md_table(["group", "runs reaching it", "images seen", "seconds"], rows), ""]
    return lines


def plot_time_to_accuracy(runs: list[Run], target: float, path: Path) -> bool:
    colors, fig = _colors(runs), Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, sharey=True)
    drawn = False
    for run in runs:
        curve = knn_curve(run)
        if not curve:
            continue
        left.plot([c[0] for c in curve], [c[2] for c in curve], color=colors[run.method], marker="o", markersize=2,
                  label=run.method if not drawn or run.method not in left.get_legend_handles_labels()[1] else None)
        timed = [(c[1], c[2]) for c in curve if c[1] is not None]
        if timed:
            right.plot(*zip(*timed), color=colors[run.method], marker="o", markersize=2)
        drawn = True
    if not drawn:
        return False
    for ax, xlabel in ((left, "training images seen"), (right, "wall-clock seconds")):
        ax.axhline(target, color="grey", linestyle=":")
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    left.set(ylabel="kNN accuracy (%)", title="Accuracy against data seen")
    right.set(title="Accuracy against time")
    left.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_acc_vs_negatives(runs: list[Run], path: Path) -> bool:
    colors, fig = _colors(runs), Figure(figsize=(6.5, 4.5))
    ax, xs = fig.subplots(), []
    for i, (method, group) in enumerate(sorted(_by(runs, lambda r: r.method).items())):
        points = [(run.num("negatives_per_query"), run.num("knn_acc")) for run in group]
        points = [(k, a) for k, a in points if k is not None and k > 0 and a is not None]
        if points:
            ax.scatter(*zip(*points), color=colors[method], marker=_MARKERS[i % len(_MARKERS)], s=45, label=method)
            xs += [k for k, _ in points]
    if not xs:
        return False
    _set_log2(ax)
    ax.set(xlabel="negatives per query (log scale)", ylabel="final kNN accuracy (%)",
           title="Accuracy against the number of negatives")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_throughput_memory(runs: list[Run], labels: dict[str, str], path: Path) -> bool:
    panels = [("images_per_sec", "Throughput", "training images / s"), ("peak_mem_mb", "Peak memory", "MB")]
    if not any(run.num(key) is not None for run in runs for key, _, _ in panels):
        return False
    colors = _colors(runs)
    fig = Figure(figsize=(11, 0.4 * len(runs) + 1.5))
    for ax, (key, title, unit) in zip(fig.subplots(1, 2), panels):
        shown = [run for run in runs if run.num(key) is not None]
        bars = ax.barh([labels[run.name] for run in shown], [run.num(key) for run in shown],
                       color=[colors[run.method] for run in shown])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.invert_yaxis()  # first run on top, as in the table
        ax.set(xlabel=unit, title=title)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.15)
    fig.tight_layout()
    _save(fig, path)
    return True


def _mean_by_value(group: list[Run], x_of: Callable[[Run], Any], key: str = "knn_acc") -> list[tuple[float, float]]:
    """(x, mean of ``key`` over the runs at that x), sorted by x; runs lacking either skipped."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for run in group:
        x, y = _as_float(x_of(run)), run.num(key)
        if x is not None and y is not None:
            by_x[x].append(y)
    return [(x, _mean(ys)) for x, ys in sorted(by_x.items())]


def plot_lines(series: dict[str, list[tuple[float, float]]], colors: dict[str, Any], xlabel: str, title: str,
               path: Path, log2: bool = False) -> None:
    """One line per series of (x, accuracy) points; log2 x if asked or where the values span a wide range."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, (name, points) in enumerate(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=_MARKERS[i % len(_MARKERS)],
                color=colors.get(name.split(" ")[0]), linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=name)
    xs = [p[0] for points in series.values() for p in points]
    if log2 and min(xs) > 0:
        _set_log2(ax)
    else:
        _log2_axis(ax, xs)
    ax.set(xlabel=xlabel, ylabel="final kNN accuracy (%)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def _mean_cell(group: list[Run], key: str) -> str:
    values = [v for v in (run.num(key) for run in group) if v is not None]
    return _fmt(_mean(values), 0 if key == "negatives_per_query" else 1) if values else "-"


def _sweep_table(rows: list[tuple[str, list[Run], float]], value_header: str) -> str:
    figures = ["knn_acc", "knn_acc_1shot", "linear_acc"]
    header = ["method", value_header, "runs", "kNN", "1-shot kNN", "linear (online)"]
    if value_header != "negatives/query":
        figures.append("negatives_per_query")
        header.append("negatives/query")
    body = [[name, f"{x:g}", str(len(group)), *(_mean_cell(group, key) for key in figures)] for name, group, x in rows]
    return _md_table(header, body)


def _file_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def sweeps_section(runs: list[Run], swept: dict[str, list[str]], out: Path) -> list[str]:
    """Per numeric swept key: a plot and a table; plus the MoCo paper's Fig. 3 when the negatives vary."""
    lines, colors = ["## Sweeps", ""], _colors(runs)
    by_method = _by(runs, lambda r: r.method)
    keys = sorted({key for keys in swept.values() for key in keys})
    if not keys:
        lines += ["No override differs between runs of the same method.", ""]
    for key in keys:
        methods = sorted(m for m, ks in swept.items() if key in ks)
        values = [run.value(key) for m in methods for run in by_method[m]]
        if any(isinstance(v, str) for v in values):
            lines += [f"`{key}` varies ({', '.join(methods)}) but is not numeric: no plot.", ""]
            continue
        series = {m: _mean_by_value(by_method[m], lambda r, key=key: r.value(key)) for m in methods}
        series = {m: points for m, points in series.items() if points}
        lines += [f"### `{key}`", ""]
        if series:
            name = f"sweep_{_file_key(key)}.png"
            plot_lines(series, colors, key, f"kNN accuracy against {key}", out / name)
            lines += [f"![kNN accuracy against {key}]({name})", "",
                      f"*Final kNN accuracy against `{key}`, one line per method (mean over runs at each value).*", ""]
        rows = [(m, [run for run in by_method[m] if run.value(key) == x], x)
                for m in methods for x in sorted({v for v in (r.value(key) for r in by_method[m]) if v is not None})]
        lines += [_sweep_table(rows, key), ""]

    varying = sum(len({run.num("negatives_per_query") for run in group} - {None}) > 1 for group in by_method.values())
    if varying >= 2:
        # Every method with a negatives figure is drawn, so a single-K method shows as a point beside the sweeps.
        groups = _by((run for run in runs if run.num("negatives_per_query") is not None),
                     lambda r: f"{r.method} ({r.metrics.get('negatives') or '?'})")
        series = {name: _mean_by_value(group, lambda r: r.num("negatives_per_query"))
                  for name, group in sorted(groups.items())}
        series = {name: points for name, points in series.items() if points}
        lines += ["### Negatives per query (MoCo paper, Fig. 3)", "",
                  budget_line([run for group in groups.values() for run in group]), ""]
        if series:
            plot_lines(series, colors, "negatives per query (log2)", "Accuracy against negatives per query",
                       out / "negatives_sweep.png", log2=True)
            lines += ["![accuracy against negatives per query](negatives_sweep.png)", "",
                      ("*Final kNN accuracy against the number of negatives per query, one line per method and "
                       "negatives source (log2 x axis), as in Fig. 3 of the MoCo paper.*"), ""]
        rows = [(name, [run for run in group if run.num("negatives_per_query") == x], x)
                for name, group in sorted(groups.items())
                for x in sorted({run.num("negatives_per_query") for run in group} - {None})]
        lines += [_sweep_table(rows, "negatives/query"), ""]
    return lines


# ---------------------------------------------------------------------------------------------------- claims


@dataclass
class Claim:
    letter: str
    statement: str
    rule: str
    verdict: str
    evidence: str


def _family(runs: list[Run], *families: str) -> list[Run]:
    return [run for run in runs if run.family in families]


def _best_group_per_setting(runs: list[Run], families: tuple[str, ...]) -> dict[tuple, list[Run]]:
    """Per setting (data, backbone, epochs): the runs of the group (seeds of one configuration) with the highest
    mean kNN among the families' runs."""
    groups = run_groups(_family(runs, *families), swept_keys(runs))
    best: dict[tuple, list[Run]] = {}
    for group in groups.values():
        for setting, members in _by(group, lambda r: r.setting).items():
            accs = _values(members, "knn_acc")
            if accs and (setting not in best or _mean(accs) > _mean(_values(best[setting], "knn_acc"))):
                best[setting] = members
    return best


def _setting_name(setting: tuple) -> str:
    return "/".join(setting)


def _overall(verdicts: list[str], n: list[tuple[int, int]]) -> str:
    """One verdict over several comparisons: every one holds, or one fails; else within noise."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return within_noise([k for pair in n for k in pair])


_TEST = (f"Welch's t-test over the runs (seeds) of each group, two-sided at {ALPHA:g}: 'holds' or 'does not hold' "
         "only when the difference is beyond the noise, otherwise 'within noise' (no test with one run per group)")


def claim_batch_size(runs: list[Run]) -> Claim:
    by_batch = _by((r for r in _family(runs, "end-to-end") if r.num("global_batch_size") is not None),
                   lambda r: r.num("global_batch_size"))
    rule = f"kNN of end-to-end runs at the largest batch > at the smallest batch; {_TEST}"
    statement = "End-to-end training (SimCLR, in-batch negatives) gets more accurate as the batch grows."
    batches = sorted(b for b in by_batch if _values(by_batch[b], "knn_acc"))
    if len(batches) < 2:
        return Claim("a", statement, rule, UNMEASURED, "needs end-to-end runs at two or more batch sizes")
    test = compare(_values(by_batch[batches[-1]], "knn_acc"), _values(by_batch[batches[0]], "knn_acc"))
    evidence = ("kNN by batch: " + ", ".join(f"{b:g}: {summarize(_values(by_batch[b], 'knn_acc'))}" for b in batches)
                + f"; largest - smallest: {test}")
    return Claim("a", statement, rule, test.verdict, evidence)


def claim_staleness(runs: list[Run]) -> Claim:
    statement = "The memory bank's stored keys are staler (less consistent with the current encoder) than MoCo's queue."
    rule = ("staleness cosine of MoCo runs > that of memory-bank runs (1 = fresh; the cosine also counts the "
            f"augmentation and training-mode batch norm behind each stored key, not only encoder drift); {_TEST}")
    bank = _values(_family(runs, "memory bank"), "staleness")
    queue = _values(_family(runs, "momentum queue"), "staleness")
    if not bank or not queue:
        return Claim("b", statement, rule, UNMEASURED, "needs staleness from memory-bank and MoCo runs")
    test = compare(queue, bank)
    bank_s, queue_s = summarize(bank), summarize(queue)
    evidence = (f"memory bank {bank_s.mean:.3f} (n={bank_s.n}), MoCo {queue_s.mean:.3f} (n={queue_s.n}); "
                f"MoCo - bank: {test.diff:+.3f}, {str(test).split(', ', 1)[1]}")
    return Claim("b", statement, rule, test.verdict, evidence)


def claim_decoupled(runs: list[Run]) -> Claim:
    statement = "MoCo decouples the number of negatives from the batch: more negatives per query than end-to-end."
    rule = "at every batch size with both, MoCo's largest negatives/query > end-to-end's largest"

    def largest(families: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for run in _family(runs, families):
            batch, k = run.num("global_batch_size"), run.num("negatives_per_query")
            if batch is not None and k is not None:
                out[batch] = max(k, out.get(batch, k))
        return out

    queue, e2e = largest("momentum queue"), largest("end-to-end")
    shared = sorted(set(queue) & set(e2e))
    if not shared:
        return Claim("c", statement, rule, UNMEASURED, "needs MoCo and end-to-end runs at the same batch size")
    evidence = "; ".join(f"batch {b:g}: MoCo {queue[b]:g} vs end-to-end {e2e[b]:g}" for b in shared)
    return Claim("c", statement, rule, HOLDS if all(queue[b] > e2e[b] for b in shared) else FAILS, evidence)


def claim_more_negatives(runs: list[Run]) -> Claim:
    statement = "More negatives help instance discrimination."
    rule = f"for every method whose runs differ in negatives/query: kNN at the largest K > at the smallest K; {_TEST}"
    parts, verdicts, ns = [], [], []
    for method, group in sorted(_by(runs, lambda r: r.method).items()):
        by_k = _by((r for r in group if r.num("negatives_per_query") is not None and r.num("knn_acc") is not None),
                   lambda r: r.num("negatives_per_query"))
        if len(by_k) >= 2:
            k0, k1 = min(by_k), max(by_k)
            test = compare(_values(by_k[k1], "knn_acc"), _values(by_k[k0], "knn_acc"))
            parts.append(f"{method}: K={k0:g} {summarize(_values(by_k[k0], 'knn_acc'))} -> "
                         f"K={k1:g} {summarize(_values(by_k[k1], 'knn_acc'))} ({test})")
            verdicts.append(test.verdict)
            ns.append(test.n)
    if not verdicts:
        return Claim("d", statement, rule, UNMEASURED, "needs a method with runs at two or more negatives/query")
    return Claim("d", statement, rule, _overall(verdicts, ns), "; ".join(parts))


def _compare_best(runs: list[Run], a: tuple[str, ...], b: tuple[str, ...], margin: float = 0.0):
    """Per shared setting: the best group of families ``a`` against the best of ``b`` (kNN)."""
    best_a, best_b = _best_group_per_setting(runs, a), _best_group_per_setting(runs, b)
    return [(s, compare(_values(best_a[s], "knn_acc"), _values(best_b[s], "knn_acc"), margin),
             summarize(_values(best_a[s], "knn_acc")), summarize(_values(best_b[s], "knn_acc")))
            for s in sorted(set(best_a) & set(best_b))]


def claim_moco_vs_bank(runs: list[Run]) -> Claim:
    statement = "MoCo is at least as accurate as the memory bank at comparable settings (MoCo paper, Fig. 3)."
    rule = ("best MoCo group's kNN > best memory-bank group's, among runs with the same data, backbone and epochs; "
            + _TEST)
    tests = _compare_best(runs, ("momentum queue",), ("memory bank",))
    if not tests:
        return Claim("e", statement, rule, UNMEASURED, "needs MoCo and memory-bank runs with the same setting")
    evidence = "; ".join(f"{_setting_name(s)}: MoCo {a} vs memory bank {b} ({t})" for s, t, a, b in tests)
    return Claim("e", statement, rule, _overall([t.verdict for _, t, _, _ in tests], [t.n for _, t, _, _ in tests]),
                 evidence)


def claim_clustering(runs: list[Run]) -> Claim:
    statement = ("Clustering (SwAV) reaches accuracy comparable to the instance-contrastive methods without any "
                 "explicit negatives.")
    rule = (f"best SwAV group's kNN + {SWAV_MARGIN:g} points > best instance-contrastive group's, among runs with "
            f"the same data, backbone and epochs; {_TEST}")
    tests = _compare_best(runs, ("clustering",), _INSTANCE_FAMILIES, SWAV_MARGIN)
    if not tests:
        return Claim("f", statement, rule, UNMEASURED, "needs SwAV and instance-contrastive runs with the same setting")
    evidence = "; ".join(f"{_setting_name(s)}: SwAV {a} vs best instance {b} (with the margin: {t})"
                         for s, t, a, b in tests)
    return Claim("f", statement, rule, _overall([t.verdict for _, t, _, _ in tests], [t.n for _, t, _, _ in tests]),
                 evidence)


def claim_learned(runs: list[Run]) -> Claim:
    statement = "Every method learned something: its final 1-shot kNN beats the same figure at random initialisation."
    rule = "every run with both figures: knn_acc_1shot > init_knn_acc_1shot"
    pairs = [(run, run.num("knn_acc_1shot"), run.num("init_knn_acc_1shot")) for run in runs]
    pairs = [(run, final, init) for run, final, init in pairs if final is not None and init is not None]
    if not pairs:
        return Claim("g", statement, rule, UNMEASURED, "needs runs with knn_acc_1shot and init_knn_acc_1shot")
    evidence = "; ".join(f"{run.name}: {final:.1f} vs init {init:.1f}" for run, final, init in pairs)
    return Claim("g", statement, rule, HOLDS if all(final > init for _, final, init in pairs) else FAILS, evidence)


def claim_later_stages(runs: list[Run]) -> Claim:
    statement = ("Features from later stages of the encoder serve better than earlier ones (the survey: res5 against "
                 "res2 to res4).")
    rule = f"per group, kNN of the last encoder stage > of the first (`eval.stages=true`); {_TEST}"
    parts, verdicts, ns = [], [], []
    for label, group in run_groups(runs, swept_keys(runs)).items():
        names = next((run.metrics["stages"] for run in group if isinstance(run.metrics.get("stages"), list)), None)
        if not names or len(names) < 2:
            continue
        first, last = (_values(group, f"stage_{name}_knn_acc") for name in (names[0], names[-1]))
        if first and last:
            test = compare(last, first)
            by_stage = ", ".join(f"{name} {summarize(_values(group, f'stage_{name}_knn_acc')).mean:.1f}"
                                 for name in names if _values(group, f"stage_{name}_knn_acc"))
            parts.append(f"{label}: {by_stage} ({names[-1]} - {names[0]}: {test})")
            verdicts.append(test.verdict)
            ns.append(test.n)
    if not verdicts:
        return Claim("h", statement, rule, UNMEASURED, "needs runs with per-stage probes (eval.stages=true)")
    return Claim("h", statement, rule, _overall(verdicts, ns), "; ".join(parts))


def survey_claims(runs: list[Run]) -> list[Claim]:
    checks = [claim_batch_size, claim_staleness, claim_decoupled, claim_more_negatives, claim_moco_vs_bank,
              claim_clustering, claim_learned, claim_later_stages]
    return [check(runs) for check in checks]


def claims_section(claims: list[Claim]) -> list[str]:
    lines = ["## Survey claims", "",
             ('Claims from "A survey on contrastive self-supervised learning" (Jaiswal et al.) and the MoCo paper, '
              "checked against the runs above. Families: end-to-end = negatives from the batch (SimCLR), memory bank "
              "(NPID), momentum queue (MoCo), clustering (SwAV). kNN accuracies in percent."), ""]
    for claim in claims:
        lines += [(f"**{claim.letter}) {claim.statement}** Verdict: **{claim.verdict}**. "
                   f"Rule: {claim.rule}. Numbers: {claim.evidence}."), ""]
    return lines


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """A written report as data: what notebooks and scripts read instead of parsing the markdown."""

    path: Path                  # comparison.md
    runs: list[Run]
    groups: dict[str, list[Run]]  # label -> the runs that differ only in seed
    runs_table: str             # markdown
    groups_table: str           # markdown
    claims: list[Claim]
    target: float | None        # the time-to-accuracy target (kNN %)
    plots: list[Path]


def build_report(root: Path, out: Path | None = None, target: float | None = None) -> Report:
    """Write ``comparison.md`` and its PNG plots into ``out`` (default: ``root``) and return them as a
    :class:`Report`. ``target``: the kNN accuracy of the time-to-accuracy table (default: the lowest every run
    reaches)."""
    root = Path(root)
    runs = load_runs(root) if root.is_dir() else []
    if not runs:
        raise NoRunsError(f"no run found below {root}: no readable metrics.json in it or its subfolders")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(runs)
    runs.sort(key=lambda r: (r.method, tuple(_sort_value(r.value(k)) for k in swept[r.method]), r.name))
    labels = run_labels(runs, swept)
    groups = run_groups(runs, swept)
    table, group_table = runs_table(runs), groups_table(groups)
    target = accuracy_target(runs) if target is None else target
    claims = survey_claims(runs)

    lines = [f"# Comparison of {len(runs)} runs in `{root}`", "", "## Runs", "", table, "", baselines_line(runs), "",
             budget_line(runs), "",
             ("Accuracies in percent; staleness is the mean cosine between stored keys and the same images "
              "re-encoded now (1 = fresh); false-negative rate is a fraction; '-' = not recorded by that run."), "",
             "## Groups", "", ("Runs that differ only in `seed` form a group: mean ± half-width of the 95% interval "
                               "(Student's t), n runs."), "", group_table, "", "## Plots", ""]
    plots = [
        ("knn_per_epoch.png", lambda p: plot_knn_per_epoch(runs, labels, p),
         "kNN accuracy on the validation set after each epoch, one line per run (method and swept values).",
         "no run has a per-epoch kNN history"),
        ("acc_vs_negatives.png", lambda p: plot_acc_vs_negatives(runs, p),
         ("Final kNN accuracy against negatives per query (log x), one marker per method; runs without negatives "
          "(SwAV) are left out."), "no run has both negatives_per_query and knn_acc"),
        ("throughput_memory.png", lambda p: plot_throughput_memory(runs, labels, p),
         "Training throughput (images/s, left) and peak memory (MB, right) per run.",
         "no run has images_per_sec or peak_mem_mb"),
    ]
    for name, draw, caption, missing in plots:
        if draw(out / name):
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        else:
            lines += [f"`{name}` not drawn: {missing}.", ""]
    lines += sweeps_section(runs, swept, out)
    lines += time_to_accuracy_section(groups, target, out)
    lines += claims_section(claims)
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    drawn = sorted(out / name for name in {m for m in re.findall(r"\]\(([^)]+\.png)\)", path.read_text())})
    return Report(path, runs, groups, table, group_table, claims, target, drawn)


def make_report(root: Path, out: Path | None = None, target: float | None = None) -> Path:
    """:func:`build_report`, returning the markdown's path."""
    return build_report(root, out, target).path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.report",
                                     description="Compare the runs below DIR: markdown table, plots, survey claims.")
    parser.add_argument("dir", type=Path, help="a Hydra multirun folder, or any folder of run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write comparison.md and plots (default DIR)")
    parser.add_argument("--target", type=float, default=None,
                        help="kNN accuracy (%%) for the time-to-accuracy table (default: the lowest every run reaches)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dir, args.out, args.target)
    except NoRunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.runs_table)
    print("\n" + "\n".join(f"{c.letter}) {c.verdict}: {c.statement}" for c in report.claims))
    print(f"\nwrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
