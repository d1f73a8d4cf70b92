"""Encoder drift of a dictionary's stored keys: how far the key encoder has moved since a key was written, on the
exact view that key was computed from, with batch norm in the same (eval) mode at both times, so that neither the
augmentation nor the batch statistics count as staleness.

A few times per epoch the probe keeps the first rows of the view batch whose keys were written to the dictionary,
with their eval-mode keys at that step. At measurement the same views are encoded again; ``drift = 1 - cosine``
over the snapshots still inside the dictionary's window (a bank holds keys up to one epoch old, a queue up to
``queue_size / batch`` steps). Nothing here touches training: no gradient, no BN statistics, no random draws.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class DriftProbe:
    def __init__(self, slots: int = 16, rows: int = 16) -> None:
        if slots < 1 or rows < 1:
            raise ValueError(f"a drift probe needs slots >= 1 and rows >= 1, got {slots}, {rows}")
        self.slots, self.rows = slots, rows
        self.views: Tensor | None = None  # [slots, rows, C, H, W]: the exact inputs of the stored keys
        self.refs: Tensor | None = None  # [slots, rows, D]: their eval-mode keys when they were written
        self.steps = torch.full((slots,), -1, dtype=torch.long)  # host-side: when each slot was written
        self.next = 0

    @torch.no_grad()
    def record(self, step: int, views: Tensor, key_net: Callable[[Tensor], Tensor]) -> None:
        """Keep the first rows of ``views`` and their keys under ``key_net`` (which the caller runs in eval mode)."""
        x = views[: self.rows].detach()
        ref = key_net(x).float()
        if self.views is None or self.views.shape[1:] != (self.rows, *x.shape[1:]):
            self.views = x.new_zeros((self.slots, self.rows, *x.shape[1:]))
            self.refs = ref.new_zeros((self.slots, self.rows, ref.shape[1]))
            self.steps.fill_(-1)
        if len(x) < self.rows:  # a short batch: repeat its rows (the cosines are the same)
            reps = -(-self.rows // len(x))
            x, ref = x.repeat(reps, *[1] * (x.dim() - 1))[: self.rows], ref.repeat(reps, 1)[: self.rows]
        self.views[self.next] = x
        self.refs[self.next] = ref
        self.steps[self.next] = step
        self.next = (self.next + 1) % self.slots

    @torch.no_grad()
    def measure(self, step: int, key_net: Callable[[Tensor], Tensor], window: int) -> dict[str, float]:
        """Mean drift (1 - cosine) and age in steps of the snapshots younger than ``window`` steps."""
        if self.views is None:
            return {}
        keep = [i for i, s in enumerate(self.steps.tolist()) if s >= 0 and step - s < window]
        if not keep:
            return {}
        views, refs = self.views[keep].flatten(0, 1), self.refs[keep].flatten(0, 1)
        now = key_net(views).float()
        cos = F.cosine_similarity(now, refs.to(now.device), dim=1)
        ages = (step - self.steps[keep]).float()
        return {
            "drift": float(1 - cos.mean()),
            "drift_age_steps": float(ages.mean()),
            "drift_samples": float(len(views)),
        }

    def state_dict(self) -> dict[str, object]:
        return {"views": self.views, "refs": self.refs, "steps": self.steps, "next": self.next}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.views, self.refs = state["views"], state["refs"]
        self.steps, self.next = state["steps"].clone(), int(state["next"])
