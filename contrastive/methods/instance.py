"""Instance discrimination as the survey draws it: a query encoder, a key encoder and a source of negatives.

Two axes span SimCLR, InstDisc/NPID and MoCo (and the cells between them):

* ``method.key_encoder``: ``shared`` (the query encoder itself; gradients through both views) or ``momentum``
  (an EMA copy of backbone + projector, no gradient);
* ``method.negatives``: ``batch`` (the other samples of the gathered batch), ``bank`` (one stored feature per
  training image) or ``queue`` (a FIFO of past keys).

Every cell goes through the shared InfoNCE cross-entropy in :mod:`contrastive.losses`.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Subset

from contrastive import distributed as dist
from contrastive import losses
from contrastive.methods.base import ContrastiveMethod, StepOutput, cosine_ramp
from contrastive.metrics.drift import DriftProbe
from contrastive.negatives import MemoryBank, Queue

# the bank's cosines come from one product with the whole bank while it holds at most this many times the negatives
# per query: measured on a CPU (n = 128, D = 128), 25x faster than gathering n x K rows at N = K, 6x at N = 12 K,
# 2x at N = 50 K; with K = 4096, MNIST, CIFAR and STL-10 take the dense path, ImageNet the gather
DENSE_BANK_RATIO = 32
# snapshots per epoch of the views behind written keys, for the drift measure
DRIFT_SLOTS = 16


class InstanceDiscrimination(ContrastiveMethod):
    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        m = self.cfg.method
        self.key_encoder_kind, self.negatives_source = m.key_encoder, m.negatives
        if m.key_encoder == "momentum":
            self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.register_buffer("momentum", torch.tensor(float(m.momentum)))
        if m.negatives == "bank":
            self.bank = MemoryBank(num_train, m.proj_out_dim, m.bank_momentum)
            self.num_negatives = m.num_negatives or min(4096, num_train - 1)
            if m.loss == "nce":  # only then: an unset (NaN) normaliser would read as a diverged model
                self.register_buffer("log_z", torch.tensor(float("nan")))  # NCE normaliser, fixed by the first batch
            self._log_z_fixed: bool | None = None  # host flag: testing log_z for NaN each step would sync with the GPU
        elif m.negatives == "queue":
            self.queue = Queue(m.queue_size, m.proj_out_dim)
        if m.negatives != "batch":
            self.drift = DriftProbe(slots=DRIFT_SLOTS, rows=max(1, math.ceil(m.probe_size / DRIFT_SLOTS)))
            self._drift_every: int | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not hasattr(self, "log_z"):  # a checkpoint from before log_z was kept for NCE runs only
            state_dict.pop(prefix + "log_z", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.negatives_source == "bank":
            self._log_z_fixed = None  # read again from the loaded buffer

    # -- key encoder -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q over the whole key path, head included. Parameters only, as
        MoCo's builder.py: the key encoder's BN running statistics are its own, from its own forward passes."""
        # m stays on the device: reading it as a Python number would sync with the GPU every step
        weight = 1 - self.momentum
        for q_mod, k_mod in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            q_params, k_params = list(q_mod.parameters()), list(k_mod.parameters())
            torch._foreach_lerp_(k_params, q_params, [weight] * len(k_params))

    @torch.no_grad()
    def momentum_keys(self, x: Tensor) -> Tensor:
        """Keys from the momentum encoder, with BN statistics that cannot leak the positive: across processes
        the batch is shuffled before encoding (shuffle-BN); on one process it is shuffled and encoded in
        ``bn_splits`` sub-batches, so no key shares its BN statistics with its own query's batch."""
        net = lambda v: self.key_projector(self.key_backbone(v))
        if not self.cfg.method.shuffle_bn:
            return net(x)
        if dist.world_size() > 1:
            shuffled, perm = dist.shuffle_across_processes(x)
            return dist.unshuffle_across_processes(net(shuffled), perm)
        perm = torch.randperm(len(x), device=x.device)
        splits = max(1, min(self.cfg.method.bn_splits, len(x) // 2))
        keys = torch.cat([net(chunk) for chunk in x[perm].chunk(splits)])
        return keys[torch.argsort(perm)]

    # -- the bank's start --------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.negatives_source != "batch":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            self._drift_every = max(1, self.steps_per_epoch(total) // DRIFT_SLOTS)
        # a resumed run's bank has been written: it is never filled again
        if self.negatives_source == "bank" and self.cfg.method.bank_init == "encoder" and not bool(
            (self.bank.written_at >= 0).any()
        ):
            self.encode_bank()

    @torch.no_grad()
    def encode_bank(self) -> None:
        """``bank_init=encoder``: every entry starts as the untrained key encoder's embedding of an augmented view of
        its image, so the first epoch's positives are the image's own features rather than random vectors."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("method.bank_init=encoder reads the training set from the trainer's data module; "
                               "fit with a ContrastiveDataModule, or use method.bank_init=random")
        start, train_set = time.perf_counter(), dm.train_set
        n, world = len(train_set), dist.world_size()
        # equal shards (wrapping around) keep every process's gathers in step
        shard = [(dist.rank() + world * j) % n for j in range(math.ceil(n / world))]
        loader = dm.loader(Subset(train_set, shard), train=False)
        with self.trainer.precision_plugin.forward_context():
            for images, _, index in loader:
                view = self.augment.large(images.to(self.device))  # one view: the others would be discarded
                if self.cfg.perf.channels_last:  # as training_step feeds the model
                    view = view.contiguous(memory_format=torch.channels_last)
                keys = self.key_net(view)
                self.bank.fill(dist.gather(index.to(self.device)), dist.gather(keys))
        seconds = time.perf_counter() - start
        rank_zero_info(f"memory bank: {n} entries encoded by the initial key encoder in {seconds:.0f} s")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.key_encoder_kind != "momentum":
            return
        self.momentum_update()
        if self.cfg.method.momentum_schedule == "cosine":
            self.momentum.fill_(cosine_ramp(self.cfg.method.momentum, 1.0, self.progress()))

    # -- the step --------------------------------------------------------------------------------------------
    def contrastive_loss(self, views: list[Tensor], index: Tensor, labels: Tensor) -> StepOutput:
        m = self.cfg.method
        query_views = [0, 1] if (len(views) == 2 and m.symmetric) or m.negatives == "batch" else [0]
        feats, queries = {}, {}
        if m.joint_views and len(query_views) > 1:
            # SimCLR's official code: both views in one batch, so BN statistics span all 2N images
            f, z = self.embed(torch.cat([views[i] for i in query_views]))
            for i, fi, zi in zip(query_views, f.chunk(len(query_views)), z.chunk(len(query_views))):
                feats[i], queries[i] = fi, zi
        else:
            for i in query_views:
                feats[i], queries[i] = self.embed(views[i])
        other = (lambda i: 1 - i) if len(views) == 2 else (lambda i: i)
        if self.key_encoder_kind == "momentum":
            # a queue reads only the keys opposite the queries: one key pass per step for asymmetric MoCo
            wanted = sorted({other(i) for i in query_views}) if m.negatives == "queue" else range(len(views))
            keys = {i: self.momentum_keys(views[i]) for i in wanted}
        else:
            keys = {i: queries[i] if i in queries else self.embed(views[i])[1] for i in range(len(views))}

        logs: dict[str, Tensor] = {}
        if m.negatives == "batch":
            loss = self.batch_loss(queries, keys, labels, logs)
        elif m.negatives == "bank":
            loss = self.bank_loss(queries, keys, other, index, labels, logs)
            self.record_drift(views[0])  # the view whose key the bank took
        else:
            loss = self.queue_loss(queries, keys, other, index, labels, logs)
            self.record_drift(views[1 if 1 in keys else 0])  # the view whose key was enqueued
        return StepOutput(loss=loss, features=feats[0], logs=logs)

    def batch_loss(self, queries, keys, labels, logs) -> Tensor:
        """SimCLR's NT-Xent with a shared encoder; with a momentum encoder, each query against the keys of the
        gathered batch (MoCo v3's choice). Embeddings are gathered with gradient."""
        offset = dist.rank() * len(labels)
        all_labels = dist.gather(labels)
        if self.key_encoder_kind == "shared":
            z1, z2 = queries[0], queries[1]
            loss = losses.gathered_nt_xent(
                z1, z2, dist.gather_with_grad(z1), dist.gather_with_grad(z2), offset, self.cfg.method.temperature
            )
        else:
            terms = [
                losses.gathered_info_nce(queries[i], dist.gather(keys[1 - i]), offset, self.cfg.method.temperature)
                for i in queries
            ]
            loss = torch.stack(terms).mean()
        if self.train_labels is not None:
            same = (labels[:, None] == all_labels[None, :]).float().sum(1) - 1  # minus the sample itself
            logs["false_negative_rate"] = (same / max(len(all_labels) - 1, 1)).mean()
        return loss

    def bank_loss(self, queries, keys, other, index, labels, logs) -> Tensor:
        """InstDisc/NPID: negatives drawn uniformly from the bank; with one view the positive is the sample's own
        bank entry from before this step's update (in the first epoch, the entry it starts as: see ``bank_init``).
        The bank then takes ``normalize(m * old + (1 - m) * new)``."""
        m, n = self.cfg.method, len(index)
        global_index = dist.gather(index)
        generator = dist.step_generator(self.cfg.seed, self.global_step, index.device)
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
        fnr = self.false_negative_rate(labels, neg_index)
        if fnr is not None:
            logs["false_negative_rate"] = fnr
        self.bank.update(global_index, dist.gather(keys[0].detach()), self.global_step)
        return torch.stack(terms).mean()

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

    def nce(self, pos: Tensor, neg: Tensor, q: Tensor | None = None) -> Tensor:
        """The paper's NCE loss on the cosines of the positive ``[n]`` and the negatives ``[n, K]`` (``q``: the unit
        queries, for the ``random_start`` estimate of Z)."""
        if self._log_z_fixed is None:
            self._log_z_fixed = not bool(torch.isnan(self.log_z))
        if not self._log_z_fixed:
            self.log_z.fill_(self.estimate_log_z(pos, neg, q))
            self._log_z_fixed = True
        return losses.nce_loss(pos, neg, self.cfg.method.temperature, self.log_z, self.num_train)

    @torch.no_grad()
    def estimate_log_z(self, pos: Tensor, neg: Tensor, q: Tensor | None) -> Tensor:
        """log Z, once, as lemniscate's NCEAverage.py does: Z = n * the mean of exp(s / T) over the first batch's
        K + 1 sampled entries (positive and negatives). ``nce_z=first_batch`` takes them from the bank as it stands;
        ``random_start`` (the default) from the bank as the paper starts it, random unit vectors, whatever
        ``bank_init`` is: an encoder-filled bank's cosines are near 1 and would give a Z about 50x larger at T 0.1,
        which moves every NCE posterior. With ``bank_init=random`` the two are the same estimate."""
        m = self.cfg.method
        if m.nce_z == "first_batch" or m.bank_init == "random" or q is None:
            cosines = torch.cat([pos.detach().float().unsqueeze(1), neg.detach().float()], 1)
        else:
            generator = torch.Generator(device=q.device).manual_seed(self.cfg.seed)
            start = F.normalize(torch.randn(neg.shape[1] + 1, q.shape[1], device=q.device, generator=generator), dim=1)
            cosines = q.detach().float() @ start.T
        scaled = dist.gather(cosines / m.temperature).flatten()
        return torch.logsumexp(scaled, 0) - math.log(scaled.numel()) + math.log(self.num_train)

    def queue_loss(self, queries, keys, other, index, labels, logs) -> Tensor:
        """MoCo: the queue as it was before this batch is every query's negatives; the new keys are enqueued only
        after all loss terms, so a sample's own key is never its negative (one queue, symmetric or not)."""
        # no copy of the queue: info_nce normalises it into a new tensor, so the in-place enqueue below cannot touch
        # what the backward pass reads
        terms = [
            losses.info_nce(q, keys[other(i)], self.queue.keys, self.cfg.method.temperature) for i, q in queries.items()
        ]
        fnr = self.false_negative_rate(labels, self.queue.index)
        # before the first enqueue the queue holds no sample, the rate is NaN and would make the epoch's mean NaN
        if fnr is not None and self.global_step > 0:
            logs["false_negative_rate"] = fnr
        key_view = 1 if 1 in keys else 0
        self.queue.enqueue(dist.gather(keys[key_view].detach()), dist.gather(index), self.global_step)
        return torch.stack(terms).mean()

    # -- diagnostics -------------------------------------------------------------------------------------------
    def key_net(self, x: Tensor) -> Tensor:
        if self.key_encoder_kind == "momentum":
            return self.key_projector(self.key_backbone(x))
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def eval_key_net(self, x: Tensor) -> Tensor:
        """:meth:`key_net` with batch norm in eval mode (running statistics, not updated), modes restored after."""
        nets = (self.key_backbone, self.key_projector) if self.key_encoder_kind == "momentum" else (
            self.backbone, self.projector)
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        try:
            return self.key_net(x)
        finally:
            for net, mode in zip(nets, modes):
                net.train(mode)

    def record_drift(self, view: Tensor) -> None:
        """A few times per epoch (a fixed step schedule: no device sync), snapshot the view behind the keys just
        written, for :class:`DriftProbe`."""
        if self._drift_every is not None and self.global_step % self._drift_every == 0:
            self.drift.record(self.global_step, view, self.eval_key_net)

    def drift_window(self, per_epoch: int) -> int:
        """Steps a key stays in the dictionary: one epoch in a bank (each image rewritten once an epoch), the queue's
        length over the global batch in a queue."""
        if self.negatives_source == "bank":
            return per_epoch
        return math.ceil(len(self.queue) / self.global_batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.negatives_source != "batch":
            checkpoint["drift_probe"] = self.drift.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.negatives_source != "batch" and "drift_probe" in checkpoint:  # older checkpoints start it empty
            self.drift.load_state_dict(checkpoint["drift_probe"])

    @torch.no_grad()
    def dictionary_stats(self) -> dict[str, float]:
        """Negatives per query, dictionary size and, for a bank or queue, staleness: the mean cosine between the
        stored entries of a fixed probe subset and the same images encoded now by the key encoder (1 = fresh),
        and the mean age of those entries in steps."""
        stats: dict[str, float] = {}
        if self.negatives_source == "batch":
            # shared: both views of the other images; momentum: the other images' keys
            views = 2 if self.key_encoder_kind == "shared" else 1
            stats["negatives_per_query"] = float(views * self.global_batch_size - views)
            stats["dictionary_size"] = float(views * self.global_batch_size)
            return stats
        if self.negatives_source == "bank":
            stats["negatives_per_query"] = float(self.num_negatives)
            stats["dictionary_size"] = float(len(self.bank))
            if self._probe_index is None:
                return stats
            slots = self._probe_index.to(self.device)
            stored, written = self.bank.features[slots], self.bank.written_at[slots]
            images = self._probe_images  # the probe subset's own images: the bank is indexed by sample
        else:
            stats["negatives_per_query"] = float(len(self.queue))
            stats["dictionary_size"] = float(len(self.queue))
            filled = (self.queue.index >= 0).nonzero().squeeze(1)
            if len(filled) == 0:
                return stats
            # spread over the ring: the first slots alone are a few batches, their age cycling with ptr
            count = min(len(filled), self.cfg.method.probe_size)
            filled = filled[torch.linspace(0, len(filled) - 1, count, device=self.device).round().long()]
            stored, written = self.queue.keys[filled], self.queue.written_at[filled]
            train_set = self.trainer.datamodule.train_set
            images = torch.stack([train_set[int(i)][0] for i in self.queue.index[filled].cpu()]).to(self.device)
        was_training = self.training
        self.eval()
        fresh = self.key_net(self.eval_transform(images))
        self.train(was_training)
        seen = written >= 0
        if seen.any():
            cos = F.cosine_similarity(stored[seen].float(), fresh[seen].float(), dim=1)
            stats["staleness"] = float(cos.mean())
            stats["staleness_age_steps"] = float((self.global_step - written[seen]).float().mean())
        if self._drift_every is not None:
            stats.update(self.drift_stats())
        return stats

    def drift_stats(self) -> dict[str, float]:
        """Encoder drift of the stored keys (:class:`DriftProbe`), their age in steps and epochs, and the regime:
        the dictionary's size over the training set's."""
        per_epoch = self.steps_per_epoch(max(int(self.trainer.estimated_stepping_batches), 1))
        window = self.drift_window(per_epoch)
        stats = self.drift.measure(self.global_step, self.eval_key_net, window)
        if stats:
            stats["drift_age_epochs"] = stats["drift_age_steps"] / per_epoch
            stats["drift_window_steps"] = float(window)
        size = len(self.bank) if self.negatives_source == "bank" else len(self.queue)
        stats["dictionary_ratio"] = size / max(self.num_train, 1)
        return stats
