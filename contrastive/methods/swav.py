"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-balanced prototype codes between crops.

There are no explicit negatives: a set of learnable prototypes is the dictionary, and the equipartition constraint
of :func:`contrastive.losses.sinkhorn` keeps the codes from sending every sample to one prototype. Multi-crop: the
``num_views`` large crops give the codes; every crop, small ones included, predicts the codes of the other crops.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive import distributed as dist
from contrastive import losses
from contrastive.config import ConfigError
from contrastive.methods.base import ContrastiveMethod, StepOutput


class FeatureQueue(nn.Module):
    """This process's FIFO of past large-crop embeddings, one row of ``size`` slots per large crop (the paper's
    queue, which enlarges the set Sinkhorn balances when batches are small).

    Persistent buffers, so the queue is saved in checkpoints and restored on resume. ``filled`` counts written
    slots; a host copy of the pointer and the count spares a device sync per step.
    """

    def __init__(self, crops: int, size: int, dim: int):
        super().__init__()
        self.register_buffer("features", torch.zeros(crops, size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._host: tuple[int, int] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    @property
    def size(self) -> int:
        return self.features.shape[1]

    def _state(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.ptr), int(self.filled))
        return self._host

    @property
    def full(self) -> bool:
        return self._state()[1] >= self.size

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor) -> None:
        """``embeddings`` ``[crops, n, D]`` replace each row's oldest ``n`` slots; ``size`` is a multiple of ``n``
        (checked when the method is built), so one write never wraps."""
        n = embeddings.shape[1]
        ptr, filled = self._state()
        self.features[:, ptr : ptr + n] = embeddings.to(self.features.dtype)
        self._host = ((ptr + n) % self.size, min(filled + n, self.size))
        self.ptr.fill_(self._host[0])
        self.filled.fill_(self._host[1])


def normalised_entropy(counts: Tensor) -> Tensor:
    """Entropy of the distribution ``counts / counts.sum()`` divided by ``ln(len(counts))``: 1 = uniform usage,
    0 = a single bin."""
    p = counts.double() / counts.sum().clamp_min(1)
    return -torch.special.xlogy(p, p).sum() / math.log(len(counts))


class SwAV(ContrastiveMethod):
    negatives_source = "prototypes"
    collapse_patience = 3  # consecutive per-epoch checks before the collapse alarm
    collapse_entropy = 0.1  # normalised usage entropy of the codes' argmax below which the codes have collapsed

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        m = self.cfg.method
        self._check_config()
        self.prototypes = nn.Linear(m.proj_out_dim, m.num_prototypes, bias=False)
        self.queue = FeatureQueue(m.num_views, m.queue_size, m.proj_out_dim) if m.queue_size > 0 else None
        self.normalize_prototypes()
        # -1 (one epoch) is resolved when training starts and the epoch length is known
        self._freeze_until = max(int(m.freeze_prototypes_steps), 0)
        self._usage: Tensor | None = None
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        self._collapse_streak = 0
        self._alarmed = False

    def _check_config(self) -> None:
        m, batch = self.cfg.method, self.cfg.data.batch_size
        if m.num_prototypes < 2:
            raise ConfigError(f"method.num_prototypes={m.num_prototypes} must be >= 2")
        if m.sinkhorn_epsilon <= 0 or m.sinkhorn_iterations < 1:
            raise ConfigError(f"method.sinkhorn_epsilon={m.sinkhorn_epsilon} must be > 0 and "
                              f"method.sinkhorn_iterations={m.sinkhorn_iterations} >= 1")
        if m.num_views + m.num_small_views < 2:
            raise ConfigError(f"method.num_views={m.num_views} + method.num_small_views={m.num_small_views}: "
                              "swapped prediction needs at least 2 crops")
        if m.queue_size < 0 or m.queue_size % batch:
            raise ConfigError(f"method.queue_size={m.queue_size} must be 0 (no queue) or a positive multiple of "
                              f"data.batch_size={batch} (the queue is per process), or entries are silently dropped")

    # -- prototypes ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def prototypes_frozen(self) -> bool:
        """Whether the coming optimiser step leaves the prototypes where they are."""
        return self.global_step < self._freeze_until

    def on_train_start(self) -> None:
        if self.cfg.method.freeze_prototypes_steps < 0:
            trainer = self.trainer
            self._freeze_until = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)

    def on_after_backward(self) -> None:
        # no gradient at all (rather than a zero one): the optimiser then skips the prototypes entirely, so weight
        # decay and momentum cannot move them either
        if self.prototypes_frozen():
            self.prototypes.weight.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken; renormalise only if that step moved the prototypes
        if self.global_step > self._freeze_until:
            self.normalize_prototypes()

    # -- the step --------------------------------------------------------------------------------------------
    def contrastive_loss(self, views: list[Tensor], index: Tensor, labels: Tensor) -> StepOutput:
        m = self.cfg.method
        if not self.prototypes_frozen():
            self.normalize_prototypes()
        n, large = len(index), m.num_views
        # as SwAV's official model: one backbone call per resolution (its BN statistics over all crops of a size),
        # then one head call over every crop's features (the head's BN statistics over all crops together)
        feats = [self.backbone(torch.cat(views[:large]))]
        if len(views) > large:
            feats.append(self.backbone(torch.cat(views[large:])))
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)
        scores = list(self.prototypes(z).split(n))
        codes = self.codes([s.detach() for s in scores[:large]])
        loss = losses.swapped_prediction(scores, codes, m.temperature)
        if self.queue is not None and self.current_epoch >= m.queue_start_epoch:
            # filled from its start epoch on, as the official code creates it then: it is used once full, so its
            # first use holds no embedding from before that epoch
            self.queue.enqueue(z[: large * n].detach().view(large, n, -1))
        self._track(loss, codes)
        return StepOutput(loss=loss, features=feats[0][:n], logs={})

    def queue_active(self) -> bool:
        return (
            self.queue is not None and self.current_epoch >= self.cfg.method.queue_start_epoch and self.queue.full
        )

    @torch.no_grad()
    def codes(self, scores: list[Tensor]) -> list[Tensor]:
        """Sinkhorn codes of each large crop's scores ``[n, K]``; with the queue active, the queue's scores against
        the current prototypes join the balanced set and only the batch's rows are kept. In float32 whatever the
        autocast: exponentials at ``1 / epsilon`` do not survive half precision."""
        m = self.cfg.method
        use_queue = self.queue_active()
        prototypes = self.prototypes.weight.detach().float()
        out = []
        with torch.autocast(device_type=scores[0].device.type, enabled=False):
            for i, batch_scores in enumerate(scores):
                s = batch_scores.float()
                if use_queue:
                    s = torch.cat([self.queue.features[i].float() @ prototypes.T, s])
                out.append(losses.sinkhorn(s, m.sinkhorn_epsilon, m.sinkhorn_iterations)[-len(batch_scores) :])
        return out

    # -- collapse watch and diagnostics -----------------------------------------------------------------------
    @torch.no_grad()
    def _track(self, loss: Tensor, codes: list[Tensor]) -> None:
        """Accumulate, on the device, the epoch's loss and how often each prototype is a code's argmax."""
        assigned = torch.cat(codes).argmax(1)
        if self._usage is None or self._usage.device != assigned.device:
            self._usage = torch.zeros(self.cfg.method.num_prototypes, device=assigned.device)
            self._loss_sum = torch.zeros((), device=assigned.device)
            self._loss_steps = 0
        # scatter_add rather than bincount: bincount reads the maximum back to the host on a GPU
        self._usage.scatter_add_(0, assigned, torch.ones_like(assigned, dtype=self._usage.dtype))
        self._loss_sum += loss.detach().float()
        self._loss_steps += 1

    def prototype_entropy(self) -> float | None:
        """Normalised entropy of this epoch's prototype usage (argmax of the codes); ``None`` before a step."""
        return None if self._usage is None else float(normalised_entropy(self._usage))

    def on_train_epoch_end(self) -> None:
        """Once per epoch (one host sync): raise the collapse alarm after ``collapse_patience`` collapsed epochs."""
        if self._usage is None or self._loss_steps == 0:
            return
        entropy = self.prototype_entropy()
        loss = float(self._loss_sum) / self._loss_steps
        log_k = math.log(self.cfg.method.num_prototypes)
        collapsed = abs(loss - log_k) <= 0.01 * log_k or entropy < self.collapse_entropy
        self._collapse_streak = self._collapse_streak + 1 if collapsed else 0
        self._usage, self._loss_sum, self._loss_steps = None, None, 0
        if self._collapse_streak >= self.collapse_patience and not self._alarmed:
            self._alarmed = True
            if dist.rank() == 0:
                warnings.warn(
                    f"SwAV looks collapsed: for {self._collapse_streak} epochs the loss sat at ln(K)={log_k:.3f} "
                    f"(last epoch {loss:.3f}) or the codes used almost one prototype (normalised usage entropy "
                    f"{entropy:.3f}). Likely causes: a learning rate too high (optim.lr), a Sinkhorn epsilon too "
                    "large, which makes the codes near uniform (method.sinkhorn_epsilon), or a queue started too "
                    "early (method.queue_start_epoch).",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def dictionary_stats(self) -> dict[str, float]:
        """The prototypes are the dictionary: K entries, no explicit negatives; plus their usage entropy."""
        stats = {"negatives_per_query": 0.0, "dictionary_size": float(self.cfg.method.num_prototypes)}
        entropy = self.prototype_entropy()
        if entropy is not None:
            stats["prototype_entropy"] = entropy
        return stats
