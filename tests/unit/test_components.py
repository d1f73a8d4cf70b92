"""Each component of a method built alone, from explicit arguments, with no LightningModule around it: the sources of
negatives, the momentum key encoder and SwAV's prototypes. Their losses against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive import losses
from contrastive.distributed import step_generator
from contrastive.models.key_encoder import MomentumEncoder, cosine_ramp
from contrastive.negatives import BankNegatives, BatchNegatives, QueueNegatives
from contrastive.negatives.base import Step
from contrastive.negatives.prototypes import Prototypes

F64 = torch.float64


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64), dim=-1)


def nce_by_hand(q: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], t: float) -> float:
    """Mean over queries of -log(exp(q.k+/t) / (exp(q.k+/t) + sum exp(q.k-/t))), negatives per query."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ positive[i]) / t)
        total -= math.log(pos / (pos + sum(math.exp(float(q[i] @ n) / t) for n in negatives[i])))
    return total / len(q)


def step(n: int, first: int = 0, global_step: int = 0, labels=None, train_labels=None) -> Step:
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    return Step(torch.arange(first, first + n), labels, global_step, seed=0, train_labels=train_labels)


# -- the queue ---------------------------------------------------------------------------------------------------
def test_queue_source_loss_is_info_nce_against_the_queue_before_the_step_then_enqueues():
    source = QueueNegatives(size=8, dim=4, temperature=0.2).double()
    before = source.queue.keys.clone()
    q0, q1, k0, k1 = (unit(4, 4, seed=s) for s in range(4))
    loss, logs = source.loss({0: q0, 1: q1}, {0: k0, 1: k1}, step(4, global_step=3))
    expected = (nce_by_hand(q0, k1, [before] * 4, 0.2) + nce_by_hand(q1, k0, [before] * 4, 0.2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert logs == {}  # no labels of the training set: no false-negative rate
    # the keys of view 1 took the oldest slots, with their indices and step
    torch.testing.assert_close(source.queue.keys[:4], k1)
    assert source.queue.index[:4].tolist() == [0, 1, 2, 3] and (source.queue.written_at[:4] == 3).all()
    assert torch.equal(source.queue.keys[4:], before[4:]) and int(source.queue.ptr) == 4


def test_queue_source_counts_false_negatives_from_the_training_labels():
    source = QueueNegatives(size=4, dim=4, temperature=0.2).double()
    source.queue.index.copy_(torch.tensor([0, 1, 2, 3]))
    train_labels = torch.tensor([0, 0, 1, 1, 0, 1])
    q, k = unit(2, 4, seed=0), unit(2, 4, seed=1)
    labels = torch.tensor([0, 1])  # each query has 2 of the 4 queued samples in its class
    _, logs = source.loss({0: q}, {1: k}, step(2, first=4, global_step=1, labels=labels, train_labels=train_labels))
    assert float(logs["false_negative_rate"]) == pytest.approx(0.5)


# -- the bank ----------------------------------------------------------------------------------------------------
def test_bank_source_one_view_positive_is_the_stored_entry_and_the_bank_moves_with_momentum():
    source = BankNegatives(size=20, dim=4, temperature=0.1, momentum=0.5, num_negatives=5).double()
    before = source.bank.features.clone()
    q = unit(3, 4, seed=0)
    index = torch.tensor([2, 7, 11])
    s = Step(index, torch.zeros(3, dtype=torch.long), global_step=4, seed=0)
    loss, _ = source.loss({0: q}, {0: q}, s)
    drawn = source.bank.sample_indices(index, 5, step_generator(0, 4, "cpu"))  # what the step drew
    assert not (drawn == index[:, None]).any()  # never the sample's own entry
    expected = nce_by_hand(q, before[index], [before[row] for row in drawn], 0.1)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    mixed = F.normalize(0.5 * before[index] + 0.5 * q, dim=1)
    torch.testing.assert_close(source.bank.features[index], mixed)
    assert (source.bank.written_at[index] == 4).all() and (source.bank.written_at >= 0).sum() == 3


def test_bank_source_starts_from_an_encoder_pass_once():
    source = BankNegatives(size=6, dim=4, temperature=0.1, init="encoder")
    assert source.needs_fill()
    source.bank.fill(torch.arange(6), torch.randn(6, 4))
    assert not source.needs_fill() and not BankNegatives(size=6, dim=4, temperature=0.1, init="random").needs_fill()


# -- the batch ---------------------------------------------------------------------------------------------------
def test_batch_source_is_nt_xent_with_shared_keys_and_info_nce_over_the_batch_with_momentum_keys():
    z1, z2 = unit(5, 4, seed=0), unit(5, 4, seed=1)
    shared = BatchNegatives(temperature=0.5, shared_keys=True)
    loss, _ = shared.loss({0: z1, 1: z2}, {0: z1, 1: z2}, step(5))
    assert float(loss) == pytest.approx(float(losses.nt_xent(z1, z2, 0.5)), rel=1e-6)
    k1, k2 = unit(5, 4, seed=2), unit(5, 4, seed=3)
    momentum = BatchNegatives(temperature=0.5, shared_keys=False)
    loss, _ = momentum.loss({0: z1, 1: z2}, {0: k1, 1: k2}, step(5))
    others = [[k2[j] for j in range(5) if j != i] for i in range(5)]
    others_1 = [[k1[j] for j in range(5) if j != i] for i in range(5)]
    expected = (nce_by_hand(z1, k2, others, 0.5) + nce_by_hand(z2, k1, others_1, 0.5)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# -- the momentum key encoder ------------------------------------------------------------------------------------
def small_path() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 4)


def test_momentum_encoder_is_an_ema_of_the_query_path_and_its_schedule_ramps_to_one():
    backbone, projector = small_path()
    key = MomentumEncoder(backbone, projector, momentum=0.9, schedule="cosine", shuffle_bn=False)
    assert all(not p.requires_grad for p in key.parameters())
    old = [p.clone() for p in key.parameters()]
    with torch.no_grad():
        for p in [*backbone.parameters(), *projector.parameters()]:
            p.add_(1.0)
    key.update(backbone, projector, progress=0.5)
    for k_old, k_new, q in zip(old, key.parameters(), [*backbone.parameters(), *projector.parameters()]):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert float(key.momentum) == pytest.approx(cosine_ramp(0.9, 1.0, 0.5)) and float(key.momentum) > 0.9
    x = torch.randn(10, 6)
    key.eval()
    torch.testing.assert_close(key(x), key.projector(key.backbone(x)))


def test_momentum_encoder_refuses_a_bad_momentum_naming_the_key():
    backbone, projector = small_path()
    with pytest.raises(ValueError, match=r"method\.momentum=1\.5 must be in \[0, 1\]"):
        MomentumEncoder(backbone, projector, momentum=1.5)


# -- the prototypes ----------------------------------------------------------------------------------------------
def test_prototypes_are_unit_scores_and_balanced_codes():
    prototypes = Prototypes(dim=4, num=6, epsilon=0.05, iterations=3, freeze_steps=2)
    torch.testing.assert_close(prototypes.weight.norm(dim=1), torch.ones(6))
    z = F.normalize(torch.randn(12, 4), dim=1)
    scores = prototypes(z)
    torch.testing.assert_close(scores, z @ prototypes.weight.T)
    (codes,) = prototypes.codes([scores.detach()], epoch=0)
    torch.testing.assert_close(codes, losses.sinkhorn(scores.detach(), 0.05, 3))
    torch.testing.assert_close(codes.sum(1), torch.ones(12))
    assert prototypes.frozen(1) and not prototypes.frozen(2)
    with pytest.raises(ValueError, match=r"method\.num_prototypes=1 must be >= 2"):
        Prototypes(dim=4, num=1)
