"""The report's PNG plots (matplotlib's Agg canvas, whatever pyplot's backend is)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from contrastive.report.runs import Run, _as_float, _by, knn_curve
from contrastive.report.stats import summarize

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


def _epoch_points(run: Run) -> list[tuple[float, float]]:
    # History epochs are 0-based (recorded during the epoch); +1 counts epochs completed, as the table does.
    return [
        (rec["epoch"] + 1, rec["knn_acc"])
        for rec in run.metrics.get("history") or []
        if isinstance(rec, dict)
        and _as_float(rec.get("epoch")) is not None
        and _as_float(rec.get("knn_acc")) is not None
    ]


def plot_knn_per_epoch(groups: dict[str, list[Run]], path: Path) -> bool:
    """One line per group of seeds: a single run as it is, a larger group as its mean with the band from its lowest
    to its highest run at each epoch."""
    runs = [run for group in groups.values() for run in group]
    colors, fig = _colors(runs), Figure(figsize=(7.5, 4.5))
    ax, drawn, seen = fig.subplots(), False, defaultdict(int)
    for label, group in groups.items():
        by_epoch: dict[float, list[float]] = defaultdict(list)
        for run in group:
            for epoch, acc in _epoch_points(run):
                by_epoch[epoch].append(acc)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        method = group[0].method
        i = seen[method]
        seen[method] += 1
        n = max(len(v) for v in by_epoch.values())
        ax.plot(
            epochs,
            [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
            color=colors[method],
            label=label if n == 1 else f"{label} (mean, n={n})",
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=3,
        )
        if n > 1:
            ax.fill_between(
                epochs,
                [min(by_epoch[e]) for e in epochs],
                [max(by_epoch[e]) for e in epochs],
                color=colors[method],
                alpha=0.15,
                linewidth=0,
            )
        drawn = True
    if not drawn:
        return False
    ax.set(xlabel="epochs trained", ylabel="kNN accuracy (%)", title="kNN accuracy during training")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def plot_time_to_accuracy(runs: list[Run], target: float, path: Path) -> bool:
    colors, fig = _colors(runs), Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, sharey=True)
    drawn = False
    for run in runs:
        curve = knn_curve(run)
        if not curve:
            continue
        left.plot(
            [c[0] for c in curve],
            [c[2] for c in curve],
            color=colors[run.method],
            marker="o",
            markersize=2,
            label=run.method if not drawn or run.method not in left.get_legend_handles_labels()[1] else None,
        )
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
    ax.set(
        xlabel="negatives per query (log scale)",
        ylabel="final kNN accuracy (%)",
        title="Accuracy against the number of negatives",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_throughput_memory(runs: list[Run], labels: dict[str, str], path: Path) -> bool:
    panels = [("images_per_sec", "Throughput", "training images / s"), ("peak_mem_mb", "Peak memory", "MB")]
    if not any(run.num(key) is not None for run in runs for key, _, _ in panels):
        return False
    colors = _colors(runs)
    names = [labels[run.name] for run in runs]
    # one column of run labels, on the left, shared by both panels (long sweep labels would cover the left panel)
    fig = Figure(figsize=(7 + 0.07 * max(len(name) for name in names), 0.4 * len(runs) + 1.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, title, unit) in zip(axes, panels):
        values = [run.num(key) for run in runs]
        bars = ax.barh(
            range(len(runs)), [0 if v is None else v for v in values], color=[colors[run.method] for run in runs]
        )
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.0f}" for v in values], fontsize=7, padding=2)
        ax.set(xlabel=unit, title=title)
        ax.margins(x=0.15)
    axes[0].set_yticks(range(len(runs)), names, fontsize=8)
    axes[0].invert_yaxis()  # first run on top, as in the table
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_lines(
    series: dict[str, list[tuple[float, list[float]]]],
    colors: dict[str, Any],
    xlabel: str,
    title: str,
    path: Path,
    log2: bool = False,
) -> None:
    """One line per series through the mean at each x, with every run's value as a dot (the seed spread) and the
    95% interval of the mean as a bar where a point has 2+ runs; log2 x if asked or where the values span a wide
    range."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, (name, points) in enumerate(series.items()):
        color, marker = colors.get(name.split(" ")[0]), _MARKERS[i % len(_MARKERS)]
        line = ax.plot(
            [x for x, _ in points],
            [sum(ys) / len(ys) for _, ys in points],
            marker=marker,
            color=color,
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            label=name,
        )[0]
        spread = [(x, y) for x, ys in points if len(ys) > 1 for y in ys]
        if spread:
            ax.scatter(*zip(*spread), color=line.get_color(), marker=marker, s=20, alpha=0.5, linewidths=0)
            # the 95% interval of each point's mean: what a reader needs to tell two points apart
            bars = [(x, summarize(ys)) for x, ys in points if len(ys) > 1]
            ax.errorbar(
                [x for x, _ in bars],
                [s.mean for _, s in bars],
                yerr=[s.half_width for _, s in bars],
                fmt="none",
                ecolor=line.get_color(),
                elinewidth=1,
                capsize=3,
                alpha=0.8,
            )
    xs = [x for points in series.values() for x, _ in points]
    if log2 and min(xs) > 0:
        _set_log2(ax)
    else:
        _log2_axis(ax, xs)
    ax.set(xlabel=xlabel, ylabel="final kNN accuracy (%)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
