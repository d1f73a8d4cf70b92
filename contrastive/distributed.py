"""Collectives that are no-ops on one process, so methods read the same with 1 or N processes."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.distributed.nn.functional import all_gather as _all_gather_autograd


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def seed_process_streams(seed: int) -> None:
    """Give each process its own global RNG stream, ``seed + rank``, so the augmentations of the samples at the same
    position on two processes differ. Rank 0 keeps ``seed``, so one-process runs are unchanged. Draws that every
    process must agree on do not use this stream: see :func:`step_generator` and :func:`shared_permutation`."""
    torch.manual_seed(seed + rank())


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """A generator that every process builds alike for a given seed and step: for draws made for the whole global
    batch (the bank's negatives), so N processes draw what one process would, and a resumed run what it drew."""
    # the CPU generator keeps only 32 bits of a seed: hash the pair into them rather than let seeds alias
    mixed = int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest(), "little")
    return torch.Generator(device=device).manual_seed(mixed)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes along dim 0, keeping the graph.

    The backward of the autograd all-gather sums each slice's gradient over processes; with DDP's averaging
    that gives exactly the gradient of the loss over the global batch (a plain ``all_gather`` has no backward).
    """
    if not is_distributed():
        return x
    return torch.cat(_all_gather_autograd(x.contiguous()), dim=0)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes along dim 0, without gradient (equal shapes required)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    if is_distributed():
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    if is_distributed():
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def global_logsumexp(x: Tensor, dim: int) -> Tensor:
    """logsumexp along ``dim`` of the tensor concatenated over processes on that dim (keepdim)."""
    local = torch.logsumexp(x, dim=dim, keepdim=True)
    if not is_distributed():
        return local
    peak = all_reduce_max(local)
    return peak + torch.log(all_reduce_sum(torch.exp(local - peak)))


@torch.no_grad()
def shared_permutation(n: int, device: torch.device) -> Tensor:
    """A random permutation of ``n`` that every process agrees on (drawn on rank 0, broadcast)."""
    perm = torch.randperm(n, device=device)
    if is_distributed():
        tdist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def shuffle_across_processes(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN: gather the batch, permute it globally, and hand each process a slice.

    Returns the local slice of the shuffled global batch and the permutation needed by
    :func:`unshuffle_across_processes`.
    """
    everything = gather(x)
    perm = shared_permutation(len(everything), x.device)
    n = len(x)
    return everything[perm[rank() * n : (rank() + 1) * n]], perm


@torch.no_grad()
def unshuffle_across_processes(y: Tensor, perm: Tensor) -> Tensor:
    """Undo :func:`shuffle_across_processes` on the outputs ``y`` computed from the shuffled slice."""
    everything = gather(y)
    restored = torch.empty_like(everything)
    restored[perm] = everything
    n = len(y)
    return restored[rank() * n : (rank() + 1) * n]
