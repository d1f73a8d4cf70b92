"""InstDisc / NPID's memory bank (Wu et al. 2018): one feature per training image, negatives drawn from it uniformly,
the batch's entries then moved towards their new keys. ``method.loss=nce`` is the paper's NCE loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import Probe, Step, StoredNegatives, Views, positive_of, require

# the bank's cosines come from one product with the whole bank while it holds at most this many times the negatives
# per query: measured on a CPU (n = 128, D = 128), 25x faster than gathering n x K rows at N = K, 6x at N = 12 K,
# 2x at N = 50 K; with K = 4096, MNIST, CIFAR and STL-10 take the dense path, ImageNet the gather
DENSE_BANK_RATIO = 32
BANK_INITS = ("random", "encoder")
NCE_Z = ("random_start", "first_batch")


class MemoryBank(nn.Module):
    """One L2-normalised feature per training sample, addressed by the sample's index. Persistent buffers, written
    identically on every process (writes are gathered first), so DDP never needs to broadcast them."""

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

    def written(self) -> bool:
        """Whether any entry has been written (a resumed run's bank is never filled again)."""
        return bool((self.written_at >= 0).any())


class BankNegatives(StoredNegatives):
    """Negatives drawn uniformly from :class:`MemoryBank`; with one view, the positive is the sample's own entry."""

    family = "memory bank"  # the survey's architecture this source makes

    pairs_only = False

    def __init__(
        self,
        size: int,
        dim: int,
        temperature: float,
        momentum: float = 0.5,
        num_negatives: int | None = None,
        loss: str = "info_nce",
        init: str = "encoder",
        nce_z: str = "random_start",
        probe_size: int = 256,
    ):
        super().__init__(probe_size)
        self.temperature, self.loss_kind, self.init, self.nce_z = temperature, loss, init, nce_z
        self.bank = MemoryBank(size, dim, momentum)
        self.num_negatives = num_negatives or min(4096, size - 1)
        if loss == "nce":  # only then: an unset (NaN) normaliser would read as a diverged model
            self.register_buffer("log_z", torch.tensor(float("nan")))  # NCE normaliser, fixed by the first batch
        self.log_z_fixed: bool | None = None  # host flag: testing log_z for NaN each step would sync with the GPU

    @classmethod
    def from_config(cls, cfg: Any, num_train: int, shared_keys: bool) -> BankNegatives:
        m = cfg.method
        return cls(
            num_train,
            m.proj_out_dim,
            m.temperature,
            m.bank_momentum,
            m.num_negatives,
            m.loss,
            m.bank_init,
            m.nce_z,
            m.probe_size,
        )

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        m = cfg.method
        require(0 <= m.bank_momentum < 1, f"method.bank_momentum={m.bank_momentum} must be in [0, 1)")
        require(m.bank_init in BANK_INITS, f"method.bank_init={m.bank_init!r}; choose one of {', '.join(BANK_INITS)}")
        require(m.nce_z in NCE_Z, f"method.nce_z={m.nce_z!r}; choose one of {', '.join(NCE_Z)}")
        if m.num_negatives is not None:
            require(m.num_negatives > 0, f"method.num_negatives={m.num_negatives} must be > 0")

    @classmethod
    def check_with_data(cls, cfg: Any, num_train: int, world_size: int) -> None:
        m = cfg.method
        if m.num_negatives is not None:
            require(
                m.num_negatives < num_train,
                f"method.num_negatives={m.num_negatives} must be smaller than the bank ({num_train} training images)",
            )

    def __len__(self) -> int:
        return len(self.bank)

    def negatives_per_query(self) -> int:
        return self.num_negatives

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not hasattr(self, "log_z"):  # a checkpoint from before log_z was kept for NCE runs only
            state_dict.pop(prefix + "log_z", None)
        self.log_z_fixed = None  # read again from the loaded buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the bank's start (init=encoder) ---------------------------------------------------------------------
    def needs_fill(self) -> bool:
        """Whether every entry should start as the untrained key encoder's embedding of its image (the first
        epoch's positives are then the image's own features rather than random vectors); the caller encodes the
        training set and :meth:`MemoryBank.fill` writes it."""
        return self.init == "encoder" and not self.bank.written()

    # -- the step --------------------------------------------------------------------------------------------
    def loss(self, queries: Views, keys: Views, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """Negatives drawn uniformly from the bank; with one view the positive is the sample's own bank entry from
        before this step's update (in the first epoch, the entry it starts as: see ``init``). The bank then takes
        ``normalize(m * old + (1 - m) * new)`` of the first view's keys."""
        index, n = step.index, len(step.index)
        global_index = dist.gather(index)
        generator = dist.step_generator(step.seed, step.global_step, index.device)
        sample = self.bank.sample_indices(global_index, self.num_negatives, generator)
        neg_index = sample[dist.rank() * n : (dist.rank() + 1) * n]
        bank = self.bank_for_cosines(neg_index.shape[1])
        terms = []
        for i, q in queries.items():
            q = F.normalize(q, dim=1)
            positive = self.bank.features[index] if len(keys) == 1 else positive_of(i, keys)
            pos = (q * F.normalize(positive, dim=1)).sum(1)
            neg = self.bank_cosines(q, bank, neg_index)
            if self.loss_kind == "nce":
                terms.append(self.nce(pos, neg, step.seed, q))
            else:
                terms.append(losses.contrastive_cross_entropy(pos, neg, self.temperature))
        logs = {}
        fnr = step.false_negative_rate(neg_index)
        if fnr is not None:
            logs["false_negative_rate"] = fnr
        self.bank.update(global_index, dist.gather(keys[0].detach()), step.global_step)
        return torch.stack(terms).mean(), logs

    def bank_for_cosines(self, k: int) -> Tensor | None:
        """A snapshot of the whole bank when :meth:`bank_cosines` takes the dense path for ``k`` negatives (the
        update after the loss writes the bank in place, and the backward pass still reads it), else None."""
        return self.bank.features.clone() if len(self.bank) <= DENSE_BANK_RATIO * k else None

    def bank_cosines(self, q: Tensor, bank: Tensor | None, neg_index: Tensor) -> Tensor:
        """Cosines ``[n, K]`` between unit queries and the bank rows ``neg_index``; bank rows are stored unit-length.
        Gathering ``n x K`` rows is memory-bound: unless the bank is much larger than K, one product with the whole
        bank (``bank``, from :meth:`bank_for_cosines`) and a gather of its ``[n, K]`` entries is far cheaper."""
        if bank is not None:
            return (q @ bank.T).gather(1, neg_index)
        return torch.einsum("nd,nkd->nk", q, self.bank.features[neg_index])

    # -- NCE (loss=nce) --------------------------------------------------------------------------------------
    def nce(self, pos: Tensor, neg: Tensor, seed: int, q: Tensor | None = None) -> Tensor:
        """The paper's NCE loss on the cosines of the positive ``[n]`` and the negatives ``[n, K]`` (``q``: the unit
        queries, for the ``random_start`` estimate of Z)."""
        if self.log_z_fixed is None:
            self.log_z_fixed = not bool(torch.isnan(self.log_z))
        if not self.log_z_fixed:
            self.log_z.fill_(self.estimate_log_z(pos, neg, seed, q))
            self.log_z_fixed = True
        return losses.nce_loss(pos, neg, self.temperature, self.log_z, len(self.bank))

    @torch.no_grad()
    def estimate_log_z(self, pos: Tensor, neg: Tensor, seed: int, q: Tensor | None) -> Tensor:
        """log Z, once, as lemniscate's NCEAverage.py does: Z = n * the mean of exp(s / T) over the first batch's
        K + 1 sampled entries (positive and negatives). ``nce_z=first_batch`` takes them from the bank as it stands;
        ``random_start`` (the default) from the bank as the paper starts it, random unit vectors, whatever
        ``init`` is: an encoder-filled bank's cosines are near 1 and would give a Z about 50x larger at T 0.1,
        which moves every NCE posterior. With ``init=random`` the two are the same estimate."""
        if self.nce_z == "first_batch" or self.init == "random" or q is None:
            cosines = torch.cat([pos.detach().float().unsqueeze(1), neg.detach().float()], 1)
        else:
            generator = torch.Generator(device=q.device).manual_seed(seed)
            start = F.normalize(torch.randn(neg.shape[1] + 1, q.shape[1], device=q.device, generator=generator), dim=1)
            cosines = q.detach().float() @ start.T
        scaled = dist.gather(cosines / self.temperature).flatten()
        return torch.logsumexp(scaled, 0) - math.log(scaled.numel()) + math.log(len(self.bank))

    # -- figures ---------------------------------------------------------------------------------------------
    def drift_window(self, steps_per_epoch: int, global_batch: int) -> int:
        return steps_per_epoch  # each image's entry is rewritten once an epoch

    def probe_entries(self, probe: Probe):
        if probe.index is None:
            return None
        slots = probe.index.to(self.bank.features.device)
        # the probe subset's own images: the bank is indexed by sample
        return self.bank.features[slots], self.bank.written_at[slots], probe.images
