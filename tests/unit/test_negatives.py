"""MemoryBank and Queue: update rules on hand-made state, ring-buffer order, checkpoint round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive.negatives import MemoryBank, Queue, RingBuffer
from contrastive.negatives.prototypes import FeatureQueue

CPU = torch.device("cpu")


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# -- MemoryBank ----------------------------------------------------------------------------------------------
def test_bank_initial_state():
    bank = MemoryBank(10, 4)
    assert len(bank) == 10 and bank.features.shape == (10, 4)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(10))
    assert bank.written_at.tolist() == [-1] * 10
    assert set(bank.state_dict()) == {"features", "written_at"}


def test_bank_update_known_answer():
    # old e1, new 5 e2, m = 0.5: normalize(0.5 e1 + 0.5 e2) = (e1 + e2) / sqrt 2.
    bank = MemoryBank(3, 2, momentum=0.5)
    bank.features.copy_(unit([1, 0], [1, 0], [0, 1]))
    bank.written_at.copy_(torch.tensor([-1, 2, -1]))
    bank.update(torch.tensor([1]), torch.tensor([[0.0, 5.0]]), step=4)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(bank.features, torch.tensor([[1, 0], [s, s], [0, 1]]))
    assert bank.written_at.tolist() == [-1, 4, -1]
    # a first write mixes in the random start as well (the paper's rule, everywhere)
    bank.update(torch.tensor([0, 1]), torch.tensor([[0.0, 3.0], [0.0, 5.0]]), step=5)
    c, d = math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)  # (e1 + e2)/sqrt 2 mixed with e2: 67.5 degrees
    torch.testing.assert_close(bank.features, torch.tensor([[s, s], [c, d], [0, 1]]))
    assert bank.written_at.tolist() == [5, 5, -1]


def test_bank_update_rule_and_untouched_rows():
    m = 0.8
    bank = MemoryBank(5, 3, momentum=m)
    old = unit([1, 2, 3], [0, 1, 0], [3, -1, 2], [-2, 0, 1], [1, 1, 1])
    bank.features.copy_(old)
    bank.written_at.copy_(torch.tensor([0, 1, 2, 3, 4]))
    new = torch.tensor([[10.0, 0.0, -2.0], [0.5, 0.5, 0.0]])
    bank.update(torch.tensor([3, 1]), new, step=9)

    expected = old.clone()
    for row, f in zip([3, 1], new):
        v = m * old[row] + (1 - m) * f / f.norm()
        expected[row] = v / v.norm()
    torch.testing.assert_close(bank.features, expected)
    assert torch.equal(bank.features[[0, 2, 4]], old[[0, 2, 4]])
    assert bank.written_at.tolist() == [0, 9, 2, 9, 4]
    # A second write mixes into the already-updated row, not the original one.
    bank.update(torch.tensor([3]), new[:1], step=10)
    v = m * expected[3] + (1 - m) * new[0] / new[0].norm()
    torch.testing.assert_close(bank.features[3], v / v.norm())
    assert bank.written_at.tolist() == [0, 9, 2, 10, 4]


def test_bank_update_has_no_gradient_and_keeps_dtype():
    bank = MemoryBank(4, 3)
    feats = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    bank.update(torch.tensor([0, 2]), feats, step=0)
    assert bank.features.dtype == torch.float32 and not bank.features.requires_grad


def test_bank_sample_indices_in_range_never_self_and_cover_the_bank():
    bank = MemoryBank(7, 2)
    torch.manual_seed(0)
    own = torch.arange(16) % 7
    counts = torch.zeros(7, dtype=torch.long)
    for _ in range(50):
        idx = bank.sample_indices(own, 9)
        assert idx.shape == (16, 9) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < 7
        assert not (idx == own[:, None]).any()
        counts += torch.bincount(idx.flatten(), minlength=7)
    # 7200 draws; each slot is excluded for the rows it owns, so about 1029 each (std ~30).
    expected = 50 * 16 * 9 / 7
    assert ((counts - expected).abs() < 0.15 * expected).all(), counts


def test_bank_sample_indices_reproducible_from_the_step_generator():
    from contrastive.distributed import step_generator

    bank = MemoryBank(100, 2)
    own = torch.tensor([0, 5, 99, 42])
    a = bank.sample_indices(own, 20, step_generator(0, 3, "cpu"))
    torch.manual_seed(123)  # the global stream (augmentations, per process) does not enter the draw
    b = bank.sample_indices(own, 20, step_generator(0, 3, "cpu"))
    c = bank.sample_indices(own, 20, step_generator(0, 4, "cpu"))
    d = bank.sample_indices(own, 20, step_generator(1, 3, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_bank_state_dict_round_trip():
    bank = MemoryBank(6, 3, momentum=0.5)
    bank.update(torch.tensor([0, 5]), torch.randn(2, 3), step=12)
    restored = MemoryBank(6, 3, momentum=0.5)
    assert not torch.equal(restored.features, bank.features)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.features, bank.features)
    assert restored.written_at.tolist() == [12, -1, -1, -1, -1, 12]


# -- Queue ------------------------------------------------------------------------------------------------------
def batch(step: int, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return 3 * torch.randn(n, dim, generator=g), torch.arange(n) + 100 * step


def test_queue_initial_state():
    queue = Queue(8, 3)
    assert len(queue) == 8 and int(queue.ptr) == 0
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(8))
    assert queue.index.tolist() == [-1] * 8 and queue.written_at.tolist() == [-1] * 8
    assert set(queue.state_dict()) == {"keys", "index", "written_at", "ptr"}


def test_queue_ring_buffer_order_with_wrap_around():
    size, n, dim = 6, 2, 3
    queue = Queue(size, dim)
    keys = list(queue.keys.clone())
    index, written, ptr = [-1] * size, [-1] * size, 0
    for step in range(8):  # wraps around after 3 writes, twice over
        new_keys, new_index = batch(step, n, dim)
        queue.enqueue(new_keys, new_index, step=step)
        for j in range(n):
            keys[ptr + j] = new_keys[j] / new_keys[j].norm()
            index[ptr + j] = int(new_index[j])
            written[ptr + j] = step
        ptr = (ptr + n) % size
        torch.testing.assert_close(queue.keys, torch.stack(keys))
        assert queue.index.tolist() == index
        assert queue.written_at.tolist() == written
        assert int(queue.ptr) == ptr
    # After 8 writes of 2 into 6 slots the queue holds writes 5, 6, 7 (slots 4-5, 0-1, 2-3).
    assert queue.written_at.tolist() == [6, 6, 7, 7, 5, 5]


def test_queue_state_dict_round_trip_continues_at_the_right_slot():
    source = Queue(6, 2)
    for step in range(2):
        source.enqueue(*batch(step, 2, 2), step=step)
    assert int(source.ptr) == 4

    target = Queue(6, 2)
    # A write before loading caches the host-side pointer (2); loading must drop that cache.
    target.enqueue(*batch(99, 2, 2), step=99)
    target.load_state_dict(source.state_dict())
    assert int(target.ptr) == 4
    for name in ("keys", "index", "written_at"):
        assert torch.equal(getattr(target, name), getattr(source, name))

    for q in (source, target):
        q.enqueue(*batch(2, 2, 2), step=2)
    assert int(target.ptr) == 0
    assert target.written_at.tolist() == [0, 0, 1, 1, 2, 2]
    for name in ("keys", "index", "written_at"):
        assert torch.equal(getattr(target, name), getattr(source, name))


def test_queue_loaded_as_part_of_a_model():
    # Checkpoints restore the whole module tree, which reaches the queue through its parent.
    source = nn.ModuleDict({"queue": Queue(4, 2)})
    source["queue"].enqueue(*batch(0, 2, 2), step=0)
    target = nn.ModuleDict({"queue": Queue(4, 2)})
    target["queue"].enqueue(*batch(1, 2, 2), step=1)
    target["queue"].enqueue(*batch(2, 2, 2), step=2)  # cached pointer back at 0
    target.load_state_dict(source.state_dict())
    target["queue"].enqueue(*batch(3, 2, 2), step=3)
    assert target["queue"].written_at.tolist() == [0, 0, 3, 3]
    assert int(target["queue"].ptr) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_queue_stores_normalised_keys_without_gradient(dtype):
    queue = Queue(4, 3)
    keys = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    queue.enqueue(keys, torch.tensor([7, 8]), step=0)
    assert queue.keys.dtype == torch.float32 and not queue.keys.requires_grad
    torch.testing.assert_close(queue.keys[:2], F.normalize(keys.detach().float(), dim=1))


# -- the ring buffer MoCo's queue and SwAV's feature queue share ----------------------------------------------------
def test_one_ring_buffer_behind_both_queues():
    assert issubclass(Queue, RingBuffer) and issubclass(FeatureQueue, RingBuffer)


def test_ring_on_its_second_axis_counts_filled_slots_and_wraps():
    ring = FeatureQueue(crops=2, size=6, dim=3)
    writes = [torch.full((2, 3, 3), float(i)) for i in range(3)]
    ring.enqueue(writes[0])
    assert (int(ring.ptr), int(ring.filled), ring.full) == (3, 3, False)
    ring.enqueue(writes[1])
    assert (int(ring.ptr), int(ring.filled), ring.full) == (0, 6, True)
    ring.enqueue(writes[2])  # overwrites the oldest slots, of every crop's row
    assert ring.features[:, :3].eq(2).all() and ring.features[:, 3:].eq(1).all()
    assert (int(ring.ptr), int(ring.filled)) == (3, 6)


def test_ring_refuses_a_write_that_would_wrap():
    queue = Queue(4, 2)
    queue.enqueue(torch.randn(3, 2), torch.arange(3), step=0)
    with pytest.raises(ValueError, match="would wrap a ring of 4"):
        queue.enqueue(torch.randn(3, 2), torch.arange(3), step=1)
