"""Statistics behind the report's verdicts: a group of seeds is a sample, compared by a stated test (paired where the
runs share seeds, Welch's otherwise), read as one of three outcomes (a difference, an equivalence within a margin, or
undecided with the seeds it would take), with Holm's correction over every test a report makes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05  # family-wise level of the report's tests (two-sided; each one-sided half of an equivalence test)
HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured here"
UNDECIDED, TOO_FEW = "undecided", "not enough runs"
MAX_SEEDS = 1000  # beyond this a seed count is reported as "more than"

# Equivalence margins per metric, in the metric's units: "knn" covers every kNN accuracy (percentage points).
DEFAULT_MARGINS: dict[str, float] = {"knn": 1.0, "drift": 0.001, "staleness": 0.01}
MARGIN_UNITS = {"knn": "kNN points (every kNN accuracy: all labels, 1-shot, per stage)", "drift": "", "staleness": ""}


def margins_with(overrides: Mapping[str, float] | None) -> dict[str, float]:
    """The default margins with ``overrides`` applied; unknown names and non-positive values are refused."""
    out = dict(DEFAULT_MARGINS)
    for name, value in (overrides or {}).items():
        if name not in out:
            raise ValueError(f"unknown margin {name!r}: one of {', '.join(out)}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"margin {name} must be a positive number, got {value!r}")
        out[name] = float(value)
    return out


def margins_line(margins: Mapping[str, float]) -> str:
    parts = [
        f"{name} ±{value:g}" + (f" {MARGIN_UNITS[name]}" if MARGIN_UNITS.get(name) else "")
        for name, value in margins.items()
    ]
    return "Equivalence margins (`--margin NAME=VALUE`): " + ", ".join(parts) + "."


def _t(q: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


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


def _sd(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return Summary(1, mean, None)
    return Summary(n, mean, _t(0.5 + confidence / 2, n - 1) * _sd(values) / math.sqrt(n))


@dataclass
class Comparison:
    """``a - b`` from two groups of runs: its mean, 95% interval and tests.

    ``p_value`` tests ``a - b = -offset`` (two-sided; ``offset`` > 0 asks "is a within ``offset`` of b or above?"),
    ``p_equiv`` is the two one-sided tests of ``|a - b| < margin`` (None without a margin). Holm's correction sets
    the ``*_adjusted`` values and the factors it applied (``*_factor``), which the seed count uses."""

    diff: float
    low: float | None
    high: float | None
    n: tuple[int, int]
    paired: bool
    p_value: float | None  # None: fewer than two runs (or pairs) to test
    p_equiv: float | None
    spread: float | None  # SD of the per-seed differences (paired) or of a run within a group (Welch, pooled)
    margin: float | None = None
    offset: float = 0.0
    names: tuple[str, str] = ("a", "b")
    digits: int = 2
    p_adjusted: float | None = None
    p_equiv_adjusted: float | None = None
    factor: int = 1
    equiv_factor: int = 1

    @property
    def test(self) -> str:
        if self.paired:
            return f"paired t over {self.n[0]} seeds"
        return f"Welch's t, n={self.n[0]}/{self.n[1]}"

    @property
    def p(self) -> float | None:
        return self.p_adjusted if self.p_adjusted is not None else self.p_value

    @property
    def pe(self) -> float | None:
        return self.p_equiv_adjusted if self.p_equiv_adjusted is not None else self.p_equiv

    @property
    def direction(self) -> int:
        """+1: a - b above -offset beyond the noise; -1: below it; 0: not decided."""
        if self.p is None or self.p >= ALPHA:
            return 0
        return 1 if self.diff + self.offset > 0 else -1

    @property
    def equivalent(self) -> bool:
        return self.pe is not None and self.pe < ALPHA

    @property
    def outcome(self) -> str:
        if self.p_value is None:
            return TOO_FEW
        if self.direction:
            return "better" if self.direction > 0 else "worse"
        return "equivalent" if self.equivalent else UNDECIDED

    def seeds_to_decide(self) -> int | None:
        """Seeds per group at which, with this mean difference and spread, the interval would exclude ``-offset`` (at
        the level Holm now gives the test) or fit inside ``±margin``; None when no count up to MAX_SEEDS would."""
        if self.spread is None or self.spread == 0:
            return None
        gap = abs(self.diff + self.offset)
        room = self.margin - abs(self.diff) if self.margin is not None else 0.0
        level = ALPHA / max(self.factor, 1)
        equiv_level = ALPHA / max(self.equiv_factor, 1)
        for n in range(max(self.n) + 1, MAX_SEEDS + 1):
            df = n - 1 if self.paired else 2 * n - 2
            se = self.spread / math.sqrt(n) if self.paired else self.spread * math.sqrt(2 / n)
            if gap > 0 and _t(1 - level / 2, df) * se < gap:
                return n
            if room > 0 and _t(1 - equiv_level, df) * se < room:
                return n
        return None

    def _fmt(self, value: float, sign: bool = True) -> str:
        return f"{value:+.{self.digits}f}" if sign else f"{value:.{self.digits}f}"

    def interval(self) -> str:
        if self.low is None or self.high is None:
            return f"{self._fmt(self.diff)} (no interval from one run)"
        return f"{self._fmt(self.diff)} [{self._fmt(self.low)}, {self._fmt(self.high)}]"

    def tests_text(self) -> str:
        if self.p_value is None:
            return "no test"
        parts = [f"{self.test}: p={self.p_value:.2g}" + _adjusted(self.p_adjusted)]
        if self.p_equiv is not None:
            parts.append(f"equivalence ±{self.margin:g}: p={self.p_equiv:.2g}" + _adjusted(self.p_equiv_adjusted))
        return "; ".join(parts)

    def reading(self) -> str:
        """The outcome in words: better by x [lo, hi], equivalent within the margin, or undecided with the seeds."""
        a, b = self.names
        outcome = self.outcome
        if outcome == TOO_FEW:
            many = f"{self.n[0]} seed" if self.paired else f"n={self.n[0]}/{self.n[1]}"
            return f"{a} - {b} {self._fmt(self.diff)}: {TOO_FEW} ({many}; no interval without repeats)"
        lo, hi = self.low, self.high
        if self.offset:
            where = f"{a} - {b} {self.interval()}"
            if outcome == "better":
                return f"{where}: above -{self.offset:g}"
            if outcome == "worse":
                return f"{where}: below -{self.offset:g}"
        elif outcome in ("better", "worse"):
            sign = 1 if outcome == "better" else -1
            winner, loser = (a, b) if sign > 0 else (b, a)
            ends = sorted((sign * lo, sign * hi))
            text = f"{winner} better than {loser} by {self._fmt(sign * self.diff, False)} "
            text += f"[{self._fmt(ends[0], False)}, {self._fmt(ends[1], False)}]"
            return text + (f", a difference inside ±{self.margin:g}" if self.equivalent else "")
        elif outcome == "equivalent":
            return f"{a} and {b} equivalent within ±{self.margin:g} ({a} - {b} {self.interval()})"
        # undecided: say why (the interval covers the tested value, or only the correction keeps it open)
        seeds = self.seeds_to_decide()
        count = f"about {seeds}" if seeds is not None else f"more than {MAX_SEEDS}"
        target = f"{-self.offset:g}" if self.offset else "0"
        if lo <= -self.offset <= hi:
            why = [f"the interval includes {target}"]
        else:
            why = [f"it excludes {target} only before Holm's correction (p {self.p_value:.2g}, adjusted {self.p:.2g})"]
        if self.margin is not None:
            why.append(f"is not shown equivalent within ±{self.margin:g}")
        return (
            f"{UNDECIDED}: {a} - {b} {self.interval()}: {' and '.join(why)}; "
            f"{count} seeds per group would decide it at the observed spread"
        )

    def __str__(self) -> str:
        return self.reading() if self.p_value is None else f"{self.reading()} ({self.tests_text()})"


def _adjusted(adjusted: float | None) -> str:
    return "" if adjusted is None else f", Holm {adjusted:.2g}"


def compare(
    a: Sequence[float],
    b: Sequence[float],
    margin: float | None = None,
    *,
    paired: bool = False,
    offset: float = 0.0,
    names: tuple[str, str] = ("a", "b"),
    digits: int = 2,
) -> Comparison:
    """``a - b``: paired t on the per-seed differences (``paired``: a[i] and b[i] share a seed), else Welch's t-test.
    Two-sided test of ``a - b = -offset``; with a ``margin``, two one-sided tests of equivalence within ±margin."""
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        raise ValueError("compare needs at least one value on each side")
    if paired and len(a) != len(b):
        raise ValueError("paired groups need one value per seed on each side")
    common = {"margin": margin, "offset": offset, "names": names, "digits": digits, "paired": paired}
    if paired:
        diffs = [x - y for x, y in zip(a, b)]
        n, diff = (len(a), len(b)), sum(diffs) / len(diffs)
        if len(diffs) < 2:
            return Comparison(diff, None, None, n, p_value=None, p_equiv=None, spread=None, **common)
        spread = _sd(diffs)
        se, df = spread / math.sqrt(len(diffs)), len(diffs) - 1
    else:
        n, diff = (len(a), len(b)), sum(a) / len(a) - sum(b) / len(b)
        if len(a) < 2 or len(b) < 2:
            return Comparison(diff, None, None, n, p_value=None, p_equiv=None, spread=None, **common)
        va, vb = _sd(a) ** 2, _sd(b) ** 2
        spread = math.sqrt((va + vb) / 2)
        se = math.sqrt(va / len(a) + vb / len(b))
        df = (
            (va / len(a) + vb / len(b)) ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
            if se
            else 1
        )
    if se <= 1e-12 * max(1.0, abs(diff)):  # no spread beyond float rounding: the difference is exact
        p = 0.0 if diff + offset != 0 else 1.0
        pe = None if margin is None else (0.0 if abs(diff) < margin else 1.0)
        return Comparison(diff, diff, diff, n, p_value=p, p_equiv=pe, spread=0.0, **common)
    half = _t(1 - ALPHA / 2, df) * se
    p = float(2 * stats.t.sf(abs(diff + offset) / se, df))
    pe = None
    if margin is not None:  # both one-sided tests must reject: the larger p
        pe = float(max(stats.t.sf((diff + margin) / se, df), stats.t.cdf((diff - margin) / se, df)))
    return Comparison(diff, diff - half, diff + half, n, p_value=p, p_equiv=pe, spread=spread, **common)


def holm(p_values: Sequence[float], groups: Sequence[object] | None = None) -> tuple[list[float], list[int]]:
    """Holm's step-down adjustment: the adjusted p-values (same order) and the factor each raw p was multiplied by
    (m for the smallest, m-1 for the next, ...) before the running maximum that keeps the order.

    ``groups``: tests of one group whose null hypotheses exclude each other (a comparison's "no difference" and "apart
    by the margin or more"): at most one of them can be true, so at each step the factor is the number of groups with
    a test not yet passed, the most true hypotheses left (Shaffer's refinement; without groups, plain Holm)."""
    groups = list(range(len(p_values))) if groups is None else list(groups)
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, factors = [1.0] * len(p_values), [1] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        factors[i] = len({groups[j] for j in order[rank:]})
        running = max(running, min(1.0, factors[i] * p_values[i]))
        adjusted[i] = running
    return adjusted, factors


def adjust(comparisons: Sequence[Comparison]) -> int:
    """Holm over every test of ``comparisons`` (difference and equivalence tests in one family, each comparison
    counted once: see :func:`holm`); sets their adjusted p-values and returns the number of comparisons tested."""
    slots = [(c, "p") for c in comparisons if c.p_value is not None]
    slots += [(c, "pe") for c in comparisons if c.p_equiv is not None]
    raw = [c.p_value if kind == "p" else c.p_equiv for c, kind in slots]
    adjusted, factors = holm(raw, [id(c) for c, _ in slots])
    for (c, kind), p, k in zip(slots, adjusted, factors):
        if kind == "p":
            c.p_adjusted, c.factor = p, k
        else:
            c.p_equiv_adjusted, c.equiv_factor = p, k
    return len({id(c) for c, _ in slots})
