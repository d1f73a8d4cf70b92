"""The survey's claims, each checked on the runs by a stated rule and, between figures of groups of seeds, by a test
whose outcome is a difference, an equivalence within a margin, or undecided (with the seeds that would decide it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from contrastive.report.runs import (
    _INSTANCE_FAMILIES,
    Run,
    _by,
    _mean,
    _values,
    compare_runs,
    compare_within,
    distinct_runs,
    run_groups,
    swept_keys,
)
from contrastive.report.stats import (
    ALPHA,
    FAILS,
    HOLDS,
    MAX_SEEDS,
    TOO_FEW,
    UNDECIDED,
    UNMEASURED,
    Comparison,
    adjust,
    margins_line,
    margins_with,
    summarize,
)

PAPER_QUEUE_RATIO = 0.05  # MoCo's ImageNet queue against its data: 65,536 / 1.28M (claim b's regime)
SWAV_MARGIN = 5.0  # points of kNN accuracy within which clustering counts as "comparable" (claim f)

SUPPORTS, CONTRADICTS, OPEN = "supports", "contradicts", "open"


@dataclass
class Test:
    """One comparison behind a claim and what the claim needs of it: ``more`` (a above b) or ``at least`` (a above
    b, or the two equivalent within the margin)."""

    comparison: Comparison
    wants: str = "more"

    @property
    def reading(self) -> str:
        c = self.comparison
        if c.outcome == TOO_FEW:
            return TOO_FEW
        if self.wants == "at least" and c.equivalent:
            return SUPPORTS
        if c.direction:
            return SUPPORTS if c.direction > 0 else CONTRADICTS
        # equivalent with no gain: the claim of "more" does not hold beyond the margin
        return CONTRADICTS if c.equivalent else OPEN


@dataclass
class Claim:
    letter: str
    statement: str
    rule: str
    verdict: str
    evidence: str
    tests: list[Test] = field(default_factory=list, repr=False)
    render: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def decide(self) -> Claim:
        """Verdict and evidence from the tests as they stand (after Holm's correction, once survey_claims ran it)."""
        if self.tests:
            self.verdict = overall(self.tests)
        if self.render is not None:
            self.evidence = self.render()
        return self


def overall(tests: list[Test]) -> str:
    """Every test supports the claim: holds; one contradicts it: does not hold; else undecided with the seeds per
    group that would decide the open ones, or not enough runs."""
    readings = [test.reading for test in tests]
    if all(r == SUPPORTS for r in readings):
        return HOLDS
    if CONTRADICTS in readings:
        return FAILS
    open_tests = [test.comparison for test, r in zip(tests, readings) if r == OPEN]
    if not open_tests:
        return f"{TOO_FEW} (n=1 in a group: no interval without repeats)"
    seeds = [c.seeds_to_decide() for c in open_tests]
    count = f"about {max(seeds)}" if None not in seeds else f"more than {MAX_SEEDS}"
    return f"{UNDECIDED}: {count} seeds per group would decide it"


def _claim(letter: str, statement: str, rule: str, tests: list[Test], render: Callable[[], str]) -> Claim:
    adjust([test.comparison for test in tests])  # alone, Holm over its own tests; survey_claims redoes it over all
    return Claim(letter, statement, rule, "", "", tests, render).decide()


def _family(runs: list[Run], *families: str) -> list[Run]:
    return [run for run in runs if run.family in families]


def _best_group_per_setting(runs: list[Run], families: tuple[str, ...]) -> dict[tuple, list[Run]]:
    """Per setting (data, backbone, epochs): the runs of the group (seeds of one configuration) with the highest
    mean kNN among the families' runs."""
    groups = run_groups(_family(runs, *families), swept_keys(runs))
    best: dict[tuple, list[Run]] = {}
    for group in groups.values():
        for setting, members in _by(group, lambda r: r.setting).items():
            accs = _values(members, "knn_acc")
            if accs and (setting not in best or _mean(accs) > _mean(_values(best[setting], "knn_acc"))):
                best[setting] = members
    return best


def _setting_name(setting: tuple) -> str:
    return "/".join(setting)


_TEST = (
    "each comparison by a paired t-test on the per-seed differences where both sides ran the same seeds, else by "
    f"Welch's t-test; 95% intervals; two-sided at {ALPHA:g} after Holm's correction over every test of the claims "
    "(raw and adjusted p shown); 'equivalent' by two one-sided tests within the metric's margin; 'undecided' says "
    "how many seeds per group would decide it at the observed spread; 'not enough runs' with one run per group"
)
_ALL = "one verdict over the comparisons: all support it, or one contradicts it, else undecided"


def claim_batch_size(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    m = margins_with(margins)
    by_batch = _by(
        (r for r in _family(runs, "end-to-end") if r.num("global_batch_size") is not None),
        lambda r: r.num("global_batch_size"),
    )
    rule = f"kNN of end-to-end runs at the largest batch > at the smallest batch; {_TEST}"
    statement = "End-to-end training (SimCLR, in-batch negatives) gets more accurate as the batch grows."
    batches = sorted(b for b in by_batch if _values(by_batch[b], "knn_acc"))
    if len(batches) < 2:
        return Claim("a", statement, rule, UNMEASURED, "needs end-to-end runs at two or more batch sizes")
    large, small = batches[-1], batches[0]
    test = Test(
        compare_runs(
            by_batch[large], by_batch[small], "knn_acc", m["knn"], names=(f"batch {large:g}", f"batch {small:g}")
        )
    )
    prefix = "kNN by batch: " + ", ".join(f"{b:g}: {summarize(_values(by_batch[b], 'knn_acc'))}" for b in batches)
    return _claim("a", statement, rule, [test], lambda: f"{prefix}; {test.comparison}")


def _age(runs: list[Run]) -> str:
    age = _values(runs, "drift_age_epochs")
    return f", keys {_mean(age):.2f} epochs old" if age else ""


def claim_staleness(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    """On the encoder drift of the stored keys when the runs recorded it, else on the older staleness cosine."""
    m = margins_with(margins)
    statement = "The memory bank's stored keys are staler (less consistent with the current encoder) than MoCo's queue."
    bank_runs, queue_runs = _family(runs, "memory bank"), _family(runs, "momentum queue")
    if _values(bank_runs, "drift") and _values(queue_runs, "drift"):
        rule = (
            "encoder drift (1 - cosine between a stored key's eval-mode encoding when written and now, on the same "
            f"view) of memory-bank runs > of MoCo runs, at each size of MoCo's queue against the data set ({_ALL}); "
            + _TEST
        )
        bank_with = [r for r in bank_runs if r.num("drift") is not None]
        # one comparison per size of MoCo's queue against the data, as the regime decides how old its keys are
        by_ratio = _by(
            (r for r in queue_runs if r.num("drift") is not None),
            lambda r: float(f"{r.num('dictionary_ratio'):.2g}"),  # recorded with every drift
        )
        tests, wheres = [], []
        for ratio, group in sorted(by_ratio.items()):
            where = f"MoCo in the regime of a queue {ratio:g}x the data"
            if ratio <= PAPER_QUEUE_RATIO:
                where += f" (the paper's: at most {PAPER_QUEUE_RATIO:g}x)"
            queue = _values(group, "drift")
            wheres.append(f"{where}: drift {summarize(queue).mean:.4f} (n={len(queue)}{_age(group)})")
            tests.append(Test(compare_runs(bank_with, group, "drift", m["drift"], names=("bank", "MoCo"), digits=4)))
        bank, bank_ratio = _values(bank_runs, "drift"), _values(bank_runs, "dictionary_ratio")
        head = (
            f"memory bank: drift {summarize(bank).mean:.4f} (n={len(bank)}{_age(bank_runs)}"
            + (f", dictionary / data {_mean(bank_ratio):.2f}" if bank_ratio else "")
            + ")"
        )
        return _claim(
            "b",
            statement,
            rule,
            tests,
            lambda: "; ".join([head, *(f"{w}: {t.comparison}" for w, t in zip(wheres, tests))]),
        )
    rule = (
        "staleness cosine of MoCo runs > that of memory-bank runs (1 = fresh; the cosine also counts the "
        "augmentation and training-mode batch norm behind each stored key, not only encoder drift: runs that "
        f"record `drift` are judged on it instead); {_TEST}"
    )
    bank, queue = _values(bank_runs, "staleness"), _values(queue_runs, "staleness")
    if not bank or not queue:
        return Claim("b", statement, rule, UNMEASURED, "needs drift or staleness from memory-bank and MoCo runs")
    test = Test(compare_runs(queue_runs, bank_runs, "staleness", m["staleness"], names=("MoCo", "bank"), digits=3))
    bank_s, queue_s = summarize(bank), summarize(queue)
    head = f"memory bank {bank_s.mean:.3f} (n={bank_s.n}), MoCo {queue_s.mean:.3f} (n={queue_s.n})"
    return _claim("b", statement, rule, [test], lambda: f"{head}; staleness {test.comparison}")


def claim_decoupled(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    statement = "MoCo decouples the number of negatives from the batch: more negatives per query than end-to-end."
    rule = "at every batch size with both, MoCo's largest negatives/query > end-to-end's largest (a count: no noise)"

    def largest(families: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for run in _family(runs, families):
            batch, k = run.num("global_batch_size"), run.num("negatives_per_query")
            if batch is not None and k is not None:
                out[batch] = max(k, out.get(batch, k))
        return out

    queue, e2e = largest("momentum queue"), largest("end-to-end")
    shared = sorted(set(queue) & set(e2e))
    if not shared:
        return Claim("c", statement, rule, UNMEASURED, "needs MoCo and end-to-end runs at the same batch size")
    evidence = "; ".join(f"batch {b:g}: MoCo {queue[b]:g} vs end-to-end {e2e[b]:g}" for b in shared)
    return Claim("c", statement, rule, HOLDS if all(queue[b] > e2e[b] for b in shared) else FAILS, evidence)


def claim_more_negatives(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    m = margins_with(margins)
    statement = "More negatives help instance discrimination."
    rule = (
        "for every method whose runs differ in negatives/query: kNN at the largest K > at the smallest K "
        f"({_ALL}); {_TEST}"
    )
    tests, heads = [], []
    for method, group in sorted(_by(runs, lambda r: r.method).items()):
        by_k = _by(
            (r for r in group if r.num("negatives_per_query") is not None and r.num("knn_acc") is not None),
            lambda r: r.num("negatives_per_query"),
        )
        if len(by_k) >= 2:
            k0, k1 = min(by_k), max(by_k)
            tests.append(Test(compare_runs(by_k[k1], by_k[k0], "knn_acc", m["knn"], names=(f"K={k1:g}", f"K={k0:g}"))))
            heads.append(
                f"{method}: K={k0:g} {summarize(_values(by_k[k0], 'knn_acc'))} -> K={k1:g} "
                f"{summarize(_values(by_k[k1], 'knn_acc'))}"
            )
    if not tests:
        return Claim("d", statement, rule, UNMEASURED, "needs a method with runs at two or more negatives/query")
    return _claim("d", statement, rule, tests, lambda: "; ".join(f"{h}: {t.comparison}" for h, t in zip(heads, tests)))


def _compare_best(
    runs: list[Run], a: tuple[str, ...], b: tuple[str, ...], names: tuple[str, str], wants: str, **kwargs
) -> list[tuple[str, Test]]:
    """Per shared setting: the best group of families ``a`` against the best of ``b`` (kNN), with the groups'
    summaries as the head of its evidence."""
    best_a, best_b = _best_group_per_setting(runs, a), _best_group_per_setting(runs, b)
    out = []
    for s in sorted(set(best_a) & set(best_b)):
        head = (
            f"{_setting_name(s)}: {names[0]} {summarize(_values(best_a[s], 'knn_acc'))} vs {names[1]} "
            f"{summarize(_values(best_b[s], 'knn_acc'))}"
        )
        out.append((head, Test(compare_runs(best_a[s], best_b[s], "knn_acc", names=names, **kwargs), wants)))
    return out


def claim_moco_vs_bank(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    m = margins_with(margins)
    statement = "MoCo is at least as accurate as the memory bank at comparable settings (MoCo paper, Fig. 3)."
    rule = (
        "best MoCo group's kNN above the best memory-bank group's or equivalent to it within the margin, among runs "
        f"with the same data, backbone and epochs; {_TEST}"
    )
    parts = _compare_best(
        runs, ("momentum queue",), ("memory bank",), ("MoCo", "memory bank"), "at least", margin=m["knn"]
    )
    if not parts:
        return Claim("e", statement, rule, UNMEASURED, "needs MoCo and memory-bank runs with the same setting")
    tests = [t for _, t in parts]
    return _claim("e", statement, rule, tests, lambda: "; ".join(f"{h}: {t.comparison}" for h, t in parts))


def claim_clustering(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    statement = (
        "Clustering (SwAV) reaches accuracy comparable to the instance-contrastive methods without any "
        "explicit negatives."
    )
    rule = (
        f"best SwAV group's kNN - best instance-contrastive group's > -{SWAV_MARGIN:g} points (the claim's own margin "
        f"of comparable), among runs with the same data, backbone and epochs; {_TEST}"
    )
    parts = _compare_best(
        runs, ("clustering",), _INSTANCE_FAMILIES, ("SwAV", "best instance"), "more", offset=SWAV_MARGIN
    )
    if not parts:
        return Claim("f", statement, rule, UNMEASURED, "needs SwAV and instance-contrastive runs with the same setting")
    tests = [t for _, t in parts]
    return _claim("f", statement, rule, tests, lambda: "; ".join(f"{h}: {t.comparison}" for h, t in parts))


def claim_learned(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    m = margins_with(margins)
    statement = "Every method learned something: its final 1-shot kNN beats the same figure at random initialisation."
    rule = (
        "per group (the seeds of one configuration), knn_acc_1shot > init_knn_acc_1shot, paired per run "
        f"({_ALL}); {_TEST}"
    )
    tests, heads = [], []
    for label, group in run_groups(runs, swept_keys(runs)).items():
        both = [r for r in group if r.num("knn_acc_1shot") is not None and r.num("init_knn_acc_1shot") is not None]
        if both:
            tests.append(
                Test(compare_within(both, "knn_acc_1shot", "init_knn_acc_1shot", m["knn"], names=("final", "init")))
            )
            final, init = _values(both, "knn_acc_1shot"), _values(both, "init_knn_acc_1shot")
            heads.append(f"{label}: 1-shot {summarize(final)} vs init {summarize(init)}")
    if not tests:
        return Claim("g", statement, rule, UNMEASURED, "needs runs with knn_acc_1shot and init_knn_acc_1shot")
    return _claim("g", statement, rule, tests, lambda: "; ".join(f"{h}: {t.comparison}" for h, t in zip(heads, tests)))


def claim_later_stages(runs: list[Run], margins: Mapping[str, float] | None = None) -> Claim:
    m = margins_with(margins)
    statement = (
        "Features from later stages of the encoder serve better than earlier ones (the survey: res5 against "
        "res2 to res4)."
    )
    rule = (
        f"per group, kNN of the last encoder stage > of the first (`eval.stages=true`), paired per run ({_ALL}); "
        + _TEST
    )
    tests, heads = [], []
    for label, group in run_groups(runs, swept_keys(runs)).items():
        names = next((run.metrics["stages"] for run in group if isinstance(run.metrics.get("stages"), list)), None)
        if not names or len(names) < 2:
            continue
        first, last = (f"stage_{name}_knn_acc" for name in (names[0], names[-1]))
        both = [r for r in group if r.num(first) is not None and r.num(last) is not None]
        if both:
            tests.append(Test(compare_within(both, last, first, m["knn"], names=(names[-1], names[0]))))
            by_stage = ", ".join(
                f"{name} {summarize(_values(group, f'stage_{name}_knn_acc')).mean:.1f}"
                for name in names
                if _values(group, f"stage_{name}_knn_acc")
            )
            heads.append(f"{label}: {by_stage}")
    if not tests:
        return Claim("h", statement, rule, UNMEASURED, "needs runs with per-stage probes (eval.stages=true)")
    return _claim("h", statement, rule, tests, lambda: "; ".join(f"{h}: {t.comparison}" for h, t in zip(heads, tests)))


CHECKS = (
    claim_batch_size,
    claim_staleness,
    claim_decoupled,
    claim_more_negatives,
    claim_moco_vs_bank,
    claim_clustering,
    claim_learned,
    claim_later_stages,
)


def survey_claims(runs: list[Run], margins: Mapping[str, float] | None = None) -> list[Claim]:
    """Every claim on ``runs`` (copies of a replicate counted once), Holm's correction over all their tests."""
    runs, _ = distinct_runs(runs)
    margins = margins_with(margins)
    claims = [check(runs, margins) for check in CHECKS]
    adjust([test.comparison for claim in claims for test in claim.tests])
    return [claim.decide() for claim in claims]


def count_tests(claims: list[Claim]) -> tuple[int, int]:
    """(comparisons tested, tests among them): a comparison with a margin makes two tests."""
    comparisons = [test.comparison for claim in claims for test in claim.tests if test.comparison.p_value is not None]
    return len(comparisons), len(comparisons) + sum(c.p_equiv is not None for c in comparisons)


def claims_section(claims: list[Claim], margins: Mapping[str, float] | None = None) -> list[str]:
    comparisons, tests = count_tests(claims)
    lines = [
        "## Survey claims",
        "",
        (
            'Claims from "A survey on contrastive self-supervised learning" (Jaiswal et al.) and the MoCo paper, '
            "checked against the runs above. Families: end-to-end = negatives from the batch (SimCLR), memory bank "
            "(NPID), momentum queue (MoCo), clustering (SwAV). kNN accuracies in percent."
        ),
        "",
        (
            f"Each comparison reads as one of three outcomes: one side better by x [95% interval], the two "
            f"equivalent within the metric's margin (two one-sided tests), or undecided, with about how many seeds "
            f"per group would decide it at the observed spread. Runs that share a seed share the initialisation and "
            f"the data order, so groups that ran the same seeds are compared by the paired t-test on the per-seed "
            f"differences; others by Welch's t-test. p-values are shown raw and after Holm's correction over the "
            f"{tests} tests of the {comparisons} comparisons of this section (family-wise level {ALPHA:g}); a "
            "comparison's difference and equivalence tests cannot both test a true hypothesis (no difference, and "
            "apart by the margin or more, exclude each other), so each comparison counts once in Holm's factors "
            "(Shaffer's refinement). Verdicts use the adjusted p-values; a seed count assumes the level the "
            "correction gives that test now."
        ),
        "",
        margins_line(margins_with(margins)) + f" Claim f's own margin of comparable: {SWAV_MARGIN:g} kNN points.",
        "",
    ]
    for claim in claims:
        lines += [
            (
                f"**{claim.letter}) {claim.statement}** Verdict: **{claim.verdict}**. "
                f"Rule: {claim.rule}. Numbers: {claim.evidence}."
            ),
            "",
        ]
    return lines
