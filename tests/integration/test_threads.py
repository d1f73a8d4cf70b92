"""ThreadGovernor: fewer torch threads while other processes keep cores busy, all of them back when they leave."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from contrastive.callbacks import ThreadGovernor


def test_threads_follow_the_cores_other_processes_leave(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        governor = ThreadGovernor(interval=0.0)
        # (wall s, machine busy CPU-s, this process's CPU-s): each interval 1 s; others = busy - own
        samples = iter([(0, 0, 0), (1, 2.0, 2.0), (2, 4.0, 3.0), (3, 6.0, 4.0), (4, 7.7, 5.5), (5, 9.6, 7.5)])
        monkeypatch.setattr(ThreadGovernor, "sample", staticmethod(lambda: next(samples)))
        trainer, module = SimpleNamespace(global_step=0), SimpleNamespace(device=torch.device("cpu"))
        seen = []
        for step in range(6):
            trainer.global_step = step
            governor.on_train_batch_end(trainer, module, None, None, step)
            seen.append(torch.get_num_threads())
        # others: -, 0 cores, 1 core, 1 core, 0.2 cores (gone), 0.1
        assert seen == [2, 2, 1, 1, 2, 2]
        assert governor.changes == [(2, 1), (4, 2)]
        torch.set_num_threads(1)
        governor.on_train_end(trainer, module)
        assert torch.get_num_threads() == 2  # evaluation after training gets every thread back
    finally:
        torch.set_num_threads(before)


def test_governor_leaves_single_threads_and_gpus_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(ThreadGovernor, "sample", staticmethod(lambda: calls.append(1)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ThreadGovernor(interval=0.0).on_train_batch_end(
            None, SimpleNamespace(device=torch.device("cpu")), None, None, 0
        )
        torch.set_num_threads(2)
        ThreadGovernor(interval=0.0).on_train_batch_end(
            None, SimpleNamespace(device=torch.device("cuda")), None, None, 0
        )
    finally:
        torch.set_num_threads(before)
    assert calls == []


def test_the_sample_reads_this_machine():
    sample = ThreadGovernor.sample()
    assert sample is not None and sample[1] > 0 and sample[2] > 0
