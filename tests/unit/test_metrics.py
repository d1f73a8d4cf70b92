"""Metrics on hand-built features: known answers and direct loop computations."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive.metrics import (
    alignment,
    embedding_std,
    false_negative_rate,
    fewshot_indices,
    fewshot_knn_accuracy,
    fewshot_linear_accuracy,
    knn_accuracy,
    knn_predict,
    linear_accuracy,
    train_linear_classifier,
    uniformity,
)


def at_angles(degrees: list[float], radius: float = 1.0) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (radius * torch.stack([rad.cos(), rad.sin()], dim=1)).float()


def clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    """Tight Gaussian clusters around orthogonal directions: well separated for small ``noise``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = torch.eye(dim)[labels] * 5 + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


# -- kNN ---------------------------------------------------------------------------------------------------
def test_knn_hand_built_clusters():
    bank = at_angles([-5, 0, 5, 85, 90, 95, 175, 180, 185])
    bank_labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    query = at_angles([10, 80, 200, 350])
    preds = knn_predict(query, bank, bank_labels, num_classes=3, k=3)
    assert preds.tolist() == [0, 1, 2, 0]


def test_knn_weighting_can_overrule_majority():
    # Query at 0 degrees. Its 3 nearest neighbours: one of class 1 at 0 degrees (cosine 1), two of class 0 at
    # +-60 degrees (cosine 0.5 each). A class-2 entry at 180 degrees lies outside the top 3. Vector lengths
    # differ wildly: only directions may count.
    bank = torch.cat([at_angles([0], radius=0.01), at_angles([60, -60], radius=100.0), at_angles([180])])
    bank_labels = torch.tensor([1, 0, 0, 2])
    query = at_angles([0], radius=50.0)

    # T = 0.1: class 1 gets exp(1 / 0.1) = 22026.5, class 0 gets 2 exp(0.5 / 0.1) = 296.8 -> class 1,
    # against the plain majority (two votes for class 0).
    assert math.exp(10) > 2 * math.exp(5)
    assert knn_predict(query, bank, bank_labels, num_classes=3, k=3, temperature=0.1).tolist() == [1]
    # T = 10: exp(0.1) = 1.105 against 2 exp(0.05) = 2.103 -> class 0, the majority.
    assert math.exp(0.1) < 2 * math.exp(0.05)
    assert knn_predict(query, bank, bank_labels, num_classes=3, k=3, temperature=10.0).tolist() == [0]
    # T = 0.005: exp(200) overflows float32; the vote must still go to class 1.
    assert knn_predict(query, bank, bank_labels, num_classes=3, k=3, temperature=0.005).tolist() == [1]
    # k = 4 adds the class-2 entry (cosine -1): it must not change the vote.
    assert knn_predict(query, bank, bank_labels, num_classes=3, k=4, temperature=0.1).tolist() == [1]


def test_knn_k_capped_at_bank_size():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(5, 4, generator=g), torch.randn(30, 4, generator=g)
    bank_labels = torch.tensor([0, 1, 2, 1, 0])
    capped = knn_predict(query, bank, bank_labels, num_classes=3, k=200, temperature=0.5)
    assert torch.equal(capped, knn_predict(query, bank, bank_labels, num_classes=3, k=5, temperature=0.5))


def test_knn_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    bank_labels = torch.randint(0, 5, (37,), generator=g)
    whole = knn_predict(query, bank, bank_labels, num_classes=5, k=6, chunk_size=4096)
    for chunk_size in (1, 7, 50):
        assert torch.equal(knn_predict(query, bank, bank_labels, 5, k=6, chunk_size=chunk_size), whole)


def test_knn_accuracy_percent():
    bank = at_angles([0, 2, 90, 92])
    bank_labels = torch.tensor([0, 0, 1, 1])
    query = at_angles([1, 3, 89, 91])
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([0, 0, 1, 0]), 2, k=2) == pytest.approx(75.0)


# -- few-shot ----------------------------------------------------------------------------------------------
def test_fewshot_indices_counts_and_seeding():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3 + [-1] * 4)[
        torch.randperm(27, generator=torch.Generator().manual_seed(0))
    ]
    idx = fewshot_indices(labels, shots=5, seed=3)
    assert len(idx.unique()) == len(idx)
    assert torch.bincount(labels[idx]).tolist() == [5, 5, 3]  # all of class 2, none unlabelled
    assert torch.equal(idx, fewshot_indices(labels, shots=5, seed=3))
    assert any(not torch.equal(idx, fewshot_indices(labels, shots=5, seed=s)) for s in range(4, 8))
    assert torch.bincount(labels[fewshot_indices(labels, shots=1, seed=0)]).tolist() == [1, 1, 1]


def test_fewshot_knn_one_shot_separated_clusters():
    train, train_labels = clusters(20, 4, 8, noise=0.3, seed=0)
    val, val_labels = clusters(10, 4, 8, noise=0.3, seed=1)
    assert fewshot_knn_accuracy(train, train_labels, val, val_labels, 4, shots=1) == pytest.approx(100.0)


def test_fewshot_knn_bank_is_the_subset():
    # Four class-0 samples at 0 degrees, one class-1 sample at 90; the query at 50 degrees is class 1.
    # T = 1, all neighbours vote. Full bank: class 0 gets 4 exp(cos 50) = 7.61, class 1 exp(cos 40) = 2.15 ->
    # wrong. One shot per class: exp(cos 50) = 1.90 against 2.15 -> right, whichever seed.
    train = at_angles([0, 0, 0, 0, 90])
    train_labels = torch.tensor([0, 0, 0, 0, 1])
    query, query_labels = at_angles([50]), torch.tensor([1])
    c50, c40 = math.cos(math.radians(50)), math.cos(math.radians(40))
    assert 4 * math.exp(c50) > math.exp(c40) > math.exp(c50)
    assert knn_accuracy(train, train_labels, query, query_labels, 2, temperature=1.0) == 0.0
    acc = fewshot_knn_accuracy(train, train_labels, query, query_labels, 2, shots=1, temperature=1.0)
    assert acc == pytest.approx(100.0)


# -- linear ------------------------------------------------------------------------------------------------
def test_linear_separable_data_near_perfect():
    train, train_labels = clusters(60, 3, 6, noise=0.5, seed=0)
    val, val_labels = clusters(30, 3, 6, noise=0.5, seed=1)
    # A large scale and offset: the standardisation must be folded into the returned layer.
    train, val = train * 1000 + 50, val * 1000 + 50
    assert linear_accuracy(train, train_labels, val, val_labels, 3, epochs=30) >= 99.0


def test_linear_classifier_applies_to_raw_features():
    # Features are centred and rescaled by one scalar before the fit, so a shifted and scaled copy gives the
    # same fit; the returned layers, each applied to its own raw features, must give the same logits.
    train, labels = clusters(20, 3, 5, noise=2.0, seed=0)
    val, _ = clusters(10, 3, 5, noise=2.0, seed=1)
    a = train_linear_classifier(train, labels, 3, epochs=10, batch_size=16)
    b = train_linear_classifier(train * 7 - 3, labels, 3, epochs=10, batch_size=16)
    assert torch.allclose(a(val), b(val * 7 - 3), atol=1e-3)
    assert not torch.allclose(a(val), a(val * 7 - 3), atol=1e-1)


def test_linear_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    train_labels, val_labels = (
        torch.randint(0, 4, (400,), generator=g),
        torch.randint(0, 4, (400,), generator=g),
    )
    assert 15.0 <= linear_accuracy(train, train_labels, val, val_labels, 4, epochs=30) <= 35.0


def test_linear_classifier_deterministic_and_usable_under_inference_mode():
    train, labels = clusters(20, 3, 5, noise=1.0, seed=0)
    a = train_linear_classifier(train, labels, 3, epochs=5, batch_size=8, seed=0)
    b = train_linear_classifier(train, labels, 3, epochs=5, batch_size=8, seed=0)
    c = train_linear_classifier(train, labels, 3, epochs=5, batch_size=8, seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    with torch.inference_mode():
        d = train_linear_classifier(train, labels, 3, epochs=5, batch_size=8, seed=0)
    assert torch.equal(a.weight, d.weight)


def test_fewshot_linear_one_shot_separated_clusters():
    train, train_labels = clusters(20, 4, 8, noise=0.3, seed=0)
    val, val_labels = clusters(10, 4, 8, noise=0.3, seed=1)
    acc = fewshot_linear_accuracy(train, train_labels, val, val_labels, 4, shots=1, seeds=range(3), epochs=20)
    assert acc == pytest.approx(100.0)


# -- alignment / uniformity --------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_alignment_matches_loop(alpha):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    total = 0.0
    for a, b in zip(z1.tolist(), z2.tolist()):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        total += math.sqrt(sum((x / na - y / nb) ** 2 for x, y in zip(a, b))) ** alpha
    assert alignment(z1, z2, alpha=alpha).item() == pytest.approx(total / 6, rel=1e-5)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_loop(t):
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)) * 2
    u = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in z.tolist()]
    terms = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(u[i], u[j]))) for i in range(7) for j in range(i + 1, 7)]
    assert uniformity(z, t=t).item() == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)


def test_uniformity_identical_and_spread_points():
    same = torch.tensor([[1.0, 2.0, 2.0]]).repeat(5, 1) * torch.arange(1, 6).unsqueeze(1)
    assert uniformity(same).item() == pytest.approx(0.0, abs=1e-5)
    # +-e1, +-e2: two antipodal pairs (squared distance 4) and four orthogonal pairs (squared distance 2).
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = math.log((2 * math.exp(-8) + 4 * math.exp(-4)) / 6)
    assert expected < 0
    assert uniformity(spread).item() == pytest.approx(expected, rel=1e-5)


# -- false negatives ---------------------------------------------------------------------------------------
def test_false_negative_rate_shared_negatives():
    query_labels = torch.tensor([0, 1, 2])
    negatives = torch.tensor([0, 0, 1, -1, 2, 2, 2])  # 6 known labels
    expected = (2 / 6 + 1 / 6 + 3 / 6) / 3
    assert false_negative_rate(query_labels, negatives).item() == pytest.approx(expected)


def test_false_negative_rate_per_query_with_unknown_labels():
    query_labels = torch.tensor([0, 1, 2, -1])
    negatives = torch.tensor(
        [
            [0, 1, -1, 0],  # 2 of 3 known
            [-1, -1, -1, -1],  # nothing known: left out
            [2, 0, 1, 1],  # 1 of 4
            [0, 0, 0, 0],  # unknown query label: left out
        ]
    )
    assert false_negative_rate(query_labels, negatives).item() == pytest.approx((2 / 3 + 1 / 4) / 2)


# -- spread -----------------------------------------------------------------------------------------------
def test_embedding_std():
    collapsed = torch.tensor([[3.0, 4.0]]) * torch.arange(1, 9).unsqueeze(1)
    assert embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # Rows e1 and e2: each coordinate takes 1 and 0, a population std of 0.5.
    assert embedding_std(torch.eye(2)).item() == pytest.approx(0.5)
    spread = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    assert embedding_std(spread).item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
