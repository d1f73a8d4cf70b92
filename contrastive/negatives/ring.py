"""The ring buffer behind MoCo's queue of keys and SwAV's queue of features: named storage tensors whose slots
(along ``slot_dim``) are overwritten oldest first.

State lives in persistent buffers, so a checkpoint saves it and a resumed run continues it. A host copy of the write
pointer (and of the count of written slots) spares a device sync per write.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RingBuffer(nn.Module):
    def __init__(self, storage: dict[str, Tensor], slot_dim: int = 0, count_filled: bool = False):
        super().__init__()
        for name, tensor in storage.items():
            self.register_buffer(name, tensor)
        self._names, self._slot_dim, self._count_filled = tuple(storage), slot_dim, count_filled
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        if count_filled:
            self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._host: tuple[int, int] | None = None  # (ptr, filled), read from the buffers once

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    @property
    def capacity(self) -> int:
        return getattr(self, self._names[0]).shape[self._slot_dim]

    def _state(self) -> tuple[int, int]:
        if self._host is None:
            filled = int(self.filled) if self._count_filled else 0
            self._host = (int(self.ptr), filled)
        return self._host

    @property
    def full(self) -> bool:
        """Every slot written once (needs ``count_filled``)."""
        return self._state()[1] >= self.capacity

    @torch.no_grad()
    def write(self, **values: Tensor | int) -> None:
        """Overwrite the oldest ``n`` slots of each named storage with ``values`` (tensors with ``n`` slots, or a
        number for every slot). The capacity is a multiple of ``n`` (checked with the config), so a write never
        wraps."""
        first = next(v for v in values.values() if isinstance(v, Tensor))
        n = first.shape[self._slot_dim]
        ptr, filled = self._state()
        if ptr + n > self.capacity:
            raise ValueError(
                f"a write of {n} slots at {ptr} would wrap a ring of {self.capacity}: its size must be a "
                "multiple of the batch"
            )
        for name, value in values.items():
            slots = getattr(self, name).narrow(self._slot_dim, ptr, n)
            if isinstance(value, Tensor):
                slots.copy_(value)
            else:
                slots.fill_(value)
        self._host = ((ptr + n) % self.capacity, min(filled + n, self.capacity))
        self.ptr.fill_(self._host[0])
        if self._count_filled:
            self.filled.fill_(self._host[1])
