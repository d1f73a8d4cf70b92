"""A folder of runs -> ``comparison.md`` (tables, plots, sweeps, time to accuracy, the survey's claims) and PNG
plots beside it, returned as a :class:`Report`."""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from contrastive.report.claims import Claim, claims_section, survey_claims
from contrastive.report.plots import (
    _colors,
    plot_acc_vs_negatives,
    plot_knn_per_epoch,
    plot_lines,
    plot_throughput_memory,
    plot_time_to_accuracy,
)
from contrastive.report.runs import (
    NoRunsError,
    Run,
    _by,
    _sort_value,
    accuracy_target,
    distinct_runs,
    load_runs,
    run_groups,
    run_labels,
    swept_keys,
    time_to_accuracy,
    values_by_x,
)
from contrastive.report.stats import DEFAULT_MARGINS, margins_with, summarize
from contrastive.report.tables import (
    _fmt,
    _md_table,
    _sweep_table,
    baselines_line,
    budget_line,
    groups_table,
    runs_table,
    splits_line,
)
from contrastive.report.versus import versus_section


def time_to_accuracy_section(groups: dict[str, list[Run]], target: float | None, out: Path) -> list[str]:
    lines = ["## Time to accuracy", ""]
    runs = [run for group in groups.values() for run in group]
    if target is None:
        return [*lines, "No run has a per-epoch kNN history with its step count.", ""]
    if plot_time_to_accuracy(runs, target, out / "time_to_accuracy.png"):
        lines += [
            "![kNN accuracy against images seen and seconds](time_to_accuracy.png)",
            "",
            (
                f"*kNN accuracy after each epoch against training images seen (left) and wall-clock seconds "
                f"since training started, evaluation included (right); dotted: the target {target:g}%.*"
            ),
            "",
        ]
    rows = []
    for label, group in groups.items():
        reached = [time_to_accuracy(run, target) for run in group]
        images = [r[0] for r in reached if r is not None]
        seconds = [r[1] for r in reached if r is not None and r[1] is not None]
        rows.append(
            [
                _fmt(label, None),
                f"{len(images)}/{len(group)}",
                f"{summarize(images).mean:,.0f}" if images else "not reached",
                str(summarize(seconds)) if seconds else "-",
            ]
        )
    lines += [
        f"Target: {target:g}% kNN, the lowest best-epoch kNN among the runs (so every run reaches it); "
        "the first epoch at or above it counts (images and seconds: mean over the group's runs, seconds "
        "with its 95% interval).",
        "",
        _md_table(["group", "runs reaching it", "images seen", "seconds"], rows),
        "",
    ]
    return lines


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
        series = {m: values_by_x(by_method[m], lambda r, key=key: r.value(key)) for m in methods}
        series = {m: points for m, points in series.items() if points}
        lines += [f"### `{key}`", ""]
        if series:
            name = f"sweep_{_file_key(key)}.png"
            plot_lines(series, colors, key, f"kNN accuracy against {key}", out / name)
            lines += [
                f"![kNN accuracy against {key}]({name})",
                "",
                (
                    f"*Final kNN accuracy against `{key}`, one line per method through the mean at each value, "
                    "a dot per run, a bar for the 95% interval of the mean where a value has 2+ runs.*"
                ),
                "",
            ]
        rows = [
            (m, [run for run in by_method[m] if run.value(key) == x], x)
            for m in methods
            for x in sorted({v for v in (r.value(key) for r in by_method[m]) if v is not None})
        ]
        lines += [_sweep_table(rows, key), ""]

    varying = sum(len({run.num("negatives_per_query") for run in group} - {None}) > 1 for group in by_method.values())
    if varying >= 2:
        # Every method with a negatives figure is drawn, so a single-K method shows as a point beside the sweeps.
        groups = _by(
            (run for run in runs if run.num("negatives_per_query") is not None),
            lambda r: f"{r.method} ({r.metrics.get('negatives') or '?'})",
        )
        series = {
            name: values_by_x(group, lambda r: r.num("negatives_per_query")) for name, group in sorted(groups.items())
        }
        series = {name: points for name, points in series.items() if points}
        lines += [
            "### Negatives per query (MoCo paper, Fig. 3)",
            "",
            budget_line([run for group in groups.values() for run in group]),
            "",
        ]
        if series:
            plot_lines(
                series,
                colors,
                "negatives per query (log2)",
                "Accuracy against negatives per query",
                out / "negatives_sweep.png",
                log2=True,
            )
            lines += [
                "![accuracy against negatives per query](negatives_sweep.png)",
                "",
                (
                    "*Final kNN accuracy against the number of negatives per query, one line per method and "
                    "negatives source through the mean at each point, a dot per run and a bar for the 95% interval "
                    "of the mean where a point has 2+ runs (log2 x axis), as in Fig. 3 of the MoCo paper.*"
                ),
                "",
            ]
        rows = [
            (name, [run for run in group if run.num("negatives_per_query") == x], x)
            for name, group in sorted(groups.items())
            for x in sorted({run.num("negatives_per_query") for run in group} - {None})
        ]
        lines += [_sweep_table(rows, "negatives/query"), ""]
    return lines


@dataclass
class Report:
    """A written report as data: what notebooks and scripts read instead of parsing the markdown."""

    path: Path  # comparison.md
    runs: list[Run]
    groups: dict[str, list[Run]]  # label -> the runs that differ only in seed
    runs_table: str  # markdown
    groups_table: str  # markdown
    claims: list[Claim]
    target: float | None  # the time-to-accuracy target (kNN %)
    plots: list[Path]
    copies: list[str]  # one line per group whose copies of a replicate were counted once
    margins: dict[str, float]  # the equivalence margins the claims used


def _sources(loaded: list[tuple[Path, list[Run]]]) -> str:
    """The report's folders for its title, single run folders counted under their parent folder."""
    singles = [root for root, found in loaded if len(found) == 1 and found[0].path == root]
    per_parent = Counter(root.parent for root in singles)
    parts: list[str] = []
    for root, _ in loaded:
        if root not in singles or per_parent[root.parent] == 1:
            parts.append(f"`{root}`")
        elif (text := f"{per_parent[root.parent]} runs of `{root.parent}`") not in parts:
            parts.append(text)
    return ", ".join(parts)


def build_report(
    root: Path | Sequence[Path],
    out: Path | None = None,
    target: float | None = None,
    margins: Mapping[str, float] | None = None,
    before: Path | None = None,
) -> Report:
    """Write ``comparison.md`` and its PNG plots into ``out`` (default: the first ``root``) and return them as a
    :class:`Report`. ``root``: a folder of runs, or several (a run folder counts as one) whose runs are compared
    together. ``target``: the kNN accuracy of the time-to-accuracy table (default: the lowest every run reaches).
    ``margins``: equivalence margins by metric (``knn``, ``drift``, ``staleness``) over the defaults. ``before``: a
    folder of runs of the same methods under another recipe (an older table): a section compares them per method."""
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    if not roots:
        raise NoRunsError("no folder given")
    loaded = [(r, load_runs(r) if r.is_dir() else []) for r in roots]
    for r, found in loaded:
        if not found:
            raise NoRunsError(f"no run found below {r}: no readable metrics.json in it or its subfolders")
    margins = margins_with(margins)
    before_runs: list[Run] = []
    if before is not None:
        before_runs = distinct_runs(load_runs(Path(before)) if Path(before).is_dir() else [])[0]
        if not before_runs:
            raise NoRunsError(f"--before {before}: no readable metrics.json in it or its subfolders")
    runs = [run for _, found in loaded for run in found]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # the same sub-folder name under two roots: say which root
        for r, found in loaded:
            for run in found:
                run.name = f"{r.name}/{run.name}" if run.path != r else run.name
    out = Path(out) if out is not None else roots[0]
    out.mkdir(parents=True, exist_ok=True)
    loaded_count = len(runs)
    runs, copies = distinct_runs(runs)  # copies of a replicate would pass for seeds
    swept = swept_keys(runs)
    runs.sort(key=lambda r: (r.method, tuple(_sort_value(r.value(k)) for k in swept[r.method]), r.name))
    labels = run_labels(runs, swept)
    groups = run_groups(runs, swept)
    table, group_table = runs_table(runs), groups_table(groups)
    target = accuracy_target(runs) if target is None else target
    claims = survey_claims(runs, margins)

    lines = [
        f"# Comparison of {len(runs)} runs in {_sources(loaded)}",
        "",
        "## Runs",
        "",
        table,
        "",
    ]
    if copies:
        lines += [
            f"Copies: {loaded_count} run folders hold {len(runs)} distinct runs; runs of one group with the same seed "
            "(a backup, a re-run, a parent folder that also holds results) are one replicate, counted once:",
            "",
            *(f"- {note}" for note in copies),
            "",
        ]
    lines += [
        splits_line(runs),
        "",
        baselines_line(runs),
        "",
        budget_line(runs),
        "",
        (
            "Accuracies in percent; staleness is the mean cosine between stored keys and the same images "
            "re-encoded now (1 = fresh); false-negative rate is a fraction; '-' = not recorded by that run."
        ),
        "",
        "## Groups",
        "",
        (
            "Runs that differ only in `seed` form a group: mean ± half-width of the 95% interval (Student's t), n "
            "runs. kNN vs the best: the group's kNN minus the best group's in the same setting (data, backbone, "
            "epochs), with its 95% interval (paired t where the two ran the same seeds, else Welch's; no correction "
            "for many comparisons: the claims below carry the tests)."
        ),
        "",
        group_table,
        "",
    ]
    if before is not None:
        lines += versus_section(before_runs, runs, f"`{before}`", _sources(loaded), margins["knn"])
    lines += ["## Plots", ""]
    plots = [
        (
            "knn_per_epoch.png",
            lambda p: plot_knn_per_epoch(groups, p),
            (
                "kNN accuracy on the validation set after each epoch, one line per group of seeds (method and swept "
                "values): its mean, shaded from its lowest to its highest run."
            ),
            "no run has a per-epoch kNN history",
        ),
        (
            "acc_vs_negatives.png",
            lambda p: plot_acc_vs_negatives(runs, p),
            (
                "Final kNN accuracy against negatives per query (log x), one marker per method; runs without negatives "
                "(SwAV) are left out."
            ),
            "no run has both negatives_per_query and knn_acc",
        ),
        (
            "throughput_memory.png",
            lambda p: plot_throughput_memory(runs, labels, p),
            "Training throughput (images/s, left) and peak memory (MB, right) per run.",
            "no run has images_per_sec or peak_mem_mb",
        ),
    ]
    for name, draw, caption, missing in plots:
        if draw(out / name):
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        else:
            lines += [f"`{name}` not drawn: {missing}.", ""]
    lines += sweeps_section(runs, swept, out)
    lines += time_to_accuracy_section(groups, target, out)
    lines += claims_section(claims, margins)
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    drawn = sorted(out / name for name in {m for m in re.findall(r"\]\(([^)]+\.png)\)", path.read_text())})
    return Report(path, runs, groups, table, group_table, claims, target, drawn, copies, margins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrastive.report",
        description=(
            "Compare the runs below DIR (or several DIRs): markdown table, plots, survey claims. A tuning folder (a "
            "sweep of experiment=tune_*, or its table from contrastive.tune_record): the trial table and its plot."
        ),
    )
    parser.add_argument(
        "dir",
        type=Path,
        nargs="+",
        help="a Hydra multirun folder, or any folder of run folders; several are compared together",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write comparison.md and plots (default: the first DIR)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="kNN accuracy (%%) for the time-to-accuracy table (default: the lowest every run reaches)",
    )
    parser.add_argument(
        "--margin",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=(
            "equivalence margin of a metric, repeatable: knn (every kNN accuracy, points; default "
            f"{DEFAULT_MARGINS['knn']:g}), drift (default {DEFAULT_MARGINS['drift']:g}), staleness (default "
            f"{DEFAULT_MARGINS['staleness']:g})"
        ),
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "runs of the same methods under an earlier recipe (e.g. the untuned table): a section sets them beside "
            "these per method, with each change's interval and the rankings"
        ),
    )
    args = parser.parse_args(argv)
    from contrastive.tune_record import TuningError, is_tuning_folder

    if len(args.dir) == 1 and is_tuning_folder(args.dir[0]):  # a sweep of experiment=tune_*, or its recorded table
        from contrastive.report.tuning import tuning_report

        try:
            path = tuning_report(args.dir[0], args.out)
        except TuningError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(path.read_text())
        print(f"\nwrote {path}")
        return 0
    margins = {}
    for item in args.margin:
        name, _, value = item.partition("=")
        try:
            margins[name.strip()] = float(value)
        except ValueError:
            parser.error(f"--margin {item!r}: expected NAME=NUMBER, e.g. knn=0.5")
    try:
        margins = margins_with(margins)
    except ValueError as err:
        parser.error(f"--margin: {err}")
    try:
        report = build_report(args.dir, args.out, args.target, margins, before=args.before)
    except NoRunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.runs_table)
    print("\n" + "\n".join(f"{c.letter}) {c.verdict}: {c.statement}" for c in report.claims))
    print(f"\nwrote {report.path}")
    return 0
