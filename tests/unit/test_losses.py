"""Losses against direct loop computations of their definitions, values and gradients, in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from contrastive.losses import (
    contrastive_cross_entropy,
    gathered_info_nce,
    gathered_nt_xent,
    info_nce,
    nce_loss,
    nt_xent,
    sinkhorn,
    swapped_prediction,
)

F64 = torch.float64


def randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype).requires_grad_()


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def neg_log_softmax_first(logits: list[torch.Tensor]) -> torch.Tensor:
    """-log(exp(l_0) / sum_j exp(l_j)), written out."""
    exps = torch.stack(logits).exp()
    return -torch.log(exps[0] / exps.sum())


def loop_info_nce(query, positive, negatives_of, temperature) -> torch.Tensor:
    """``negatives_of(i)`` lists the negative keys of query i."""
    terms = []
    for i in range(len(query)):
        keys = [positive[i], *negatives_of(i)]
        terms.append(neg_log_softmax_first([cos(query[i], k) / temperature for k in keys]))
    return torch.stack(terms).mean()


def loop_nt_xent(z1, z2, temperature) -> torch.Tensor:
    views = list(z1) + list(z2)
    n = len(z1)
    terms = []
    for a in range(2 * n):
        pair = (a + n) % (2 * n)
        others = [views[b] for b in range(2 * n) if b not in (a, pair)]
        assert len(others) == 2 * n - 2
        terms.append(neg_log_softmax_first([cos(views[a], k) / temperature for k in [views[pair], *others]]))
    return torch.stack(terms).mean()


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def assert_same_value_and_grads(ours, reference, inputs, rtol=1e-10, atol=1e-12):
    assert ours.dtype == F64
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=atol)
    for g_ours, g_ref in zip(grads(ours, inputs), grads(reference, inputs)):
        torch.testing.assert_close(g_ours, g_ref, rtol=rtol, atol=atol)


# -- InfoNCE -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_info_nce_shared_negatives(temperature):
    q, p, negs = randn(5, 8, seed=0, scale=3.0), randn(5, 8, seed=1), randn(7, 8, seed=2, scale=0.2)
    ours = info_nce(q, p, negs, temperature)
    reference = loop_info_nce(q, p, lambda i: list(negs), temperature)
    assert_same_value_and_grads(ours, reference, [q, p, negs])


def test_info_nce_per_query_negatives():
    q, p, negs = randn(4, 6, seed=3), randn(4, 6, seed=4, scale=5.0), randn(4, 9, 6, seed=5)
    ours = info_nce(q, p, negs, 0.2)
    reference = loop_info_nce(q, p, lambda i: list(negs[i]), 0.2)
    assert_same_value_and_grads(ours, reference, [q, p, negs])


def test_info_nce_per_query_differs_from_shared():
    # Query i must see only its own row of [N, K, D]: swapping two rows changes the loss.
    q, p, negs = randn(3, 4, seed=6), randn(3, 4, seed=7), randn(3, 5, 4, seed=8)
    swapped = negs.detach()[[1, 0, 2]]
    assert not torch.allclose(info_nce(q, p, negs, 0.1), info_nce(q, p, swapped, 0.1))


def test_info_nce_in_batch():
    q, p = randn(6, 5, seed=9), randn(6, 5, seed=10, scale=0.1)
    ours = info_nce(q, p, None, 0.3)
    reference = loop_info_nce(q, p, lambda i: [p[j] for j in range(len(p)) if j != i], 0.3)
    assert_same_value_and_grads(ours, reference, [q, p])


def test_info_nce_default_temperature_and_known_answer():
    # Positive identical to the query, K orthogonal negatives: loss = -log(e^{1/T} / (e^{1/T} + K)).
    q = torch.eye(4, dtype=F64)[:1]
    negs = torch.eye(4, dtype=F64)[1:]
    expected = -math.log(math.exp(10) / (math.exp(10) + 3))
    assert info_nce(q, q.clone(), negs).item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_scale_invariant_and_rejects_bad_shape():
    q, p, negs = randn(3, 4, seed=11), randn(3, 4, seed=12), randn(5, 4, seed=13)
    base = info_nce(q, p, negs, 0.1)
    torch.testing.assert_close(info_nce(7 * q, 0.01 * p, 300 * negs, 0.1), base)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(q, p, torch.zeros(3, 5, 4, 1, dtype=F64), 0.1)


def test_contrastive_cross_entropy_is_mean_over_queries():
    pos, neg = randn(3, seed=14), randn(3, 4, seed=15)
    ours = contrastive_cross_entropy(pos, neg, 0.5)
    reference = torch.stack([neg_log_softmax_first([pos[i] / 0.5, *(neg[i] / 0.5)]) for i in range(3)]).mean()
    assert_same_value_and_grads(ours, reference, [pos, neg])


def test_low_precision_logits_are_upcast():
    pos, neg = torch.rand(4, dtype=torch.bfloat16), torch.rand(4, 6, dtype=torch.bfloat16)
    loss = contrastive_cross_entropy(pos, neg, 0.05)
    assert loss.dtype == torch.float32
    reference = contrastive_cross_entropy(pos.double(), neg.double(), 0.05)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


# -- NT-Xent -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_against_loop(temperature):
    z1, z2 = randn(5, 6, seed=20, scale=2.0), randn(5, 6, seed=21)
    assert_same_value_and_grads(nt_xent(z1, z2, temperature), loop_nt_xent(z1, z2, temperature), [z1, z2])


def test_nt_xent_symmetric():
    z1, z2 = randn(4, 3, seed=22), randn(4, 3, seed=23)
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), nt_xent(z2, z1, 0.2), rtol=1e-12, atol=0)


def test_nt_xent_batch_of_one_pair_has_no_negatives():
    # N = 1: each view's only other view is its positive, softmax over one logit -> loss 0.
    z1, z2 = randn(1, 3, seed=24), randn(1, 3, seed=25)
    assert nt_xent(z1, z2).item() == pytest.approx(0.0, abs=1e-12)


def test_nt_xent_stable_at_low_temperature_with_large_inputs():
    z1 = randn(8, 16, seed=26, scale=1e4, dtype=torch.float32)
    z2 = randn(8, 16, seed=27, scale=1e4, dtype=torch.float32)
    loss = nt_xent(z1, z2, 0.01)
    g1, g2 = grads(loss, [z1, z2])
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    # exp(1 / 0.01) = e^100 overflows float32; a log-sum-exp form still agrees with float64.
    reference = loop_nt_xent(z1.detach().double(), z2.detach().double(), 0.01)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


# -- gathered forms: 2 (or 4) processes vs one ---------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_gathered_nt_xent_matches_full_batch(world):
    b = 3
    z1, z2 = randn(world * b, 5, seed=30), randn(world * b, 5, seed=31)
    full = nt_xent(z1, z2, 0.3)
    full_grads = grads(full, [z1, z2])
    parts = [
        gathered_nt_xent(z1[r * b : (r + 1) * b], z2[r * b : (r + 1) * b], z1, z2, offset=r * b, temperature=0.3)
        for r in range(world)
    ]
    torch.testing.assert_close(torch.stack(parts).mean(), full, rtol=1e-12, atol=0)
    # Autograd all-gather sums each slice's gradient over processes; DDP then averages over processes.
    part_grads = [grads(part, [z1, z2]) for part in parts]
    for k, g_full in enumerate(full_grads):
        torch.testing.assert_close(sum(g[k] for g in part_grads) / world, g_full, rtol=1e-10, atol=1e-12)


def test_gathered_nt_xent_part_against_loop():
    # Rows of process 1 alone: the loop's terms for its views only.
    z1, z2 = randn(4, 3, seed=32), randn(4, 3, seed=33)
    part = gathered_nt_xent(z1[2:], z2[2:], z1, z2, offset=2, temperature=0.4)
    views, n = list(z1) + list(z2), 4
    terms = []
    for a in [2, 3, 6, 7]:
        pair = (a + n) % (2 * n)
        keys = [views[pair]] + [views[c] for c in range(2 * n) if c not in (a, pair)]
        terms.append(neg_log_softmax_first([cos(views[a], k) / 0.4 for k in keys]))
    assert_same_value_and_grads(part, torch.stack(terms).mean(), [z1, z2])


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_info_nce_matches_full_batch(world):
    b = 2
    q, k = randn(world * b, 6, seed=34), randn(world * b, 6, seed=35)
    full = info_nce(q, k, None, 0.2)
    full_grads = grads(full, [q, k])
    parts = [gathered_info_nce(q[r * b : (r + 1) * b], k, offset=r * b, temperature=0.2) for r in range(world)]
    torch.testing.assert_close(torch.stack(parts).mean(), full, rtol=1e-12, atol=0)
    part_grads = [grads(part, [q, k]) for part in parts]
    for i, g_full in enumerate(full_grads):
        torch.testing.assert_close(sum(g[i] for g in part_grads) / world, g_full, rtol=1e-10, atol=1e-12)


def test_gathered_info_nce_part_against_loop():
    q, k = randn(4, 3, seed=36), randn(4, 3, seed=37)
    part = gathered_info_nce(q[2:], k, offset=2, temperature=0.1)
    local_q = q[2:]
    reference = loop_info_nce(local_q, k[2:], lambda i: [k[j] for j in range(4) if j != i + 2], 0.1)
    assert_same_value_and_grads(part, reference, [q, k])


# -- NCE (InstDisc) --------------------------------------------------------------------------------------------
def loop_nce(pos, neg, temperature, log_z, num_data) -> torch.Tensor:
    k = neg.shape[1]
    noise = k / num_data  # K * P_n with P_n = 1 / n

    def h(s):
        p = torch.exp(s / temperature) / torch.exp(log_z)
        return p / (p + noise)

    terms = []
    for i in range(len(pos)):
        term = -torch.log(h(pos[i]))
        for j in range(k):
            term = term - torch.log(1 - h(neg[i, j]))
        terms.append(term)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("log_z_value", [0.0, 3.5, 9.0])
def test_nce_loss_against_formula(log_z_value):
    pos = randn(4, seed=40).tanh().detach().requires_grad_()
    neg = randn(4, 6, seed=41).tanh().detach().requires_grad_()
    log_z = torch.tensor(log_z_value, dtype=F64, requires_grad=True)
    ours = nce_loss(pos, neg, 0.1, log_z, num_data=50)
    reference = loop_nce(pos, neg, 0.1, log_z, 50)
    assert_same_value_and_grads(ours, reference, [pos, neg, log_z])


def test_nce_loss_finite_where_exp_overflows():
    # s / T - log Z = 1000: exp overflows even float64; the log-space form must not.
    pos = torch.ones(3, requires_grad=True)
    neg = -torch.ones(3, 5, requires_grad=True)
    loss = nce_loss(pos, neg, 0.001, torch.tensor(0.0), num_data=10)
    g_pos, g_neg = grads(loss, [pos, neg])
    assert torch.isfinite(loss) and torch.isfinite(g_pos).all() and torch.isfinite(g_neg).all()
    # h(pos) -> 1 and h(neg) -> 0: the loss vanishes.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


# -- SwAV -----------------------------------------------------------------------------------------------------
def loop_sinkhorn(scores, epsilon, iterations) -> torch.Tensor:
    """Sinkhorn-Knopp as written in SwAV's Algorithm 1, in probability space."""
    q = torch.exp(scores / epsilon).T  # [K, B]
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_against_direct_algorithm(iterations):
    scores = randn(12, 5, seed=50).tanh().detach()
    codes = sinkhorn(scores, epsilon=0.5, iterations=iterations)
    assert codes.shape == scores.shape and codes.dtype == F64
    torch.testing.assert_close(codes, loop_sinkhorn(scores, 0.5, iterations), rtol=1e-10, atol=1e-12)


def test_sinkhorn_rows_sum_to_one_and_prototypes_balance():
    scores = randn(16, 4, seed=51).tanh().detach()
    codes = sinkhorn(scores)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(16, dtype=F64), rtol=0, atol=1e-12)
    # Every prototype receives B / K of the batch once the iterations have converged.
    converged = sinkhorn(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((4,), 16 / 4, dtype=F64), rtol=0, atol=1e-6)
    # With sharp codes (small epsilon) balance comes slowly, but each added iteration brings it closer.
    imbalance = [(sinkhorn(scores, 0.05, n).sum(0) - 4).abs().max() for n in (3, 10, 30, 100)]
    assert all(a > b for a, b in itertools.pairwise(imbalance))


def test_sinkhorn_no_gradient_and_stable_for_huge_scores():
    scores = randn(8, 3, seed=52, scale=1e4, dtype=torch.float32)
    codes = sinkhorn(scores)
    assert not codes.requires_grad and codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(8), rtol=0, atol=1e-5)


def loop_swapped_prediction(scores, codes, temperature) -> torch.Tensor:
    terms = []
    for i, q in enumerate(codes):
        for j, s in enumerate(scores):
            if j == i:
                continue
            total = 0.0
            for b in range(len(s)):
                exps = torch.exp(s[b] / temperature)
                total = total - (q[b] * torch.log(exps / exps.sum())).sum()
            terms.append(total / len(s))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("num_crops", [2, 4])
def test_swapped_prediction_against_loop(num_crops):
    scores = [randn(6, 5, seed=60 + c).tanh().detach().requires_grad_() for c in range(num_crops)]
    codes = [sinkhorn(s.detach(), epsilon=0.3) for s in scores[:2]]
    ours = swapped_prediction(scores, codes, temperature=0.1)
    # 2 codes x (num_crops - 1) other crops, averaged.
    reference = loop_swapped_prediction(scores, codes, 0.1)
    assert_same_value_and_grads(ours, reference, scores)


def test_swapped_prediction_known_answer():
    # Uniform scores: every prediction is uniform over K prototypes, cross-entropy with any code = log K.
    scores = [torch.zeros(3, 7, dtype=F64) for _ in range(3)]
    codes = [sinkhorn(s) for s in scores[:2]]
    assert swapped_prediction(scores, codes).item() == pytest.approx(math.log(7), rel=1e-12)
