"""Before and after: one method's runs under two recipes (untuned against tuned, an old table against a new one),
side by side per method: each figure with its interval and split, the change with Welch's interval, the ranking on
each side, and the distance to raw pixels."""

from __future__ import annotations

from collections.abc import Mapping

from contrastive.report.runs import Run, _by, _values
from contrastive.report.stats import DEFAULT_MARGINS, compare
from contrastive.report.tables import _interval_cell, _md_table, interval_text

FIGURES = [
    ("kNN", "knn_acc"),
    ("1-shot kNN", "knn_acc_1shot"),
    ("10-shot kNN", "knn_acc_10shot"),
    ("offline linear", "offline_linear_acc"),
]
PIXELS_GAP = 10.0  # points above raw pixels a method must keep (the fair protocol's floor)


def _split(runs: list[Run]) -> str:
    """The split the final figures of ``runs`` come from, with its size where recorded."""
    names = sorted({run.eval_split for run in runs})
    sizes = next((run.metrics["split_sizes"] for run in runs if isinstance(run.metrics.get("split_sizes"), dict)), {})
    counts = {sizes.get(name) for name in names} - {None}
    images = f" ({next(iter(counts)):,} images)" if len(counts) == 1 else ""
    return "/".join(names) + " split" + images


def on_both_halves(run: Run) -> float | None:
    """A run's kNN over its validation and test images together: its last per-epoch kNN (validation, the final
    weights) and its final kNN (test), weighted by their sizes. Runs recorded before the three-way split were
    evaluated on exactly that union (validation and test are the two halves of their evaluation set), so this is
    their figure on the same images. None where the run lacks either half."""
    sizes = run.metrics.get("split_sizes")
    history = run.metrics.get("history") or []
    last = history[-1].get("knn_acc") if history and isinstance(history[-1], dict) else None
    if run.metrics.get("eval_split") != "test" or run.metrics.get("monitor_split") != "validation":
        return None
    if not isinstance(sizes, dict) or last is None or run.num("knn_acc") is None:
        return None
    n_val, n_test = sizes.get("validation"), sizes.get("test")
    if not n_val or not n_test:
        return None
    return (float(last) * n_val + run.num("knn_acc") * n_test) / (n_val + n_test)


def _ranking(groups: Mapping[str, list[Run]]) -> list[str]:
    means = {m: sum(v) / len(v) for m, g in groups.items() if (v := _values(g, "knn_acc"))}
    return sorted(means, key=means.get, reverse=True)


def _pixels(runs: list[Run]) -> float | None:
    return next((v for run in runs if (v := run.num("pixels_knn_acc")) is not None), None)


def change_outcome(after: list[float], before: list[float], margin: float) -> str:
    """The change of a kNN figure in words: lost (the interval lies below 0), gained (above 0), or unchanged
    within the noise, by Welch's test (the two sides ran different settings, so seeds do not pair them)."""
    c = compare(after, before, margin, names=("after", "before"), digits=1)
    if c.p_value is None:
        return f"{c.diff:+.1f} (no interval: one run on a side)"
    text = f"{c.interval()} (Welch p={c.p_value:.2g})"
    if c.direction < 0:
        return f"{text}: **lost**"
    if c.direction > 0:
        return f"{text}: gained"
    return f"{text}: within the noise" + (f", equivalent within ±{margin:g}" if c.equivalent else "")


def versus_section(
    before: list[Run], after: list[Run], before_name: str, after_name: str, margin: float | None = None
) -> list[str]:
    """Markdown lines comparing ``after`` with ``before`` per method (runs grouped by method name)."""
    margin = DEFAULT_MARGINS["knn"] if margin is None else margin
    by_before, by_after = _by(before, lambda r: r.method), _by(after, lambda r: r.method)
    methods = [m for m in by_after if m in by_before]
    lines = [
        "## Before and after",
        "",
        (
            f"Before: {before_name} (final figures on the {_split(before)}); after: {after_name} (on the "
            f"{_split(after)}). Mean ± half-width of the 95% interval over each side's seeds; the change is "
            "after minus before with Welch's 95% interval (the sides ran different settings, so their seeds do not "
            "pair). Where the two sides read different images, the change also carries the difference of the images."
        ),
        "",
    ]
    if not methods:
        return [*lines, "No method has runs on both sides.", ""]
    # the before side read validation and test as one unnamed set: compare on those images too
    unnamed = all(run.metrics.get("eval_split") is None for run in before)
    rows = []
    same_rows = []
    for method in methods:
        b, a = by_before[method], by_after[method]
        cells = [method, f"{len(_values(b, 'knn_acc'))} / {len(_values(a, 'knn_acc'))}"]
        for _, key in FIGURES:
            cells += [_interval_cell(b, key), _interval_cell(a, key)]
        vb, va = _values(b, "knn_acc"), _values(a, "knn_acc")
        cells.append(change_outcome(va, vb, margin) if va and vb else "-")
        rows.append(cells)
        both = [v for v in map(on_both_halves, a) if v is not None]
        if unnamed and both and vb:
            same = change_outcome(both, vb, margin)
            same_rows.append([method, _interval_cell(b, "knn_acc"), interval_text(both), same])
    header = ["method", "runs before / after"]
    for name, _ in FIGURES:
        header += [f"{name} before", f"{name} after"]
    lines += [_md_table([*header, "kNN change"], rows), ""]
    if same_rows:
        lines += [
            (
                "On the same images: the before side's final kNN read the validation and test images as one set; the "
                "after side's figure over that set is its last per-epoch kNN (validation, the final weights) and its "
                "final kNN (test), weighted by their sizes."
            ),
            "",
            _md_table(["method", "kNN before", "kNN after, validation + test", "change on the same images"], same_rows),
            "",
        ]
    rank_before = _ranking({m: by_before[m] for m in methods})
    rank_after = _ranking({m: by_after[m] for m in methods})
    lines.append(
        f"Ranking by kNN, before: {' > '.join(rank_before)}; after: {' > '.join(rank_after)}"
        + (" (unchanged)." if rank_before == rank_after else " (changed).")
    )
    pixels = _pixels(after)
    if pixels is not None:
        gaps = {m: sum(v) / len(v) - pixels for m in methods if (v := _values(by_after[m], "knn_acc"))}
        short = [m for m, gap in gaps.items() if gap < PIXELS_GAP]
        lines.append(
            f"Raw pixels, after: kNN {pixels:.1f}; every method's after-kNN minus it: "
            + ", ".join(f"{m} {gap:+.1f}" for m, gap in gaps.items())
            + (
                f" (every method at least {PIXELS_GAP:g} points above)."
                if not short
                else f" ({', '.join(short)} under {PIXELS_GAP:g} points above)."
            )
        )
    return [*lines, ""]
