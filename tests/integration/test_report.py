"""The report on fabricated run folders: table numbers, plots, sweep detection, claim verdicts, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from matplotlib.image import imread

from contrastive.report import (
    FAILS,
    HOLDS,
    TOO_FEW,
    UNDECIDED,
    UNMEASURED,
    NoRunsError,
    Run,
    build_report,
    load_runs,
    main,
    run_labels,
    survey_claims,
    swept_keys,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON = {
    "data": "digits",
    "backbone": "small_cnn",
    "epochs": 3,
    "global_batch_size": 128,
    "pixels_knn_acc": 88.25,
    "pixels_knn_acc_1shot": 41.5,
    "pixels_knn_acc_10shot": 70.0,
}


def history(final_knn: float) -> list[dict]:
    return [{"epoch": e, "step": 10 * (e + 1), "loss": 5.0 - e, "knn_acc": final_knn - 10 * (2 - e)} for e in range(3)]


def write_run(
    root: Path,
    name: str,
    metrics: dict,
    overrides: list[str] | None = None,
    hydra_overrides: list[str] | None = None,
    config: dict | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if overrides is not None:
        metrics = {**metrics, "overrides": overrides}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if hydra_overrides is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hydra_overrides))
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def instance_run(method: str, negatives: str, knn: float, k: float, staleness: float | None, **extra) -> dict:
    return {
        **COMMON,
        "method": method,
        "negatives": negatives,
        "knn_acc": knn,
        "knn_acc_1shot": knn / 2,
        "knn_acc_10shot": knn - 5,
        "init_knn_acc_1shot": 20.0,
        "linear_acc": knn + 1.25,
        "offline_linear_acc": knn + 2,
        "negatives_per_query": k,
        "staleness": staleness,
        "false_negative_rate": 0.0123,
        "alignment": 0.456,
        "uniformity": -2.345,
        "images_per_sec": 1234.56,
        "peak_mem_mb": 512.4,
        "train_time_s": 42.25,
        "history": history(knn),
        **extra,
    }


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Four methods, a MoCo queue sweep (folder order != queue order), a partial run of another method.

    Implied claims: a) one batch size -> not measured; b) bank 0.6 < MoCo 0.9 -> holds; c) MoCo 4096 > SimCLR
    254 -> holds; d) MoCo 70 at K=256 <= 75 at K=4096 -> holds; e) 75 >= 70 -> holds; f) SwAV 60 < 80 - 5 -> fails;
    g) every 1-shot kNN (knn/2 >= 30) > 20 -> holds.
    """
    root = tmp_path / "multirun"
    write_run(
        root, "0_simclr", instance_run("simclr", "batch", 80.0, 254, None), ["method=simclr", "data.batch_size=128"]
    )
    write_run(
        root,
        "1_memory_bank",
        instance_run("memory_bank", "bank", 70.0, 4096, 0.6),
        ["method=memory_bank", "data.batch_size=128"],
    )
    # The sweep's default point: no queue override, its value comes from the saved config.
    write_run(
        root,
        "2_moco",
        instance_run("moco", "queue", 75.0, 4096, 0.9),
        ["method=moco", "data.batch_size=128"],
        config={"method": {"name": "moco", "queue_size": 4096}},
    )
    write_run(
        root,
        "3_moco",
        instance_run("moco", "queue", 70.0, 256, 0.9),
        ["method=moco", "data.batch_size=128", "method.queue_size=256", "hydra.job.chdir=true"],
    )
    # Overrides only in .hydra/overrides.yaml (an older trainer did not copy them into metrics.json).
    write_run(
        root,
        "4_moco",
        instance_run("moco", "queue", 72.5, 1024, 0.9),
        hydra_overrides=["method=moco", "data.batch_size=128", "method.queue_size=1024"],
    )
    swav = {
        **COMMON,
        "method": "swav",
        "negatives": "none",
        "knn_acc": 60.0,
        "knn_acc_1shot": 30.0,
        "init_knn_acc_1shot": 22.0,
        "prototype_entropy": 0.9,
        "images_per_sec": 900.0,
        "peak_mem_mb": 600.0,
        "train_time_s": 50.0,
        "history": history(60.0),
    }
    write_run(root, "5_swav", swav, ["method=swav", "data.batch_size=128"])
    write_run(root, "6_partial", {"method": "byol", "knn_acc": None, "epochs": 1}, ["method=byol"])
    return root


def table_rows(markdown: str, section: str = "## Runs") -> dict[str, dict[str, str]]:
    """The first table after ``section`` as {first cell: {header: cell}}."""
    lines = markdown.split(section, 1)[1].strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")) :]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells))
    return rows


def claim_verdicts(markdown: str) -> dict[str, str]:
    out = {}
    for line in markdown.split("## Survey claims", 1)[1].splitlines():
        if line.startswith("**") and "Verdict: **" in line:
            out[line[2]] = line.split("Verdict: **", 1)[1].split("**", 1)[0]
    return out


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_table_has_one_row_per_run_with_its_numbers(sweep_dir: Path) -> None:
    markdown = build_report(sweep_dir).path.read_text()
    rows = table_rows(markdown)
    # Sorted by method, then by the swept queue size (256, 1024, 4096), not by folder name.
    assert list(rows) == ["6_partial", "1_memory_bank", "3_moco", "4_moco", "2_moco", "0_simclr", "5_swav"]
    moco = rows["4_moco"]
    assert (moco["method"], moco["backbone"], moco["data"], moco["epochs"], moco["batch"]) == (
        "moco",
        "small_cnn",
        "digits",
        "3",
        "128",
    )
    assert moco["negatives/query"] == "1,024"
    assert (moco["kNN"], moco["1-shot kNN"], moco["10-shot kNN"]) == ("72.5", "36.2", "67.5")
    assert (moco["linear (online)"], moco["offline linear"]) == ("73.8", "74.5")
    assert (moco["staleness"], moco["false-neg. rate"], moco["alignment"], moco["uniformity"]) == (
        "0.900",
        "0.012",
        "0.456",
        "-2.345",
    )
    assert (moco["images/s"], moco["peak mem (MB)"], moco["time (s)"]) == ("1,235", "512", "42.2")
    assert rows["0_simclr"]["staleness"] == "-"
    assert rows["5_swav"]["negatives/query"] == "-" and rows["5_swav"]["kNN"] == "60.0"
    partial = rows["6_partial"]
    assert partial["method"] == "byol" and partial["epochs"] == "1"
    assert all(partial[h] == "-" for h in ("backbone", "batch", "kNN", "linear (online)", "images/s", "time (s)"))
    assert "Raw pixels (from `1_memory_bank`): kNN 88.2, 1-shot kNN 41.5, 10-shot kNN 70.0." in markdown
    assert "moco 20.0 (mean of 3)" in markdown and "swav 22.0" in markdown


def test_plots_are_valid_pngs_referenced_from_the_markdown(sweep_dir: Path) -> None:
    markdown = build_report(sweep_dir).path.read_text()
    for name in ("knn_per_epoch.png", "acc_vs_negatives.png", "throughput_memory.png", "sweep_method.queue_size.png"):
        assert_png(sweep_dir / name)
        assert f"]({name})" in markdown
    # Only MoCo varies its negatives: the Fig. 3 plot needs two methods that do.
    assert not (sweep_dir / "negatives_sweep.png").exists()


def test_sweep_key_detected_with_config_and_hydra_fallbacks(sweep_dir: Path) -> None:
    runs = load_runs(sweep_dir)
    swept = swept_keys(runs)
    assert swept["moco"] == ["method.queue_size"]  # hydra.* ignored, data.batch_size constant
    assert swept["simclr"] == swept["swav"] == swept["byol"] == []
    by_name = {run.name: run for run in runs}
    assert by_name["2_moco"].value("method.queue_size") == 4096.0  # from config.yaml
    assert by_name["4_moco"].value("method.queue_size") == 1024.0  # from .hydra/overrides.yaml
    labels = run_labels(runs, swept)
    assert labels["3_moco"] == "moco queue_size=256" and labels["0_simclr"] == "simclr"

    markdown = build_report(sweep_dir).path.read_text()
    section = markdown.split("### `method.queue_size`", 1)[1].split("##", 1)[0]
    # kNN, then its difference to the sweep's first point (one run each: no interval)
    assert "| moco | 256 | 1 | 70.0 | - | 35.0 | 71.2 | 256 |" in section
    assert "| moco | 4096 | 1 | 75.0 | +5.0 (n=1) | 37.5 | 76.2 | 4,096 |" in section


def seeded(runs: list[Run], jitter: tuple[float, ...] = (-0.2, 0.0, 0.2)) -> list[Run]:
    """Each run repeated over seeds, its kNN (and staleness, scaled) moved by ``jitter``: groups with known spread."""
    out = []
    for run in runs:
        for seed, shift in enumerate(jitter):
            metrics = dict(run.metrics)
            if metrics.get("knn_acc") is not None:
                metrics["knn_acc"] += shift
            if metrics.get("staleness") is not None:
                metrics["staleness"] += shift / 100
            out.append(Run(f"{run.name}_s{seed}", run.path, metrics, {**run.overrides, "seed": str(seed)}))
    return out


def test_single_runs_give_no_verdict_between_accuracies(sweep_dir: Path) -> None:
    """One run per configuration: no interval, so comparisons of figures are 'not enough runs', never decided; only
    the count of negatives (c) needs no repeats."""
    markdown = build_report(sweep_dir).path.read_text()
    few = f"{TOO_FEW} (n=1 in a group: no interval without repeats)"
    assert claim_verdicts(markdown) == {
        "a": UNMEASURED,
        "b": few,
        "c": HOLDS,
        "d": few,
        "e": few,
        "f": few,
        "g": few,  # one run of each method: a gain over initialisation is not a test
        "h": UNMEASURED,
    }
    assert "within noise" not in markdown
    assert "MoCo - memory bank +5.00: not enough runs (n=1/1; no interval without repeats)" in markdown


def test_claim_verdicts_follow_seeded_groups(sweep_dir: Path) -> None:
    """Three seeds per configuration with a spread of 0.2 points: the fixture's differences are beyond the noise."""
    runs = seeded(load_runs(sweep_dir))
    verdicts = {claim.letter: claim.verdict for claim in survey_claims(runs)}
    assert verdicts == {
        "a": UNMEASURED,
        "b": HOLDS,
        "c": HOLDS,
        "d": HOLDS,
        "e": HOLDS,
        "f": FAILS,
        "g": HOLDS,
        "h": UNMEASURED,
    }
    claim_e = survey_claims(runs)[4]
    assert "MoCo 75.0 ± 0.5 (n=3) vs memory bank 70.0 ± 0.5 (n=3)" in claim_e.evidence  # t(0.975, 2) 4.303 x 0.2/sqrt 3


def test_noisy_seeds(sweep_dir: Path) -> None:
    """Seeds that move every method alike (3 points up or down at the same seed) cancel in the paired test: MoCo's
    5-point lead over the bank is decided. Seeds that move the bank the other way leave it undecided, with the seeds
    that would decide it."""
    alike = seeded(load_runs(sweep_dir), (-3, 0, 3))
    verdicts = {claim.letter: claim.verdict for claim in survey_claims(alike)}
    assert verdicts["e"] == HOLDS and verdicts["f"] == FAILS
    assert "paired t over 3 seeds" in survey_claims(alike)[4].evidence
    apart = seeded(load_runs(sweep_dir), (-3, 0, 3))
    for run in apart:
        if run.method == "memory_bank":  # per seed MoCo - bank: 5 - 6, 5, 5 + 6
            run.metrics["knn_acc"] -= 2 * (run.metrics["knn_acc"] - 70.0)
    claims = survey_claims(apart)
    assert (
        claims[4].verdict.startswith(f"{UNDECIDED}: about ") and "seeds per group would decide it" in claims[4].verdict
    )
    assert "the interval includes 0" in claims[4].evidence
    assert claims[5].verdict == FAILS  # SwAV 60 + 5 against SimCLR's 80 stays beyond that noise


def test_flipped_numbers_flip_the_verdicts(sweep_dir: Path) -> None:
    """A SimCLR batch sweep that loses accuracy, a staler queue, a worse MoCo, SwAV within 5 points, no learning."""
    runs = load_runs(sweep_dir)

    def edit(name: str, **changes) -> None:
        run = next(r for r in runs if r.name == name)
        run.metrics.update(changes)

    runs.append(
        Run(
            "7_simclr",
            sweep_dir,
            instance_run("simclr", "batch", 78.0, 510, None, global_batch_size=256, knn_acc_1shot=15.0),
            {"data.batch_size": "256"},
        )
    )
    edit("1_memory_bank", staleness=0.95, knn_acc=76.0)
    edit("4_moco", negatives_per_query=100)  # the queue's largest K is still 4096 at batch 128
    edit("2_moco", knn_acc=60.0)  # K=4096 now below K=256 (70.0); MoCo's best is 72.5 < the bank's 76.0
    edit("5_swav", knn_acc=76.0)  # 4 points below SimCLR's 80.0: within the 5-point margin
    runs = seeded(runs)
    verdicts = {claim.letter: claim.verdict for claim in survey_claims(runs)}
    assert verdicts == {
        "a": FAILS,
        "b": FAILS,
        "c": HOLDS,
        "d": FAILS,
        "e": FAILS,
        "f": HOLDS,
        "g": FAILS,
        "h": UNMEASURED,
    }
    claim_a = survey_claims(runs)[0]
    assert "128: 80.0 ± 0.5 (n=3)" in claim_a.evidence and "256: 78.0 ± 0.5 (n=3)" in claim_a.evidence


def test_groups_table_and_time_to_accuracy(tmp_path: Path) -> None:
    """Seeds of one configuration form one row; time to accuracy reads the history's steps and seconds."""
    root = tmp_path / "seeds"
    for seed, (knn, wall) in enumerate([(70.0, 10.0), (72.0, 20.0), (74.0, 30.0)]):
        hist = [
            {"epoch": e, "step": 10 * (e + 1), "knn_acc": knn - 10 * (2 - e), "wall_s": wall * (e + 1)}
            for e in range(3)
        ]
        write_run(
            root,
            f"{seed}_moco",
            instance_run("moco", "queue", knn, 4096, 0.9, history=hist),
            ["method=moco", f"seed={seed}"],
        )
    markdown = build_report(root).path.read_text()
    groups = markdown.split("## Groups", 1)[1].split("##", 1)[0]
    # mean 72, sd 2, t(0.975, 2) = 4.303: half-width 4.303 * 2 / sqrt(3) = 4.97
    assert "| moco | 3 | 0, 1, 2 | 72.0 ± 5.0 (n=3) |" in groups
    assert "sweep_seed" not in markdown  # a seed is a repeat, not a swept setting
    section = markdown.split("## Time to accuracy", 1)[1].split("## Survey", 1)[0]
    # target: the lowest best epoch, 70; every seed first reaches it at its last epoch (step 30 x batch 128), after
    # 30, 60, 90 s: mean 60, sd 30, half-width 4.303 x 30 / sqrt(3) = 74.5
    assert "Target: 70% kNN" in section
    assert "| moco | 3/3 | 3,840 | 60.0 ± 74.5 (n=3) |" in section, section
    assert_png(root / "time_to_accuracy.png")
    # at 61%: epochs 2, 1, 1 (steps 30, 20, 20), after 30, 40, 60 s (sd 15.28: half-width 37.9)
    assert main([str(root), "--target", "61"]) == 0
    section = (root / "comparison.md").read_text().split("## Time to accuracy", 1)[1]
    assert "Target: 61% kNN" in section and "| moco | 3/3 | 2,987 | 43.3 ± 37.9 (n=3) |" in section


def test_plots_show_the_seed_spread(tmp_path: Path, monkeypatch) -> None:
    """A group of seeds is drawn as its mean with every run visible: a min-max band per epoch, a dot per run in the
    sweep plots; a single run is a plain line."""
    import contrastive.report.plots as plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    root = tmp_path / "spread"
    for seed, knn in enumerate([70.0, 72.0, 77.0]):
        write_run(root, f"moco_{seed}", instance_run("moco", "queue", knn, 4096, 0.9), ["method=moco", f"seed={seed}"])
        for k, shift in ((64, -5.0), (1024, 0.0)):
            write_run(
                root,
                f"bank_{k}_{seed}",
                instance_run("memory_bank", "bank", knn + shift, k, 0.9),
                ["method=memory_bank", f"method.num_negatives={k}", f"seed={seed}"],
            )
    write_run(root, "simclr", instance_run("simclr", "batch", 60.0, 254, None), ["method=simclr"])
    build_report(root)

    (ax,) = figures["knn_per_epoch.png"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    moco = lines["moco (mean, n=3)"]
    # history(): epochs 1-3 at final - 20, - 10, final; the mean of 70, 72, 77 is 73
    assert list(moco.get_xdata()) == [1, 2, 3] and list(moco.get_ydata()) == pytest.approx([53.0, 63.0, 73.0])
    assert list(lines["simclr"].get_ydata()) == [40.0, 50.0, 60.0]
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) == 3  # moco and the two bank groups; the single SimCLR run has none
    extents = sorted((b.get_paths()[0].vertices[:, 1].min(), b.get_paths()[0].vertices[:, 1].max()) for b in bands)
    assert (50.0, 77.0) in [(round(lo, 6), round(hi, 6)) for lo, hi in extents]  # moco: 70 - 20 up to 77

    (ax,) = figures["sweep_method.num_negatives.png"].axes
    line = next(line for line in ax.get_lines() if line.get_label() == "memory_bank")
    assert list(line.get_xdata()) == [64, 1024] and list(line.get_ydata()) == pytest.approx([68.0, 73.0])
    dots = next(c for c in ax.collections if len(c.get_offsets()) == 6)
    assert sorted(map(tuple, dots.get_offsets().tolist())) == sorted(
        (k, knn + shift) for k, shift in ((64, -5.0), (1024, 0.0)) for knn in (70.0, 72.0, 77.0)
    )
    # a bar per point: the 95% interval of its mean, t(0.975, 2) x SD / sqrt(3) with SD sqrt(13) (70, 72, 77)
    (bars,) = [c for c in ax.collections if c not in (dots,) and hasattr(c, "get_segments")]
    half = 4.302652729911275 * 13**0.5 / 3**0.5
    ends = sorted((seg[0][0], min(seg[:, 1]), max(seg[:, 1])) for seg in bars.get_segments())
    assert ends == [
        (64, pytest.approx(68.0 - half), pytest.approx(68.0 + half)),
        (1024, pytest.approx(73.0 - half), pytest.approx(73.0 + half)),
    ]


def test_negatives_sweep_when_two_methods_vary_k(sweep_dir: Path) -> None:
    write_run(
        sweep_dir,
        "7_simclr",
        instance_run("simclr", "batch", 82.0, 510, None, global_batch_size=256),
        ["method=simclr", "data.batch_size=256"],
    )
    markdown = build_report(sweep_dir).path.read_text()
    assert_png(sweep_dir / "negatives_sweep.png")
    assert_png(sweep_dir / "sweep_data.batch_size.png")
    section = markdown.split("### Negatives per query", 1)[1].split("##", 1)[0]
    assert "| simclr (batch) | 510 | 1 | 82.0 |" in section
    assert "| memory_bank (bank) | 4096 | 1 | 70.0 |" in section
    assert claim_verdicts(markdown)["a"].startswith(TOO_FEW)  # 82.0 at 256 vs 80.0 at 128, one run each


def test_several_folders_compare_together(tmp_path: Path, capsys) -> None:
    """Runs from several folders (a folder of runs, single run folders) form one report: what the study does to
    compare its equal-step end-to-end points with the bank and MoCo points of the equal-epoch sweep."""
    steps, epochs = tmp_path / "steps", tmp_path / "epochs"
    for root, knn in ((steps, 81.0), (epochs, 78.0)):
        write_run(root, "e2e_512_seed0", instance_run("simclr", "batch", knn, 1022, None, global_steps=500))
    write_run(epochs, "bank_64_seed0", instance_run("memory_bank", "bank", 74.0, 64, 0.6, global_steps=500))
    write_run(epochs, "moco_64_seed0", instance_run("moco", "queue", 73.0, 64, 0.9, global_steps=500))
    out = tmp_path / "both"
    assert main([str(steps), str(epochs / "bank_64_seed0"), str(epochs / "moco_64_seed0"), "--out", str(out)]) == 0
    markdown = (out / "comparison.md").read_text()
    assert f"# Comparison of 3 runs in `{steps}`, 2 runs of `{epochs}`\n" in markdown
    rows = table_rows(markdown)
    assert {name: rows[name]["kNN"] for name in rows} == {
        "e2e_512_seed0": "81.0",
        "bank_64_seed0": "74.0",
        "moco_64_seed0": "73.0",
    }
    assert "Budget: equal steps and epochs (500 optimiser steps, 3 epochs per run)" in markdown
    # the same folder name under two roots: each run is named by its root
    report = build_report([steps, epochs], out=tmp_path / "all")
    assert sorted(run.name for run in report.runs) == [
        "epochs/bank_64_seed0",
        "epochs/e2e_512_seed0",
        "epochs/moco_64_seed0",
        "steps/e2e_512_seed0",
    ]
    with pytest.raises(NoRunsError, match="nowhere"):
        build_report([steps, tmp_path / "nowhere"])


def test_out_dir_and_no_runs_error(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main([str(sweep_dir), "--out", str(out)]) == 0
    assert (out / "comparison.md").is_file() and (out / "knn_per_epoch.png").is_file()
    assert "| `3_moco` | moco |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    (empty / "run" / ".hydra").mkdir(parents=True)
    with pytest.raises(NoRunsError, match="empty"):
        build_report(empty)
    assert main([str(empty)]) == 2
    assert "error: no run found below" in capsys.readouterr().err


def report_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contrastive.report", str(folder)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_in_a_subprocess(sweep_dir: Path, tmp_path: Path) -> None:
    done = report_cli(sweep_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| run | method |") and "`5_swav`" in done.stdout
    assert (sweep_dir / "comparison.md").is_file()
    missing = tmp_path / "nothing_here"
    failed = report_cli(missing)
    assert failed.returncode != 0
    assert str(missing) in failed.stderr and "Traceback" not in failed.stderr


def test_stage_claim_per_group(tmp_path: Path) -> None:
    """Later stages better for MoCo (beyond the seeds' noise), worse for SimCLR: the claim does not hold."""
    root = tmp_path / "stages"
    for seed, shift in enumerate((-0.3, 0.0, 0.3)):
        for method, first, last in (("moco", 40.0, 70.0), ("simclr", 60.0, 50.0)):
            stages = {
                "stages": ["block1", "block2"],
                "stage_block1_knn_acc": first + shift,
                "stage_block2_knn_acc": last - shift,
            }
            write_run(
                root,
                f"{method}_{seed}",
                instance_run(method, "queue", 70.0, 4096, 0.9, **stages),
                [f"method={method}", f"seed={seed}"],
            )
    claim = survey_claims(load_runs(root))[7]
    assert claim.letter == "h" and claim.verdict == FAILS
    assert "moco: block1 40.0, block2 70.0" in claim.evidence and "simclr: block1 60.0, block2 50.0" in claim.evidence
    only_moco = [run for run in load_runs(root) if run.method == "moco"]
    assert survey_claims(only_moco)[7].verdict == HOLDS


def test_budget_line_says_which_protocol(tmp_path: Path) -> None:
    from contrastive.report import budget_line

    def runs(*pairs):
        return [Run(f"r{i}", tmp_path, {"global_steps": s, "epochs": e}, {}) for i, (s, e) in enumerate(pairs)]

    assert budget_line(runs((100, 2), (100, 8))) == "Budget: equal optimiser steps (100 per run; epochs 2 to 8)."
    assert budget_line(runs((100, 2), (400, 2))) == "Budget: equal epochs (2 per run; optimiser steps 100 to 400)."
    assert budget_line(runs((100, 2), (100, 2))).startswith("Budget: equal steps and epochs")
    assert budget_line(runs((100, 2), (400, 8))).startswith("Budget: unequal")


def test_build_report_returns_what_it_wrote(sweep_dir: Path) -> None:
    report = build_report(sweep_dir)
    text = report.path.read_text()
    assert report.runs_table in text and report.groups_table in text
    assert [c.letter for c in report.claims] == list("abcdefgh")
    assert {p.name for p in report.plots} >= {"knn_per_epoch.png", "time_to_accuracy.png"}
    assert all(p.is_file() for p in report.plots)
    assert set(report.groups) == {
        "memory_bank",
        "moco queue_size=256",
        "moco queue_size=1024",
        "moco queue_size=4096",
        "simclr",
        "swav",
        "byol",
    }


def test_margins_from_the_cli_decide_equivalence(tmp_path: Path, capsys) -> None:
    """MoCo 0.4 to 0.6 points above the bank at every seed: equivalent within the default margin of 1 point, so MoCo
    is "at least as accurate"; with `--margin knn=0.2` no longer equivalent (and the margin printed); a margin the
    report does not know, or not a positive number, is refused (exit 2)."""
    root = tmp_path / "close"
    for seed, (moco, bank) in enumerate([(70.5, 70.0), (72.6, 72.0), (68.4, 68.0)]):
        write_run(root, f"moco_{seed}", instance_run("moco", "queue", moco, 4096, 0.9), ["method=moco", f"seed={seed}"])
        write_run(
            root,
            f"bank_{seed}",
            instance_run("memory_bank", "bank", bank, 4096, 0.6),
            ["method=memory_bank", f"seed={seed}"],
        )
    markdown = build_report(root).path.read_text()
    assert "Equivalence margins (`--margin NAME=VALUE`): knn ±1" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("**e)"))
    assert "Verdict: **holds**" in line and "paired t over 3 seeds" in line
    assert "MoCo and memory bank equivalent within ±1 (MoCo - memory bank +0.50 [+0.25, +0.75])" in line
    # groups table: the bank's kNN minus the best group's (MoCo), with its paired interval
    groups = markdown.split("## Groups", 1)[1].split("## Plots", 1)[0]
    assert "| kNN | kNN vs the best |" in groups and "| best |" in groups and "(paired) |" in groups
    assert main([str(root), "--margin", "knn=0.2"]) == 0
    markdown = (root / "comparison.md").read_text()
    assert "knn ±0.2" in markdown and "equivalence ±0.2" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("**e)"))
    assert "Verdict: **undecided: about 4 seeds per group would decide it**" in line
    assert "not shown equivalent within ±0.2" in line
    for bad in ("accuracy=1", "knn=-1", "knn=abc"):
        with pytest.raises(SystemExit) as stop:
            main([str(root), "--margin", bad])
        assert stop.value.code == 2
    assert "--margin" in capsys.readouterr().err


# -- copies are not seeds; claim g on seeds; the recorded family (issue 31, items 3 and 4) ----------------------
def two_methods(root: Path, seeds: tuple[int, ...] = (0,)) -> None:
    for seed in seeds:
        for method, negatives, knn in (("moco", "queue", 75.0), ("memory_bank", "bank", 70.0)):
            write_run(
                root,
                f"{method}_seed{seed}",
                instance_run(method, negatives, knn + seed / 10, 4096, 0.9),
                [f"method={method}", f"seed={seed}"],
            )


def test_copies_of_a_run_count_once(tmp_path: Path) -> None:
    """One finished run per method, a backup of each and a results/ folder holding them too: three folders, one
    replicate. Counted as seeds they gave 'n=3/3, no spread' and a firm verdict."""
    root = tmp_path / "runs"
    two_methods(root)
    for name in ("moco_seed0", "memory_bank_seed0"):
        shutil.copytree(root / name, root / "backup" / name)
        shutil.copytree(root / name, root / "results" / name)
    report = build_report(root)
    markdown = report.path.read_text()
    assert sorted(run.name for run in report.runs) == ["memory_bank_seed0", "moco_seed0"]
    assert claim_verdicts(markdown)["e"].startswith("not enough runs")
    assert "`moco`: 3 copies of seed 0 counted once each" in markdown
    assert "`memory_bank`: 3 copies of seed 0 counted once each" in markdown
    assert "6 run folders hold 2 distinct runs" in markdown
    groups = markdown.split("## Groups", 1)[1].split("## Plots", 1)[0]
    assert "| moco | 1 | 0 |" in groups and "| memory_bank | 1 | 0 |" in groups
    # the claims read from Python count them once too
    assert survey_claims(load_runs(root))[4].verdict.startswith("not enough runs")


def test_a_rerun_with_the_same_seed_is_the_same_replicate(tmp_path: Path) -> None:
    """Seeds 0 and 1 of each method, and seed 0 of MoCo trained again (a slightly different figure): 2 seeds, not 3."""
    root = tmp_path / "runs"
    two_methods(root, seeds=(0, 1))
    write_run(root, "again/moco_seed0", instance_run("moco", "queue", 75.3, 4096, 0.9), ["method=moco", "seed=0"])
    markdown = build_report(root).path.read_text()
    assert "`moco`: 2 copies of seed 0 counted once each (same seed and configuration: one replicate; kept " in markdown
    assert "| moco | 2 | 0, 1 |" in markdown
    assert "paired t over 2 seeds" in markdown  # MoCo and the bank ran the same two seeds


def test_many_copies_are_summarised(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    two_methods(root, seeds=tuple(range(8)))
    for copy in range(3):
        for seed in range(8):
            shutil.copytree(root / f"moco_seed{seed}", root / f"copy{copy}" / f"moco_seed{seed}")
    report = build_report(root)
    assert len(report.runs) == 16
    assert "`moco`: 32 runs that are copies of 8 replicates counted once each" in report.path.read_text()


def test_runs_without_a_seed_count_once_only_when_identical(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "a", instance_run("moco", "queue", 75.0, 4096, 0.9))
    write_run(root, "copy_of_a", instance_run("moco", "queue", 75.0, 4096, 0.9))
    write_run(root, "b", instance_run("moco", "queue", 73.0, 4096, 0.9))
    report = build_report(root)
    assert sorted(run.name for run in report.runs) == ["a", "b"]
    assert "2 identical copies of `a`" in report.path.read_text()


def learned_runs(tmp_path: Path, pairs: list[tuple[float, float]]) -> list[Run]:
    return [
        Run(
            f"moco_s{seed}",
            tmp_path,
            {"method": "moco", "knn_acc_1shot": final, "init_knn_acc_1shot": init},
            {"seed": str(seed)},
        )
        for seed, (final, init) in enumerate(pairs)
    ]


def test_claim_g_needs_seeds_and_a_test(tmp_path: Path) -> None:
    """One run on random labels, 27.7 against 26.1 at initialisation, printed 'g) holds'. One run is not enough; three
    seeds that gain 6 points each hold; gains of 1.6, -0.5, 2.0 leave it undecided; losses do not hold."""
    claim = survey_claims(learned_runs(tmp_path, [(27.7, 26.1)]))[6]
    assert claim.letter == "g" and claim.verdict.startswith("not enough runs")
    assert "final - init +1.60: not enough runs (1 seed" in claim.evidence
    assert survey_claims(learned_runs(tmp_path, [(21.2, 15.1), (20.6, 14.3), (20.5, 14.3)]))[6].verdict == HOLDS
    noisy = survey_claims(learned_runs(tmp_path, [(27.7, 26.1), (25.8, 26.3), (28.3, 26.3)]))[6]
    assert noisy.verdict.startswith("undecided: about ") and "paired t over 3 seeds" in noisy.evidence
    worse = survey_claims(learned_runs(tmp_path, [(10.2, 15.1), (10.6, 14.3), (10.5, 14.3)]))[6]
    assert worse.verdict == "does not hold" and "init better than final by" in worse.evidence


def test_the_recorded_family_comes_first(tmp_path: Path) -> None:
    """A method the report's maps do not know counts in the family its run recorded; older results without the key
    keep the family from the negatives' source or the method's name."""
    new = Run("x", tmp_path, {"method": "moco_v3", "family": "momentum queue"}, {})
    assert new.family == "momentum queue"
    assert Run("y", tmp_path, {"method": "memory_bank"}, {}).family == "memory bank"
    assert Run("z", tmp_path, {"method": "custom", "negatives": "queue"}, {}).family == "momentum queue"
    assert Run("w", tmp_path, {"method": "moco", "family": "clustering"}, {}).family == "clustering"

    def run(method: str, seed: int, knn: float, family: str | None) -> Run:
        metrics = {"method": method, "knn_acc": knn, "data": "d", "backbone": "b", "epochs": 1}
        if family:
            metrics["family"] = family
        return Run(f"{method}{seed}", tmp_path, metrics, {"seed": str(seed)})

    runs = [run("queue_v3", s, 75.0 + s, "momentum queue") for s in range(3)]
    runs += [run("memory_bank", s, 70.0 + s, None) for s in range(3)]
    claim = survey_claims(runs)[4]
    assert claim.verdict != UNMEASURED and "MoCo better than memory bank by 5.00" in claim.evidence


def versus_runs(root: Path, knn: dict[str, tuple[float, ...]], split: str | None, pixels: float = 30.0) -> Path:
    for method, values in knn.items():
        for seed, value in enumerate(values):
            metrics = {"method": method, "knn_acc": value, "knn_acc_1shot": value / 2, "pixels_knn_acc": pixels}
            if split is not None:
                sizes = {"train": 8000, "validation": 1000, split: 1000}
                metrics |= {"eval_split": split, "split_sizes": sizes, "monitor_split": "validation"}
                metrics["history"] = [{"epoch": 0, "knn_acc": 0.0}, {"epoch": 1, "knn_acc": value + 4}]
            write_run(root, f"{method}_seed{seed}", metrics, overrides=[f"method={method}", f"seed={seed}"])
    return root


def test_before_and_after_per_method(tmp_path: Path, capsys) -> None:
    from scipy import stats

    before = versus_runs(tmp_path / "old", {"a": (50.0, 51.0, 52.0), "b": (45.0, 46.0, 47.0)}, None)
    after_a, after_b = (40.0, 41.5, 42.0), (46.0, 46.5, 46.0)
    after = versus_runs(tmp_path / "new", {"a": after_a, "b": after_b}, "test", pixels=33.0)
    assert main([str(after), "--before", str(before), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "comparison.md").read_text()
    section = text[text.index("## Before and after") : text.index("## Plots")]
    rows = table_rows(section, "## Before and after")
    assert rows["a"]["kNN before"] == "51.0 ± 2.5" and rows["b"]["runs before / after"] == "3 / 3"
    # a lost ten points: Welch's interval and p, by scipy's own test
    welch = stats.ttest_ind(after_a, (50.0, 51.0, 52.0), equal_var=False)
    assert f"p={welch.pvalue:.2g}" in rows["a"]["kNN change"] and rows["a"]["kNN change"].endswith("**lost**")
    assert rows["a"]["kNN change"].startswith(f"{sum(after_a) / 3 - 51.0:+.1f} [")
    assert "within the noise" in rows["b"]["kNN change"]
    assert "held-out (one evaluation set, recorded before the splits were named) split" in section
    assert "on the test split (1,000 images)" in section
    assert "before: a > b; after: b > a (changed)" in section
    assert "a +8.2, b +13.2 (a under 10 points above)" in section
    # on the images the before side read (validation + test): the last epoch's validation kNN and the test kNN
    same = table_rows(section, "On the same images")
    half = stats.t.ppf(0.975, 2) * stats.tstd(after_a) / 3**0.5
    assert same["a"]["kNN after, validation + test"] == f"{sum(after_a) / 3 + 2:.1f} ± {half:.1f}"
    welch_same = stats.ttest_ind([v + 2 for v in after_a], (50.0, 51.0, 52.0), equal_var=False)
    assert f"p={welch_same.pvalue:.2g}" in same["a"]["change on the same images"]
    # a folder without runs is refused by name
    assert main([str(after), "--before", str(tmp_path / "nothing")]) == 2
    assert "--before" in capsys.readouterr().err


def test_splits_line_names_each_split_with_its_runs():
    from contrastive.report.runs import UNNAMED_SPLIT, Run
    from contrastive.report.tables import splits_line

    sizes = {"train": 80, "validation": 10, "test": 10}
    runs = [Run(f"r{i}", Path("."), {"eval_split": "test", "split_sizes": sizes}, {}) for i in range(3)]
    line = splits_line(runs)
    assert "on the **test** split (3 runs);" in line and "different splits" not in line
    assert "per-epoch kNN and online probe on validation;" in line
    assert "Images: train 80, validation 10, test 10." in line
    mixed = splits_line([*runs, Run("old", Path("."), {}, {})])
    assert UNNAMED_SPLIT.startswith("held-out")
    assert f"the **test** split (3 runs); the **{UNNAMED_SPLIT}** split (1 run)" in mixed
    assert "compare their figures with care" in mixed
    assert "online probe on the same held-out set / validation;" in mixed
