"""Statistics behind the report's verdicts: a group of seeds is a sample, compared by a stated test, never by two
single numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05  # two-sided significance level of every comparison
HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured here"


def within_noise(n: Sequence[int]) -> str:
    return f"within noise (n={'/'.join(str(k) for k in n)})"


@dataclass(frozen=True)
class Summary:
    """Mean of a group with the half-width of its 95% interval (Student's t, n-1 degrees of freedom)."""

    n: int
    mean: float
    half_width: float | None  # None for a single value: no interval without repeats

    def __str__(self) -> str:
        if self.half_width is None:
            return f"{self.mean:.1f} (n=1)"
        return f"{self.mean:.1f} ± {self.half_width:.1f} (n={self.n})"


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return Summary(1, mean, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(n, mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Comparison:
    """``a - b + margin`` tested against 0 with Welch's t-test (unequal variances), two-sided at ``ALPHA``."""

    diff: float
    p_value: float | None  # None: a group has fewer than two values, or both have no spread
    n: tuple[int, int]

    @property
    def verdict(self) -> str:
        """``holds`` when a - b + margin > 0 beyond the noise, ``does not hold`` when < 0 beyond it."""
        if self.p_value is None or self.p_value >= ALPHA:
            return within_noise(self.n)
        return HOLDS if self.diff > 0 else FAILS

    def __str__(self) -> str:
        p = "no test (needs 2+ runs per group)" if self.p_value is None else f"Welch p={self.p_value:.3g}"
        return f"difference {self.diff:+.2f}, {p}, n={self.n[0]}/{self.n[1]}"


def compare(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> Comparison:
    """Is mean(a) + margin above mean(b)? Welch's t-test on the two groups of runs (seeds)."""
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    diff = sum(a) / len(a) - sum(b) / len(b) + margin
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, None, (len(a), len(b)))
    shifted = [v + margin for v in a]
    if max(shifted) == min(shifted) and max(b) == min(b):  # no spread at all: the difference is exact
        return Comparison(diff, 0.0 if diff != 0 else 1.0, (len(a), len(b)))
    p = float(stats.ttest_ind(shifted, b, equal_var=False).pvalue)
    return Comparison(diff, p if math.isfinite(p) else None, (len(a), len(b)))
