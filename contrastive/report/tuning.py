"""A tuning folder -> ``comparison.md`` and ``knn_per_trial.png``: the study, its search space, the trial table
(every trial's settings and validation kNN, the best in bold) and the validation kNN of each trial. The folder is a
sweep of ``experiment=tune_*`` or the table ``python -m contrastive.tune_record`` wrote from one
(``results/tuning/<method>``)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from contrastive.report.plots import _save
from contrastive.report.tables import _md_table
from contrastive.tune_record import Study, read_study


def plot_knn_per_trial(study: Study, path: Path) -> bool:
    """Validation kNN against the trial number, the running best as a step line; failed trials marked at the bottom."""
    done = [(t.number, t.value) for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if not done:
        return False
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.plot(*zip(*done), "o", color="tab:blue", label="trial")
    best, steps = -math.inf, []
    for number, value in done:
        best = max(best, value)
        steps.append((number, best))
    ax.step(*zip(*steps), where="post", color="tab:orange", label="best so far")
    failed = [t.number for t in study.trials if t.value is None and t.state != "running"]
    if failed:
        low = min(v for _, v in done)
        ax.plot(failed, [low] * len(failed), "x", color="tab:red", label="diverged / failed")
    top = study.best
    ax.annotate(f"{top.value:.1f}", (top.number, top.value), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("trial")
    ax.set_ylabel("kNN accuracy, validation (%)")
    ax.set_title(f"{study.name}: validation kNN per trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)
    return True


def tuning_report(folder: Path, out: Path | None = None) -> Path:
    """Write the tuning report of ``folder`` into ``out`` (default: ``folder``); returns the markdown's path."""
    study = read_study(Path(folder))
    out = Path(out) if out is not None else Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    best = study.best
    keys = list(study.space)
    rows = []
    for t in study.trials:
        value = "-" if t.value is None or not math.isfinite(t.value) else f"{t.value:.2f}"
        cells = [str(t.number), t.state, value, *(_cell(t.params.get(k)) for k in keys)]
        rows.append([f"**{c}**" for c in cells] if best is not None and t.number == best.number else cells)
    sampler = study.sampler.get("_target_", "").split(".")[-1]
    wall = f"{study.wall_time_s / 60:.1f} min" if study.wall_time_s else "not recorded"
    lines = [
        f"# Tuning: {study.name}",
        "",
        (
            f"{study.method} under experiment={study.experiment}: {len(study.trials)} of {study.n_trials} trials "
            f"({sampler}, sampler seed {study.sampler.get('seed')}, {study.sampler.get('n_startup_trials')} drawn at "
            f"random first), sweep wall time {wall}. Split: every figure here is the final kNN accuracy on the "
            "**validation** split (the objective; tuning trials never read the test split)."
            + ("" if study.finished else " **The sweep has not finished.**")
        ),
        "",
        "Search space: " + "; ".join(f"`{k}` {v}" for k, v in study.space.items()) + ".",
        "",
        _md_table(["trial", "state", "kNN (validation)", *(f"`{k}`" for k in keys)], rows),
        "",
    ]
    if best is not None:
        lines += [f"Best: trial {best.number}, validation kNN {best.value:.2f}.", ""]
    if plot_knn_per_trial(study, out / "knn_per_trial.png"):
        caption = "Validation kNN accuracy of each trial (dots) and the best so far (line)."
        lines += [f"![{caption}](knn_per_trial.png)", "", f"*{caption}*", ""]
    lines += confirmation_lines(study)
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def confirmation_lines(study: Study) -> list[str]:
    """The confirmation stage's table (contrastive.tune_confirm), where the study has one."""
    confirmed = study.confirmation
    if not confirmed:
        return []
    seeds = confirmed["seeds"]
    keys = list(study.space)
    short = {f"trial{t.number}": t.value for t in study.trials}
    params = {"incumbent": study.incumbent or {}, **{f"trial{t.number}": t.params for t in study.trials}}
    rows = []
    for name, got in confirmed["candidates"].items():
        first = short.get(name)
        cells = [
            name,
            "-" if first is None else f"{first:.2f}",
            *(f"{v:.2f}" for v in got["validation_knn_acc"]),
            f"{got['mean']:.2f}",
            *(_cell(params.get(name, {}).get(k)) for k in keys),
        ]
        rows.append([f"**{c}**" for c in cells] if name == confirmed["chosen"] else cells)
    head = ["candidate", "kNN, trial budget", *(f"kNN, seed {s}" for s in seeds), "mean", *(f"`{k}`" for k in keys)]
    chosen = confirmed["chosen"]
    verdict = (
        "the incumbent (the settings before the tuning) is kept"
        if chosen == "incumbent"
        else f"{chosen} is confirmed and written into the benchmark's settings"
    )
    return [
        "## Confirmation at the full budget",
        "",
        (
            f"The best trial(s) and the incumbent (the settings before the tuning) trained again at the full budget "
            f"({confirmed['epochs']} epochs, experiment={confirmed['experiment']}, seed "
            f"{', '.join(map(str, seeds))}), every figure the final kNN accuracy on the **validation** split: "
            f"{verdict}. Recorded {confirmed['recorded']}."
        ),
        "",
        _md_table(head, rows),
        "",
    ]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
