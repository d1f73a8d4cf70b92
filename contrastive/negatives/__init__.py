"""Where negatives come from: the dictionaries of the survey's architectures.

``batch`` needs no state (the other samples of the gathered batch). :class:`MemoryBank` (InstDisc/NPID) holds one
feature per training image; :class:`Queue` (MoCo) holds the most recent keys. Both keep their state in persistent
buffers, so it is saved in checkpoints and restored on resume, and are written identically on every process
(writes are gathered first), so DDP never needs to broadcast them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """One L2-normalised feature per training sample, addressed by the sample's index (Wu et al. 2018)."""

    def __init__(self, size: int, dim: int, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("written_at", torch.full((size,), -1, dtype=torch.long))

    def __len__(self) -> int:
        return self.features.shape[0]

    def sample_indices(self, index: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """K uniform indices per sample of the whole gathered batch (``index``), never the sample's own entry
        (on a small data set K is close to the bank size, and its own entry would be a false negative). Drawn for
        the global batch with a ``generator`` every process seeds alike, so that each process takes its rows and
        N processes draw what one process would."""
        draw = torch.randint(len(self) - 1, (len(index), k), device=index.device, generator=generator)
        return draw + (draw >= index[:, None]).long()

    @torch.no_grad()
    def update(self, index: Tensor, features: Tensor, step: int) -> None:
        """``v_i <- normalize(m * v_i + (1 - m) * f_i)`` for the batch's samples (indices of the gathered batch).
        A first write mixes in the start too (random vectors, or the encoder pass of :meth:`fill`)."""
        mixed = self.momentum * self.features[index] + (1 - self.momentum) * F.normalize(features.float(), dim=1)
        self.features[index] = F.normalize(mixed, dim=1).to(self.features.dtype)
        self.written_at[index] = step

    @torch.no_grad()
    def fill(self, index: Tensor, features: Tensor) -> None:
        """Replaces entries outright: the bank's start, from an encoder pass before training (step 0)."""
        self.features[index] = F.normalize(features.float(), dim=1).to(self.features.dtype)
        self.written_at[index] = 0


class Queue(nn.Module):
    """FIFO ring buffer of the last K keys (He et al. 2020), with the index and step of the sample behind each key.

    The indices make the dictionary measurable (staleness, false negatives); they are never used by the loss.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("written_at", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._ptr: int | None = None  # host copy of ptr: reading the buffer every step would sync with the GPU

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ptr = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, index: Tensor, step: int) -> None:
        """Replace the oldest ``len(keys)`` entries; the queue size is a multiple of the batch, so no wrap inside
        one write (checked when the config is validated)."""
        n = keys.shape[0]
        ptr = int(self.ptr) if self._ptr is None else self._ptr
        self.keys[ptr : ptr + n] = F.normalize(keys.float(), dim=1).to(self.keys.dtype)
        self.index[ptr : ptr + n] = index
        self.written_at[ptr : ptr + n] = step
        self._ptr = (ptr + n) % len(self)
        self.ptr.fill_(self._ptr)
