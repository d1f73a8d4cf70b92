"""InstDisc / NPID's memory bank (Wu et al. 2018): one feature per training image, negatives drawn from it uniformly,
the batch's entries then moved towards their new keys. ``method.loss=nce`` is the paper's NCE loss."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import Subset

from contrastive import distributed as dist
from contrastive import losses
from contrastive.negatives.base import StoredNegatives, Views, require

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


class BankNegatives(StoredNegatives):
    """State: ``method.bank`` (:class:`MemoryBank`) and, with ``method.loss=nce``, ``method.log_z``."""

    one_view = True  # with one view, the positive is the sample's own bank entry

    def __init__(self, method):
        super().__init__(method)
        m, num_train = method.cfg.method, method.num_train
        method.bank = MemoryBank(num_train, m.proj_out_dim, m.bank_momentum)
        self.num_negatives = m.num_negatives or min(4096, num_train - 1)
        if m.loss == "nce":  # only then: an unset (NaN) normaliser would read as a diverged model
            method.register_buffer("log_z", torch.tensor(float("nan")))  # NCE normaliser, fixed by the first batch
        self.log_z_fixed: bool | None = None  # host flag: testing log_z for NaN each step would sync with the GPU

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        m = cfg.method
        require(0 <= m.bank_momentum < 1, f"method.bank_momentum={m.bank_momentum} must be in [0, 1)")
        require(m.bank_init in BANK_INITS, f"method.bank_init={m.bank_init!r}; choose one of {', '.join(BANK_INITS)}")
        require(m.nce_z in NCE_Z, f"method.nce_z={m.nce_z!r}; choose one of {', '.join(NCE_Z)}")
        if m.num_negatives is not None:
            require(m.num_negatives > 0, f"method.num_negatives={m.num_negatives} must be > 0")

    @classmethod
    def check_with_data(cls, cfg, num_train: int, world_size: int) -> None:
        m = cfg.method
        if m.num_negatives is not None:
            require(
                m.num_negatives < num_train,
                f"method.num_negatives={m.num_negatives} must be smaller than the bank ({num_train} training images)",
            )

    @property
    def bank(self) -> MemoryBank:
        return self.method.bank

    def __len__(self) -> int:
        return len(self.bank)

    def negatives_per_query(self) -> int:
        return self.num_negatives

    def on_load_state(self, state_dict: dict, prefix: str) -> None:
        if not hasattr(self.method, "log_z"):  # a checkpoint from before log_z was kept for NCE runs only
            state_dict.pop(prefix + "log_z", None)
        self.log_z_fixed = None  # read again from the loaded buffer

    # -- the step --------------------------------------------------------------------------------------------
    def loss(
        self, queries: Views, keys: Views, other, index: Tensor, labels: Tensor, logs: dict[str, Tensor]
    ) -> Tensor:
        """Negatives drawn uniformly from the bank; with one view the positive is the sample's own bank entry from
        before this step's update (in the first epoch, the entry it starts as: see ``bank_init``). The bank then
        takes ``normalize(m * old + (1 - m) * new)``."""
        method, m, n = self.method, self.method.cfg.method, len(index)
        global_index = dist.gather(index)
        generator = dist.step_generator(method.cfg.seed, method.global_step, index.device)
        sample = self.bank.sample_indices(global_index, self.num_negatives, generator)
        neg_index = sample[dist.rank() * n : (dist.rank() + 1) * n]
        bank = self.bank_for_cosines(neg_index.shape[1])
        terms = []
        for i, q in queries.items():
            q = F.normalize(q, dim=1)
            positive = self.bank.features[index] if len(keys) == 1 else keys[other(i)]
            pos = (q * F.normalize(positive, dim=1)).sum(1)
            neg = self.bank_cosines(q, bank, neg_index)
            if m.loss == "nce":
                terms.append(self.nce(pos, neg, q))
            else:
                terms.append(losses.contrastive_cross_entropy(pos, neg, m.temperature))
        fnr = method.false_negative_rate(labels, neg_index)
        if fnr is not None:
            logs["false_negative_rate"] = fnr
        self.bank.update(global_index, dist.gather(keys[0].detach()), method.global_step)
        return torch.stack(terms).mean()

    def after_loss(self, views: list[Tensor], keys: Views) -> None:
        self.record_drift(views[0])  # the view whose key the bank took

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

    # -- NCE (method.loss=nce) -------------------------------------------------------------------------------
    def nce(self, pos: Tensor, neg: Tensor, q: Tensor | None = None) -> Tensor:
        """The paper's NCE loss on the cosines of the positive ``[n]`` and the negatives ``[n, K]`` (``q``: the unit
        queries, for the ``random_start`` estimate of Z)."""
        method = self.method
        if self.log_z_fixed is None:
            self.log_z_fixed = not bool(torch.isnan(method.log_z))
        if not self.log_z_fixed:
            method.log_z.fill_(self.estimate_log_z(pos, neg, q))
            self.log_z_fixed = True
        return losses.nce_loss(pos, neg, method.cfg.method.temperature, method.log_z, method.num_train)

    @torch.no_grad()
    def estimate_log_z(self, pos: Tensor, neg: Tensor, q: Tensor | None) -> Tensor:
        """log Z, once, as lemniscate's NCEAverage.py does: Z = n * the mean of exp(s / T) over the first batch's
        K + 1 sampled entries (positive and negatives). ``nce_z=first_batch`` takes them from the bank as it stands;
        ``random_start`` (the default) from the bank as the paper starts it, random unit vectors, whatever
        ``bank_init`` is: an encoder-filled bank's cosines are near 1 and would give a Z about 50x larger at T 0.1,
        which moves every NCE posterior. With ``bank_init=random`` the two are the same estimate."""
        cfg = self.method.cfg
        m = cfg.method
        if m.nce_z == "first_batch" or m.bank_init == "random" or q is None:
            cosines = torch.cat([pos.detach().float().unsqueeze(1), neg.detach().float()], 1)
        else:
            generator = torch.Generator(device=q.device).manual_seed(cfg.seed)
            start = F.normalize(torch.randn(neg.shape[1] + 1, q.shape[1], device=q.device, generator=generator), dim=1)
            cosines = q.detach().float() @ start.T
        scaled = dist.gather(cosines / m.temperature).flatten()
        return torch.logsumexp(scaled, 0) - math.log(scaled.numel()) + math.log(self.method.num_train)

    # -- the bank's start (method.bank_init=encoder) ----------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        # a resumed run's bank has been written: it is never filled again
        if self.method.cfg.method.bank_init == "encoder" and not bool((self.bank.written_at >= 0).any()):
            self.encode_bank()

    @torch.no_grad()
    def encode_bank(self) -> None:
        """Every entry starts as the untrained key encoder's embedding of an augmented view of its image, so the
        first epoch's positives are the image's own features rather than random vectors."""
        method = self.method
        dm = getattr(method.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError(
                "method.bank_init=encoder reads the training set from the trainer's data module; "
                "fit with a ContrastiveDataModule, or use method.bank_init=random"
            )
        start, train_set = time.perf_counter(), dm.train_set
        n, world = len(train_set), dist.world_size()
        # equal shards (wrapping around) keep every process's gathers in step
        shard = [(dist.rank() + world * j) % n for j in range(math.ceil(n / world))]
        loader = dm.loader(Subset(train_set, shard), train=False)
        with method.trainer.precision_plugin.forward_context():
            for images, _, index in loader:
                view = method.augment.large(images.to(method.device))  # one view: the others would be discarded
                if method.cfg.perf.channels_last:  # as training_step feeds the model
                    view = view.contiguous(memory_format=torch.channels_last)
                keys = method.key_net(view)
                self.bank.fill(dist.gather(index.to(method.device)), dist.gather(keys))
        seconds = time.perf_counter() - start
        rank_zero_info(f"memory bank: {n} entries encoded by the initial key encoder in {seconds:.0f} s")

    # -- figures ---------------------------------------------------------------------------------------------
    def drift_window(self, per_epoch: int) -> int:
        return per_epoch  # each image's entry is rewritten once an epoch

    def probe_entries(self):
        method = self.method
        if method._probe_index is None:
            return None
        slots = method._probe_index.to(method.device)
        # the probe subset's own images: the bank is indexed by sample
        return self.bank.features[slots], self.bank.written_at[slots], method._probe_images
