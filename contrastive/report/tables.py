"""Markdown tables and one-line summaries of a set of runs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from contrastive.report.runs import Run, _as_float, _by, _mean, _short, _values, compare_runs
from contrastive.report.stats import summarize


def _fmt(value: Any, digits: int | None) -> str:
    """``digits=None``: text; otherwise a number with that many decimals; '-' for missing/null/non-numeric."""
    if digits is None:
        return "-" if value is None or value == "" else str(value).replace("|", "\\|")
    number = _as_float(value)
    return "-" if number is None else f"{number:,.{digits}f}"


# (header, metrics key, decimals or None for text)
COLUMNS: list[tuple[str, str, int | None]] = [
    ("method", "method", None),
    ("backbone", "backbone", None),
    ("data", "data", None),
    ("epochs", "epochs", 0),
    ("batch", "global_batch_size", 0),
    ("negatives/query", "negatives_per_query", 0),
    ("kNN", "knn_acc", 1),
    ("1-shot kNN", "knn_acc_1shot", 1),
    ("10-shot kNN", "knn_acc_10shot", 1),
    ("linear (online)", "linear_acc", 1),
    ("offline linear", "offline_linear_acc", 1),
    ("staleness", "staleness", 3),
    ("drift", "drift", 4),
    ("key age (epochs)", "drift_age_epochs", 2),
    ("dictionary / data", "dictionary_ratio", 2),
    ("false-neg. rate", "false_negative_rate", 3),
    ("alignment", "alignment", 3),
    ("uniformity", "uniformity", 3),
    ("images/s", "images_per_sec", 0),
    ("utilisation", "utilisation", 3),  # achieved FLOP/s / measured peak (contrastive.flops_callback)
    ("peak mem (MB)", "peak_mem_mb", 0),
    ("time (s)", "train_time_s", 1),
]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    rows = [
        [f"`{_fmt(run.name, None)}`", *(_fmt(run.metrics.get(key), digits) for _, key, digits in COLUMNS)]
        for run in runs
    ]
    return _md_table(["run", *(header for header, _, _ in COLUMNS)], rows)


GROUP_COLUMNS = [
    ("kNN", "knn_acc"),
    ("1-shot kNN", "knn_acc_1shot"),
    ("10-shot kNN", "knn_acc_10shot"),
    ("linear (online)", "linear_acc"),
    ("offline linear", "offline_linear_acc"),
    ("time (s)", "train_time_s"),
]


def difference_cell(group: list[Run], reference: list[Run], key: str = "knn_acc") -> str:
    """``key`` of ``group`` minus ``reference``: the difference with its 95% interval and the test's kind."""
    if not _values(group, key) or not _values(reference, key):
        return "-"
    c = compare_runs(group, reference, key)
    if c.low is None:
        return f"{c.diff:+.1f} (n={min(c.n)})"
    return f"{c.diff:+.1f} [{c.low:+.1f}, {c.high:+.1f}] ({'paired' if c.paired else 'Welch'})"


def _best_per_setting(groups: dict[str, list[Run]]) -> dict[tuple, str]:
    best: dict[tuple, tuple[float, str]] = {}
    for label, group in groups.items():
        values = _values(group, "knn_acc")
        if values and (group[0].setting not in best or _mean(values) > best[group[0].setting][0]):
            best[group[0].setting] = (_mean(values), label)
    return {setting: label for setting, (_, label) in best.items()}


def groups_table(groups: dict[str, list[Run]]) -> str:
    """Mean and 95% interval of each figure over a group's runs (its seeds); beside the kNN, the difference to the
    best group of the same setting with its interval."""
    best = _best_per_setting(groups)
    rows = []
    for label, group in groups.items():
        cells = []
        for _, key in GROUP_COLUMNS:
            values = _values(group, key)
            cells.append(str(summarize(values)) if values else "-")
            if key == "knn_acc":
                reference = best.get(group[0].setting)
                cells.append(
                    "best"
                    if reference == label
                    else "-"
                    if reference is None
                    else difference_cell(group, groups[reference])
                )
        seeds = sorted({_short(run.value("seed")) for run in group if run.value("seed") is not None})
        rows.append([_fmt(label, None), str(len(group)), ", ".join(seeds) or "-", *cells])
    header = [h for h, key in GROUP_COLUMNS for h in ((h, "kNN vs the best") if key == "knn_acc" else (h,))]
    return _md_table(["group", "runs", "seeds", *header], rows)


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


def splits_line(runs: list[Run]) -> str:
    """Which split the figures come from (metrics.json ``eval_split`` / ``monitor_split`` / ``split_sizes``)."""
    evals = Counter(run.eval_split for run in runs)
    sizes = next((run.metrics["split_sizes"] for run in runs if isinstance(run.metrics.get("split_sizes"), dict)), None)
    named = "; ".join(f"the **{split}** split ({n} run{'s' if n > 1 else ''})" for split, n in evals.items())
    monitors = sorted({run.monitor_split for run in runs})
    text = (
        f"Splits: the final figures (kNN, few-shot, linear probes, raw pixels, initialisation, stages) are on "
        f"{named}; the per-epoch kNN and online probe on {' / '.join(monitors)}; the kNN bank is the training split."
    )
    if len(evals) > 1:
        text += " The runs were evaluated on different splits: compare their figures with care."
    if sizes:
        text += " Images: " + ", ".join(f"{name} {count:,}" for name, count in sizes.items()) + "."
    return text


def baselines_line(runs: list[Run]) -> str:
    """Raw-pixel kNN (from the first run that measured it) and each method's random-init 1-shot kNN."""
    parts = []
    pixel_keys = [
        ("kNN", "pixels_knn_acc"),
        ("1-shot kNN", "pixels_knn_acc_1shot"),
        ("10-shot kNN", "pixels_knn_acc_10shot"),
    ]
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


def _mean_cell(group: list[Run], key: str) -> str:
    values = [v for v in (run.num(key) for run in group) if v is not None]
    return _fmt(_mean(values), 0 if key == "negatives_per_query" else 1) if values else "-"


def interval_text(values: list[float]) -> str:
    """Mean ± the 95% interval's half-width ("-" without values; the mean alone from one value)."""
    if not values:
        return "-"
    s = summarize(values)
    return f"{s.mean:.1f}" if s.half_width is None else f"{s.mean:.1f} ± {s.half_width:.1f}"


def _interval_cell(group: list[Run], key: str) -> str:
    return interval_text(_values(group, key))


def _sweep_table(rows: list[tuple[str, list[Run], float]], value_header: str) -> str:
    """Per point: kNN as mean ± the 95% interval's half-width, and its difference to the series' first point (the
    smallest value) with that difference's interval."""
    figures = ["knn_acc_1shot", "linear_acc"]
    header = ["method", value_header, "runs", "kNN", "kNN vs the smallest", "1-shot kNN", "linear (online)"]
    if value_header != "negatives/query":
        figures.append("negatives_per_query")
        header.append("negatives/query")
    first: dict[str, list[Run]] = {}
    body = []
    for name, group, x in rows:
        reference = first.setdefault(name, group)
        versus = "-" if reference is group else difference_cell(group, reference)
        cells = [_interval_cell(group, "knn_acc"), versus, *(_mean_cell(group, key) for key in figures)]
        body.append([name, f"{x:g}", str(len(group)), *cells])
    return _md_table(header, body)
