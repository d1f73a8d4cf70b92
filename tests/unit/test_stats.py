"""The report's statistics against direct computations: Student's interval, Welch's test, the verdict rule."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from contrastive.report.stats import FAILS, HOLDS, compare, summarize


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
    t = (ma - mb) / math.sqrt(va / 4 + vb / 3)
    df = (va / 4 + vb / 3) ** 2 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2)
    result = compare(a, b)
    assert result.diff == pytest.approx(ma - mb)
    assert result.p_value == pytest.approx(2 * sps.t.sf(abs(t), df))
    # a margin shifts the first group: mean(a) + 2 against b
    assert compare(a, b, margin=2.0).diff == pytest.approx(ma - mb + 2)


def test_verdicts():
    assert compare([10, 10.1, 9.9], [5, 5.1, 4.9]).verdict == HOLDS
    assert compare([5, 5.1, 4.9], [10, 10.1, 9.9]).verdict == FAILS
    assert compare([5, 8, 2], [6, 3, 9]).verdict == "within noise (n=3/3)"
    assert compare([5.0], [1.0, 1.1]).verdict == "within noise (n=1/2)"  # no interval from one run
    assert compare([2.0, 2.0], [1.0, 1.0]).verdict == HOLDS  # no spread: the difference is exact
    assert compare([1.0, 1.0], [1.0, 1.0]).verdict == "within noise (n=2/2)"
