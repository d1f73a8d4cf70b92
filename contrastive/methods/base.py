"""Machinery every method shares.

* :class:`ContrastiveMethod`: backbone, projector, on-device augmentation, online probe, kNN monitor, optimiser and
  schedule. A method implements :meth:`~ContrastiveMethod.contrastive_loss` (and its config checks).
* :class:`InstanceDiscrimination`: a query encoder, a key encoder (``method.key_encoder``, from
  :mod:`contrastive.models.key_encoder`) and a source of negatives (``method.negatives``, from
  :mod:`contrastive.negatives`): the two axes that span SimCLR, InstDisc/NPID and MoCo and the cells between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from contrastive import distributed as dist
from contrastive.data.augment import build_augment, build_eval_transform
from contrastive.data.crops import CroppedViews, CropSpec
from contrastive.metrics import alignment, embedding_std, false_negative_rate, knn_accuracy, uniformity
from contrastive.models import backbone_from_config, projection_head
from contrastive.models.key_encoder import KEY_ENCODERS
from contrastive.negatives import NEGATIVES
from contrastive.negatives.base import require
from contrastive.optim import build_optimizer, warmup_cosine


@dataclass
class StepOutput:
    """What a method's loss step hands back to the shared training step."""

    loss: Tensor
    features: Tensor  # backbone features of the first view, for the online probe
    logs: dict[str, Tensor] = field(default_factory=dict)


class ContrastiveMethod(L.LightningModule):
    negatives_source = "none"

    def __init__(self, cfg: DictConfig | dict, num_train: int):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "num_train": num_train})
        self.cfg = OmegaConf.create(self.hparams.cfg)
        self.num_train = num_train
        m, data = self.cfg.method, self.cfg.data
        self.backbone = backbone_from_config(self.cfg.backbone, data.channels)
        self.feature_dim = self.backbone.out_dim
        self.projector = projection_head(
            self.feature_dim,
            m.proj_hidden_dim,
            m.proj_out_dim,
            m.proj_layers,
            m.get("proj_batch_norm", True),
            m.get("proj_final_bn", False),
        )
        self.probe = nn.Linear(self.feature_dim, data.num_classes)
        self.augment = build_augment(self.cfg.augment, data, m.num_views, m.num_small_views)
        self.eval_transform = build_eval_transform(data)
        self._val_outputs: dict[int, list[tuple[Tensor, Tensor]]] = {0: [], 1: []}
        self._probe_images: Tensor | None = None
        self._probe_index: Tensor | None = None
        self.train_labels: Tensor | None = None

    # -- what a method provides -------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: DictConfig, world_size: int) -> None:
        """The method's own config rules, run by ``contrastive.config.validate`` before any training; raise
        ConfigError naming the key."""

    @classmethod
    def check_with_data(cls, cfg: DictConfig, num_train: int, world_size: int) -> None:
        """Rules that need the training set's size (``contrastive.config.validate_with_data``)."""

    def contrastive_loss(self, views: list[Tensor], index: Tensor, labels: Tensor) -> StepOutput:
        raise NotImplementedError

    def dictionary_stats(self) -> dict[str, float]:
        """Per-epoch figures of the method's dictionary (size, negatives per query, staleness)."""
        return {}

    # -- shared pieces --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Backbone features of already-transformed images."""
        return self.backbone(x)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone(x)
        return feats, self.projector(feats)

    @property
    def global_batch_size(self) -> int:
        return self.cfg.data.batch_size * max(self.trainer.world_size, 1) if self._trainer else self.cfg.data.batch_size

    def setup(self, stage: str) -> None:
        # before a checkpoint restores each rank's saved stream, so a resumed run continues its own
        if stage == "fit":
            dist.seed_process_streams(self.cfg.seed)
            if self.cfg.data.get("crops", "stored") == "full":
                self._crop_in_loader()

    def _crop_in_loader(self) -> None:
        """``data.crops=full``: the training loader cuts each view from the whole image at its own resolution, as
        the official pipelines do; the on-device augmentation then skips its crop."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError(
                "data.crops=full cuts views in the data module's loader; fit with a "
                "ContrastiveDataModule, or use data.crops=stored"
            )
        specs = [
            CropSpec(
                self.augment.large.size, self.augment.num_large, self.augment.large.scale, self.augment.large.ratio
            )
        ]
        if self.augment.num_small > 0:
            specs.append(
                CropSpec(
                    self.augment.small.size, self.augment.num_small, self.augment.small.scale, self.augment.small.ratio
                )
            )
        dm.train_views = partial(CroppedViews, specs=specs)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        train = dm.train_set
        labels = getattr(train, "labels", None)
        if labels is not None:
            # labels serve measurement only (false-negative rate); the loss never reads them
            self.train_labels = torch.as_tensor(labels).to(self.device)
        gen = torch.Generator().manual_seed(1234)
        size = min(self.cfg.method.probe_size, len(train))
        self._probe_index = torch.randperm(len(train), generator=gen)[:size]
        self._probe_images = torch.stack([train[int(i)][0] for i in self._probe_index]).to(self.device)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels, index = batch
        with torch.no_grad():
            views = self.augment(images)
        if self.cfg.perf.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        out = self.contrastive_loss(views, index, labels)
        probe_logits = self.probe(out.features.detach())
        probe_loss = F.cross_entropy(probe_logits, labels)
        # Lightning turns every progress-bar value logged on_step into a Python float after each batch, a
        # device sync per step: the bar shows the epoch mean instead (read once per epoch)
        self.log("train/loss", out.loss, on_step=True, on_epoch=True, sync_dist=False)
        self.log("loss", out.loss, on_step=False, on_epoch=True, prog_bar=True, logger=False)
        self.log("train/probe_loss", probe_loss, on_step=False, on_epoch=True)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True)
        return out.loss + probe_loss

    def false_negative_rate(self, query_labels: Tensor, negative_index: Tensor) -> Tensor | None:
        """Share of a query's negatives that have its class; ``negative_index`` holds training-set indices
        (``[K]`` or ``[n, K]``, -1 for an empty slot). Labels serve this measurement only."""
        if self.train_labels is None:
            return None
        labels = self.train_labels[negative_index.clamp_min(0)].masked_fill(negative_index < 0, -1)
        return false_negative_rate(query_labels, labels)

    # -- validation: kNN monitor, online probe, diagnostics ----------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {0: [], 1: []}

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, _ = batch
        feats = self.backbone(self.eval_transform(images))
        self._val_outputs[dataloader_idx].append((feats.detach(), labels))
        if dataloader_idx == 1:
            acc = (self.probe(feats).argmax(1) == labels).float().mean() * 100
            self.log("val/linear_acc", acc, on_epoch=True, add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs[0] or not self._val_outputs[1]:
            return
        bank, bank_labels = (dist.gather(torch.cat(t)) for t in zip(*self._val_outputs[0]))
        query, query_labels = (dist.gather(torch.cat(t)) for t in zip(*self._val_outputs[1]))
        acc = knn_accuracy(
            bank,
            bank_labels,
            query,
            query_labels,
            self.cfg.data.num_classes,
            k=self.cfg.eval.knn_k,
            temperature=self.cfg.eval.knn_temperature,
        )
        self.log("val/knn_acc", acc, add_dataloader_idx=False)
        self._val_outputs = {0: [], 1: []}
        if self.cfg.diagnostics and not self.trainer.sanity_checking:
            for name, value in self.diagnostics().items():
                self.log(f"diag/{name}", value, add_dataloader_idx=False)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Alignment / uniformity (Wang & Isola 2020) of two augmented views of a fixed probe subset, the
        embedding spread (collapse -> 0), and the method's dictionary figures."""
        out: dict[str, float] = {}
        if self._probe_images is not None:
            was_training = self.training
            self.eval()
            v1, v2 = self.augment.large(self._probe_images), self.augment.large(self._probe_images)
            z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
            self.train(was_training)
            out["alignment"] = float(alignment(z1, z2))
            out["uniformity"] = float(uniformity(z1))
            out["embedding_std"] = float(embedding_std(z1))
        out.update(self.dictionary_stats())
        return out

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optim = self.cfg.optim
        lr = optim.lr * (self.global_batch_size / 256 if optim.scale_lr else 1.0)
        encoder = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("probe.")]
        optimizer = build_optimizer(optim, encoder, list(self.probe.parameters()), lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        steps_per_epoch = self.steps_per_epoch(total)
        warmup = int(optim.warmup_epochs * steps_per_epoch)
        milestones = [int(e * steps_per_epoch) for e in optim.get("milestones", [])]
        schedule = warmup_cosine(
            optimizer, warmup, total, optim.min_lr_ratio, optim.scheduler, milestones, optim.get("step_gamma", 0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def steps_per_epoch(self, total: int) -> int:
        """Optimiser steps in one epoch, from the training set's size: a run capped by ``trainer.max_steps`` keeps
        its real epoch length, so warm-up and milestones stay in epochs."""
        trainer = self.trainer
        if not self.num_train:
            return max(total // max(trainer.max_epochs or 1, 1), 1)
        # each process gets ceil(n / world) images (the distributed sampler pads); the last partial batch is dropped
        batches = math.ceil(self.num_train / trainer.world_size) // int(self.cfg.data.batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and limit < 1.0:
            batches = int(batches * limit)
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)

    def progress(self) -> float:
        """Fraction of training done, for schedules (momentum, freezing)."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return min(self.global_step / total, 1.0)


class InstanceDiscrimination(ContrastiveMethod):
    """Queries against keys: each query view's positive is the key of its other view (or, with one view, the
    sample's own stored entry), its negatives come from the source. The key encoder and the source are components
    (:attr:`key_encoder`, :attr:`negatives`) chosen by config, so every cell of the grid trains."""

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        m = self.cfg.method
        self.negatives_source = m.negatives  # metrics.json's `negatives`
        # in this order: both draw their starting state from the global RNG stream
        self.key_encoder = KEY_ENCODERS[m.key_encoder](self)
        self.negatives = NEGATIVES[m.negatives](self)

    @classmethod
    def check_config(cls, cfg: DictConfig, world_size: int) -> None:
        m = cfg.method
        require(
            m.key_encoder in KEY_ENCODERS,
            f"method.key_encoder={m.key_encoder!r}; choose one of {', '.join(KEY_ENCODERS)}",
        )
        require(m.negatives in NEGATIVES, f"method.negatives={m.negatives!r}; choose one of {', '.join(NEGATIVES)}")
        require(m.loss in ("info_nce", "nce"), f"method.loss={m.loss!r}; choose info_nce or nce")
        require(m.loss == "info_nce" or m.negatives == "bank", "method.loss=nce needs method.negatives=bank")
        source = NEGATIVES[m.negatives]
        require(
            source.one_view or m.num_views == 2,
            f"method.num_views={m.num_views}: negatives={m.negatives} needs 2 views (a positive pair); "
            "only the memory bank can use 1 (its positive is the stored entry)",
        )
        require(m.num_views <= 2, f"method.num_views={m.num_views} must be 1 or 2 for {m.name}")
        KEY_ENCODERS[m.key_encoder].check(cfg)
        source.check(cfg, world_size)

    @classmethod
    def check_with_data(cls, cfg: DictConfig, num_train: int, world_size: int) -> None:
        NEGATIVES[cfg.method.negatives].check_with_data(cfg, num_train, world_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.negatives.on_load_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the step --------------------------------------------------------------------------------------------
    def contrastive_loss(self, views: list[Tensor], index: Tensor, labels: Tensor) -> StepOutput:
        m = self.cfg.method
        pair = len(views) == 2
        query_views = [0, 1] if (pair and m.symmetric) or self.negatives.every_view_queries else [0]
        feats, queries = self.embed_queries(views, query_views)
        other = (lambda i: 1 - i) if pair else (lambda i: i)
        keys = self.key_encoder.keys(views, self.negatives.key_views(query_views, other, len(views)), queries)
        logs: dict[str, Tensor] = {}
        loss = self.negatives.loss(queries, keys, other, index, labels, logs)
        self.negatives.after_loss(views, keys)
        return StepOutput(loss=loss, features=feats[0], logs=logs)

    def embed_queries(self, views: list[Tensor], query_views: list[int]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Backbone features and projections of the query views."""
        feats, queries = {}, {}
        if self.cfg.method.joint_views and len(query_views) > 1:
            # SimCLR's official code: both views in one batch, so BN statistics span all 2N images
            f, z = self.embed(torch.cat([views[i] for i in query_views]))
            for i, fi, zi in zip(query_views, f.chunk(len(query_views)), z.chunk(len(query_views))):
                feats[i], queries[i] = fi, zi
        else:
            for i in query_views:
                feats[i], queries[i] = self.embed(views[i])
        return feats, queries

    def on_train_start(self) -> None:
        self.negatives.on_train_start()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.key_encoder.after_step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.negatives.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.negatives.on_load_checkpoint(checkpoint)

    # -- the key path, for the dictionary's figures ------------------------------------------------------------
    def key_net(self, x: Tensor) -> Tensor:
        backbone, projector = self.key_encoder.nets()
        return projector(backbone(x))

    @torch.no_grad()
    def eval_key_net(self, x: Tensor) -> Tensor:
        """:meth:`key_net` with batch norm in eval mode (running statistics, not updated), modes restored after."""
        nets = self.key_encoder.nets()
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        try:
            return self.key_net(x)
        finally:
            for net, mode in zip(nets, modes):
                net.train(mode)

    def dictionary_stats(self) -> dict[str, float]:
        return self.negatives.stats()
