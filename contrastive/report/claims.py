"""The survey's claims, each checked on the runs by a stated rule and, between accuracies, a test on the groups."""

from __future__ import annotations

from dataclasses import dataclass

from contrastive.report.runs import (
    _INSTANCE_FAMILIES,
    Run,
    _by,
    _mean,
    _values,
    run_groups,
    swept_keys,
)
from contrastive.report.stats import ALPHA, FAILS, HOLDS, UNMEASURED, compare, summarize, within_noise

PAPER_QUEUE_RATIO = 0.05  # MoCo's ImageNet queue against its data: 65,536 / 1.28M (claim b's regime)
SWAV_MARGIN = 5.0  # points of kNN accuracy within which clustering counts as "comparable" (claim f)


@dataclass
class Claim:
    letter: str
    statement: str
    rule: str
    verdict: str
    evidence: str


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


def _overall(verdicts: list[str], n: list[tuple[int, ...]]) -> str:
    """One verdict over several comparisons: every one holds, or one fails; else within noise, with the run counts
    of the groups compared (``n``: one tuple per comparison, or per group counted once)."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return within_noise([k for pair in n for k in pair])


_TEST = (
    f"Welch's t-test over the runs (seeds) of each group, two-sided at {ALPHA:g}: 'holds' or 'does not hold' "
    "only when the difference is beyond the noise, otherwise 'within noise' (no test with one run per group)"
)


def claim_batch_size(runs: list[Run]) -> Claim:
    by_batch = _by(
        (r for r in _family(runs, "end-to-end") if r.num("global_batch_size") is not None),
        lambda r: r.num("global_batch_size"),
    )
    rule = f"kNN of end-to-end runs at the largest batch > at the smallest batch; {_TEST}"
    statement = "End-to-end training (SimCLR, in-batch negatives) gets more accurate as the batch grows."
    batches = sorted(b for b in by_batch if _values(by_batch[b], "knn_acc"))
    if len(batches) < 2:
        return Claim("a", statement, rule, UNMEASURED, "needs end-to-end runs at two or more batch sizes")
    test = compare(_values(by_batch[batches[-1]], "knn_acc"), _values(by_batch[batches[0]], "knn_acc"))
    evidence = (
        "kNN by batch: "
        + ", ".join(f"{b:g}: {summarize(_values(by_batch[b], 'knn_acc'))}" for b in batches)
        + f"; largest - smallest: {test}"
    )
    return Claim("a", statement, rule, test.verdict, evidence)


def claim_staleness(runs: list[Run]) -> Claim:
    """On the encoder drift of the stored keys when the runs recorded it, else on the older staleness cosine."""
    statement = "The memory bank's stored keys are staler (less consistent with the current encoder) than MoCo's queue."
    bank_runs, queue_runs = _family(runs, "memory bank"), _family(runs, "momentum queue")
    if _values(bank_runs, "drift") and _values(queue_runs, "drift"):
        rule = (
            "encoder drift (1 - cosine between a stored key's eval-mode encoding when written and now, on the same "
            f"view) of memory-bank runs > of MoCo runs, at each size of MoCo's queue against the data set (one "
            f"verdict over them: all hold, or one does not, else within noise); {_TEST}"
        )
        bank = _values(bank_runs, "drift")
        # one comparison per size of MoCo's queue against the data, as the regime decides how old its keys are
        by_ratio = _by(
            (r for r in queue_runs if r.num("drift") is not None),
            lambda r: float(f"{r.num('dictionary_ratio'):.2g}"),  # recorded with every drift
        )
        parts, verdicts, counts = [], [], [(len(bank),)]  # the bank's group, compared with each of MoCo's, once
        for ratio, group in sorted(by_ratio.items()):
            queue = _values(group, "drift")
            test = compare(bank, queue)
            where = f"MoCo in the regime of a queue {ratio:g}x the data"
            if ratio <= PAPER_QUEUE_RATIO:
                where += f" (the paper's: at most {PAPER_QUEUE_RATIO:g}x)"
            age = _values(group, "drift_age_epochs")
            parts.append(
                f"{where}: drift {summarize(queue).mean:.4f} (n={len(queue)}"
                + (f", keys {_mean(age):.2f} epochs old" if age else "")
                + f"), bank - MoCo {test.diff:+.4f}, {str(test).split(', ', 1)[1]}: {test.verdict.split(' (')[0]}"
            )
            verdicts.append(test.verdict)
            counts.append((len(queue),))
        bank_age, bank_ratio = _values(bank_runs, "drift_age_epochs"), _values(bank_runs, "dictionary_ratio")
        evidence = (
            f"memory bank: drift {summarize(bank).mean:.4f} (n={len(bank)}"
            + (f", keys {_mean(bank_age):.2f} epochs old" if bank_age else "")
            + (f", dictionary / data {_mean(bank_ratio):.2f}" if bank_ratio else "")
            + "); "
            + "; ".join(parts)
        )
        return Claim("b", statement, rule, _overall(verdicts, counts), evidence)
    rule = (
        "staleness cosine of MoCo runs > that of memory-bank runs (1 = fresh; the cosine also counts the "
        "augmentation and training-mode batch norm behind each stored key, not only encoder drift: runs that "
        f"record `drift` are judged on it instead); {_TEST}"
    )
    bank, queue = _values(bank_runs, "staleness"), _values(queue_runs, "staleness")
    if not bank or not queue:
        return Claim("b", statement, rule, UNMEASURED, "needs drift or staleness from memory-bank and MoCo runs")
    test = compare(queue, bank)
    bank_s, queue_s = summarize(bank), summarize(queue)
    evidence = (
        f"memory bank {bank_s.mean:.3f} (n={bank_s.n}), MoCo {queue_s.mean:.3f} (n={queue_s.n}); "
        f"MoCo - bank: {test.diff:+.3f}, {str(test).split(', ', 1)[1]}"
    )
    return Claim("b", statement, rule, test.verdict, evidence)


def claim_decoupled(runs: list[Run]) -> Claim:
    statement = "MoCo decouples the number of negatives from the batch: more negatives per query than end-to-end."
    rule = "at every batch size with both, MoCo's largest negatives/query > end-to-end's largest"

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


def claim_more_negatives(runs: list[Run]) -> Claim:
    statement = "More negatives help instance discrimination."
    rule = f"for every method whose runs differ in negatives/query: kNN at the largest K > at the smallest K; {_TEST}"
    parts, verdicts, ns = [], [], []
    for method, group in sorted(_by(runs, lambda r: r.method).items()):
        by_k = _by(
            (r for r in group if r.num("negatives_per_query") is not None and r.num("knn_acc") is not None),
            lambda r: r.num("negatives_per_query"),
        )
        if len(by_k) >= 2:
            k0, k1 = min(by_k), max(by_k)
            test = compare(_values(by_k[k1], "knn_acc"), _values(by_k[k0], "knn_acc"))
            parts.append(
                f"{method}: K={k0:g} {summarize(_values(by_k[k0], 'knn_acc'))} -> "
                f"K={k1:g} {summarize(_values(by_k[k1], 'knn_acc'))} ({test})"
            )
            verdicts.append(test.verdict)
            ns.append(test.n)
    if not verdicts:
        return Claim("d", statement, rule, UNMEASURED, "needs a method with runs at two or more negatives/query")
    return Claim("d", statement, rule, _overall(verdicts, ns), "; ".join(parts))


def _compare_best(runs: list[Run], a: tuple[str, ...], b: tuple[str, ...], margin: float = 0.0):
    """Per shared setting: the best group of families ``a`` against the best of ``b`` (kNN)."""
    best_a, best_b = _best_group_per_setting(runs, a), _best_group_per_setting(runs, b)
    return [
        (
            s,
            compare(_values(best_a[s], "knn_acc"), _values(best_b[s], "knn_acc"), margin),
            summarize(_values(best_a[s], "knn_acc")),
            summarize(_values(best_b[s], "knn_acc")),
        )
        for s in sorted(set(best_a) & set(best_b))
    ]


def claim_moco_vs_bank(runs: list[Run]) -> Claim:
    statement = "MoCo is at least as accurate as the memory bank at comparable settings (MoCo paper, Fig. 3)."
    rule = (
        "best MoCo group's kNN > best memory-bank group's, among runs with the same data, backbone and epochs; " + _TEST
    )
    tests = _compare_best(runs, ("momentum queue",), ("memory bank",))
    if not tests:
        return Claim("e", statement, rule, UNMEASURED, "needs MoCo and memory-bank runs with the same setting")
    evidence = "; ".join(f"{_setting_name(s)}: MoCo {a} vs memory bank {b} ({t})" for s, t, a, b in tests)
    return Claim(
        "e", statement, rule, _overall([t.verdict for _, t, _, _ in tests], [t.n for _, t, _, _ in tests]), evidence
    )


def claim_clustering(runs: list[Run]) -> Claim:
    statement = (
        "Clustering (SwAV) reaches accuracy comparable to the instance-contrastive methods without any "
        "explicit negatives."
    )
    rule = (
        f"best SwAV group's kNN + {SWAV_MARGIN:g} points > best instance-contrastive group's, among runs with "
        f"the same data, backbone and epochs; {_TEST}"
    )
    tests = _compare_best(runs, ("clustering",), _INSTANCE_FAMILIES, SWAV_MARGIN)
    if not tests:
        return Claim("f", statement, rule, UNMEASURED, "needs SwAV and instance-contrastive runs with the same setting")
    evidence = "; ".join(
        f"{_setting_name(s)}: SwAV {a} vs best instance {b} (with the margin: {t})" for s, t, a, b in tests
    )
    return Claim(
        "f", statement, rule, _overall([t.verdict for _, t, _, _ in tests], [t.n for _, t, _, _ in tests]), evidence
    )


def claim_learned(runs: list[Run]) -> Claim:
    statement = "Every method learned something: its final 1-shot kNN beats the same figure at random initialisation."
    rule = "every run with both figures: knn_acc_1shot > init_knn_acc_1shot"
    pairs = [(run, run.num("knn_acc_1shot"), run.num("init_knn_acc_1shot")) for run in runs]
    pairs = [(run, final, init) for run, final, init in pairs if final is not None and init is not None]
    if not pairs:
        return Claim("g", statement, rule, UNMEASURED, "needs runs with knn_acc_1shot and init_knn_acc_1shot")
    evidence = "; ".join(f"{run.name}: {final:.1f} vs init {init:.1f}" for run, final, init in pairs)
    return Claim("g", statement, rule, HOLDS if all(final > init for _, final, init in pairs) else FAILS, evidence)


def claim_later_stages(runs: list[Run]) -> Claim:
    statement = (
        "Features from later stages of the encoder serve better than earlier ones (the survey: res5 against "
        "res2 to res4)."
    )
    rule = f"per group, kNN of the last encoder stage > of the first (`eval.stages=true`); {_TEST}"
    parts, verdicts, ns = [], [], []
    for label, group in run_groups(runs, swept_keys(runs)).items():
        names = next((run.metrics["stages"] for run in group if isinstance(run.metrics.get("stages"), list)), None)
        if not names or len(names) < 2:
            continue
        first, last = (_values(group, f"stage_{name}_knn_acc") for name in (names[0], names[-1]))
        if first and last:
            test = compare(last, first)
            by_stage = ", ".join(
                f"{name} {summarize(_values(group, f'stage_{name}_knn_acc')).mean:.1f}"
                for name in names
                if _values(group, f"stage_{name}_knn_acc")
            )
            parts.append(f"{label}: {by_stage} ({names[-1]} - {names[0]}: {test})")
            verdicts.append(test.verdict)
            ns.append(test.n)
    if not verdicts:
        return Claim("h", statement, rule, UNMEASURED, "needs runs with per-stage probes (eval.stages=true)")
    return Claim("h", statement, rule, _overall(verdicts, ns), "; ".join(parts))


def survey_claims(runs: list[Run]) -> list[Claim]:
    checks = [
        claim_batch_size,
        claim_staleness,
        claim_decoupled,
        claim_more_negatives,
        claim_moco_vs_bank,
        claim_clustering,
        claim_learned,
        claim_later_stages,
    ]
    return [check(runs) for check in checks]


def claims_section(claims: list[Claim]) -> list[str]:
    lines = [
        "## Survey claims",
        "",
        (
            'Claims from "A survey on contrastive self-supervised learning" (Jaiswal et al.) and the MoCo paper, '
            "checked against the runs above. Families: end-to-end = negatives from the batch (SimCLR), memory bank "
            "(NPID), momentum queue (MoCo), clustering (SwAV). kNN accuracies in percent."
        ),
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
