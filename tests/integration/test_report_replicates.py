"""The report never mistakes copies of a run for seeds, and decides claim g on seeds with a test (issue 31, items 3
and 4); the family a run records is the one the claims use."""

from __future__ import annotations

import shutil
from pathlib import Path

from test_report import claim_verdicts, instance_run, write_run

from contrastive.report import HOLDS, UNMEASURED, Run, build_report, load_runs, survey_claims


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
