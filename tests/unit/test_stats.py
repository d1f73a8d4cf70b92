"""The report's statistics against direct computations and fabricated groups with known answers: Student's interval,
Welch's and the paired t-test, the three outcomes (better, equivalent, undecided with its seed count), Holm's
correction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats as sps

from contrastive.report.runs import Run, compare_runs
from contrastive.report.stats import (
    DEFAULT_MARGINS,
    TOO_FEW,
    UNDECIDED,
    adjust,
    compare,
    holm,
    margins_line,
    margins_with,
    summarize,
)


def test_interval_is_students_t():
    s = summarize([1.0, 2.0, 3.0, 6.0])
    sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)
    assert (s.n, s.mean) == (4, 3.0)
    assert s.half_width == pytest.approx(3.182446305284263 * sd / 2)  # t(0.975, 3)
    assert summarize([5.0]).half_width is None and str(summarize([5.0])) == "5.0 (n=1)"


def test_welch_test_matches_the_formula():
    a, b = [10.0, 11.0, 12.5, 11.5], [9.0, 9.5, 10.5]
    ma, mb = sum(a) / 4, sum(b) / 3
    va, vb = sum((x - ma) ** 2 for x in a) / 3, sum((x - mb) ** 2 for x in b) / 2
    se = math.sqrt(va / 4 + vb / 3)
    df = (va / 4 + vb / 3) ** 2 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2)
    result = compare(a, b, margin=1.0)
    assert not result.paired and result.test == "Welch's t, n=4/3"
    assert result.diff == pytest.approx(ma - mb)
    assert result.p_value == pytest.approx(2 * sps.t.sf(abs(ma - mb) / se, df))
    half = sps.t.ppf(0.975, df) * se
    assert (result.low, result.high) == (pytest.approx(ma - mb - half), pytest.approx(ma - mb + half))
    # two one-sided tests within ±1: the larger of the two one-sided p-values
    tost = max(sps.t.sf((ma - mb + 1) / se, df), sps.t.cdf((ma - mb - 1) / se, df))
    assert result.p_equiv == pytest.approx(tost)
    # an offset tests a - b against -offset ("a within 2 of b, or above"); the difference itself is unchanged
    shifted = compare(a, b, offset=2.0)
    assert shifted.diff == pytest.approx(ma - mb)
    assert shifted.p_value == pytest.approx(2 * sps.t.sf((ma - mb + 2) / se, df))
    assert shifted.p_equiv is None


def test_paired_test_matches_the_formula():
    a, b = [70.0, 75.0, 80.0, 72.0], [69.0, 74.5, 78.0, 72.5]
    d = [x - y for x, y in zip(a, b)]
    mean, sd = sum(d) / 4, math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    result = compare(a, b, paired=True)
    assert result.paired and result.test == "paired t over 4 seeds"
    assert result.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert result.diff == pytest.approx(mean) and result.spread == pytest.approx(sd)
    assert result.high - result.low == pytest.approx(2 * sps.t.ppf(0.975, 3) * sd / 2)


def test_outcome_better():
    c = compare([10, 10.1, 9.9], [5, 5.1, 4.9], margin=1.0, names=("A", "B"))
    assert c.outcome == "better" and c.direction == 1 and not c.equivalent
    assert c.reading().startswith("A better than B by 5.00 [")
    worse = compare([5, 5.1, 4.9], [10, 10.1, 9.9], margin=1.0, names=("A", "B"))
    assert worse.outcome == "worse" and worse.reading().startswith("B better than A by 5.00 [")


def test_outcome_equivalent():
    a = [10.0, 10.1, 9.9, 10.05, 9.95]
    b = [10.02, 9.98, 10.0, 10.03, 9.97]
    c = compare(a, b, margin=1.0, names=("A", "B"))
    assert c.outcome == "equivalent" and c.equivalent and c.direction == 0
    assert c.reading() == "A and B equivalent within ±1 (A - B +0.00 [-0.10, +0.10])"
    # the same groups with a margin narrower than their interval: no longer shown equivalent
    assert compare(a, b, margin=0.01).outcome == UNDECIDED


def test_outcome_undecided_with_the_seeds_from_a_known_sd():
    """Per-seed differences -1, 1, 3: mean 1, SD exactly 2. The interval at n seeds is t(0.975, n-1) x 2 / sqrt(n)
    either side: 1.028 at 17 seeds (t 2.1199), 0.995 at 18 (t 2.1098), so 18 seeds would exclude 0; with a margin of
    1 point no count can show equivalence (the mean difference is the margin itself)."""
    b = [50.0, 52.0, 54.0]
    a = [x + d for x, d in zip(b, (-1.0, 1.0, 3.0))]
    c = compare(a, b, margin=1.0, paired=True, names=("A", "B"))
    assert c.spread == pytest.approx(2.0) and c.diff == pytest.approx(1.0)
    assert c.outcome == UNDECIDED
    assert c.seeds_to_decide() == 18
    assert c.reading() == (
        "undecided: A - B +1.00 [-3.97, +5.97]: the interval includes 0 and is not shown equivalent within ±1; about "
        "18 seeds per group would decide it at the observed spread"
    )
    # Welch on two groups with SD 2 each, means 1 apart: t(0.975, 2n-2) x 2 x sqrt(2/n) < 1 first at n=32
    # (t(0.975, 62) = 1.9990: 0.9995; at 31, t(0.975, 60) = 2.0003: 1.016)
    welch = compare([9.0, 11.0, 13.0], [8.0, 10.0, 12.0])
    assert welch.spread == pytest.approx(2.0) and welch.outcome == UNDECIDED and welch.seeds_to_decide() == 32
    # Holm's factor lowers the level the count assumes: 5 tests -> each at 0.01 at first, more seeds
    c.factor = 5
    assert c.seeds_to_decide() > 18


def test_one_run_is_not_enough():
    c = compare([5.0], [1.0, 1.1])
    assert c.outcome == TOO_FEW and c.p_value is None and c.low is None
    assert "not enough runs (n=1/2" in c.reading()
    assert compare([5.0], [4.0], paired=True).outcome == TOO_FEW


def test_no_spread_is_exact():
    assert compare([2.0, 2.0], [1.0, 1.0]).outcome == "better"
    assert compare([1.0, 1.0], [1.0, 1.0], margin=1.0).outcome == "equivalent"
    assert compare([1.0, 1.0], [1.0, 1.0]).outcome == UNDECIDED  # no margin: nothing to decide


def seeded_runs(values: list[float], name: str) -> list[Run]:
    return [Run(f"{name}{i}", Path(name), {"knn_acc": v}, {"seed": str(i)}) for i, v in enumerate(values)]


def test_a_constant_per_seed_shift_is_found_by_the_paired_test_only():
    """Seeds spread the groups by 10 points, but at every seed A is 1 point above B (within 0.1): Welch's test sees
    two overlapping groups, the paired test the shift."""
    a_values, b_values = [70.0, 75.0, 80.0], [69.0, 74.1, 78.9]
    welch = compare(a_values, b_values, margin=1.0)
    assert welch.p_value > 0.5 and welch.outcome == UNDECIDED
    paired = compare_runs(seeded_runs(a_values, "a"), seeded_runs(b_values, "b"), "knn_acc", 1.0)
    assert paired.paired and paired.test == "paired t over 3 seeds"
    assert paired.p_value < 0.01 and paired.outcome == "better"
    assert paired.diff == pytest.approx(1.0) and 0.7 < paired.low < paired.high < 1.3
    # seeds that differ between the groups cannot be paired: Welch's test
    other = [Run(f"c{i}", Path("c"), {"knn_acc": v}, {"seed": str(i + 10)}) for i, v in enumerate(b_values)]
    assert not compare_runs(seeded_runs(a_values, "a"), other, "knn_acc").paired


def test_holm_against_a_hand_computed_example():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06;
    0.04 x 1 = 0.04, raised to 0.06 to keep the order."""
    adjusted, factors = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert factors == [3, 1, 2, 4]
    assert holm([0.5, 0.9])[0] == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == ([], [])


def test_holm_counts_a_comparison_once():
    """Two comparisons with a difference and an equivalence test each, one with a difference test only. A
    comparison's two nulls exclude each other, so the factor is the number of comparisons with a test left:
    0.001 x 3 = 0.003; 0.01 x 3 = 0.03; 0.02 x 3 = 0.06 (c1 and c2 keep their equivalence tests); 0.8 x 2 -> 1;
    0.9 x 1 -> 1. Plain Holm over the five tests: 0.005, 0.04, 0.06, 1, 1."""
    p = [0.001, 0.9, 0.01, 0.8, 0.02]
    adjusted, factors = holm(p, ["c1", "c1", "c2", "c2", "c3"])
    assert adjusted == pytest.approx([0.003, 1.0, 0.03, 1.0, 0.06])
    assert factors == [3, 1, 3, 2, 3]
    assert holm(p)[0] == pytest.approx([0.005, 1.0, 0.04, 1.0, 0.06])


def test_adjust_decides_on_the_adjusted_p():
    """A comparison beyond the noise alone (p 0.026) is not after Holm over it and four noisy ones: the smallest of
    five p-values is multiplied by 5."""
    borderline = compare([10.0, 11.0, 12.0, 11.0], [9.0, 9.5, 10.0, 9.5])
    assert 0.01 < borderline.p_value < 0.05 and borderline.outcome == "better"
    noisy = [compare([5.0, 8.0, 2.0], [6.0, 3.0, 9.0]) for _ in range(4)]
    assert adjust([borderline, *noisy]) == 5
    assert borderline.factor == 5 and borderline.p_adjusted == pytest.approx(5 * borderline.p_value)
    assert borderline.outcome == UNDECIDED and "only before Holm's correction" in borderline.reading()
    assert f"p={borderline.p_value:.2g}, Holm {borderline.p_adjusted:.2g}" in str(borderline)
    # with four clear comparisons instead, its p is the largest: factor 1, still decided
    clear = [compare([10.0, 10.1, 9.9], [5.0, 5.1, 4.9]) for _ in range(4)]
    adjust([borderline, *clear])
    assert borderline.factor == 1 and borderline.outcome == "better" and all(c.outcome == "better" for c in clear)


def test_margins_are_settable_and_checked():
    assert margins_with(None) == DEFAULT_MARGINS and DEFAULT_MARGINS["knn"] == 1.0
    assert margins_with({"knn": 0.5})["knn"] == 0.5
    assert "knn ±0.5" in margins_line(margins_with({"knn": 0.5}))
    with pytest.raises(ValueError, match="unknown margin"):
        margins_with({"accuracy": 1.0})
    with pytest.raises(ValueError, match="positive"):
        margins_with({"knn": -1.0})
    with pytest.raises(ValueError, match="positive"):
        margins_with({"knn": float("nan")})
