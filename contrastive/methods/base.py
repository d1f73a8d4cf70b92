"""Machinery every method shares.

* :class:`ContrastiveMethod`: backbone, projector, on-device augmentation, online probe, kNN monitor, optimiser and
  schedule. A method implements :meth:`~ContrastiveMethod.contrastive_loss` (and its config checks).
* :class:`InstanceDiscrimination`: queries against keys, for the methods whose negatives are instances: the key path
  (the query encoder itself, or a :class:`~contrastive.models.key_encoder.MomentumEncoder`) and a source of
  negatives (:mod:`contrastive.negatives`), each a module of its own; the figures of a stored dictionary.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Subset

from contrastive import distributed as dist
from contrastive.data.augment import build_augment, build_eval_transform
from contrastive.data.crops import CroppedViews, CropSpec
from contrastive.errors import require
from contrastive.metrics import alignment, embedding_std, knn_accuracy, uniformity
from contrastive.models import backbone_from_config, check_head, projection_head
from contrastive.models.key_encoder import KEY_ENCODERS, MomentumEncoder
from contrastive.negatives import NEGATIVES, Negatives
from contrastive.negatives.bank import BankNegatives
from contrastive.negatives.base import Probe, Step, StoredNegatives
from contrastive.optim import build_optimizer, warmup_cosine

FAMILIES = ("end-to-end", "memory bank", "momentum queue", "clustering")


def rename_legacy(state_dict: dict, prefix: str, names: dict[str, str]) -> None:
    """Rename, in place, tensors saved under an earlier layout: ``names`` maps an old name (a prefix when it ends
    with a dot) to its new one."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        for old, new in names.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                state_dict[prefix + new + name[len(old) :]] = state_dict.pop(key)
                break


@dataclass
class StepOutput:
    """What a method's loss step hands back to the shared training step."""

    loss: Tensor
    features: Tensor  # backbone features of the first view, for the online probe
    logs: dict[str, Tensor] = field(default_factory=dict)


class ContrastiveMethod(L.LightningModule):
    family: ClassVar[str | None] = None  # the survey's architecture (one of FAMILIES), written to metrics.json
    negatives_source: str = "none"  # metrics.json's `negatives`
    # tensors an earlier layout of the package saved under other names (old -> new; a prefix ends with a dot)
    legacy_names: ClassVar[dict[str, str]] = {}
    legacy_method_keys: ClassVar[dict[str, str]] = {}  # config keys renamed since (old -> new)

    def __init__(self, cfg: DictConfig | dict, num_train: int):
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        self.save_hyperparameters({"cfg": self.upgrade_config(cfg), "num_train": num_train})
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
    def check_shared(cls, cfg: DictConfig) -> None:
        """The ``method`` keys every method has (views, head, temperature, probe)."""
        m = cfg.method
        require(m.temperature > 0, f"method.temperature={m.temperature} must be > 0")
        require(m.num_views >= 1, f"method.num_views={m.num_views} must be >= 1")
        require(m.num_small_views >= 0, f"method.num_small_views={m.num_small_views} must be >= 0")
        require(m.probe_size >= 1, f"method.probe_size={m.probe_size} must be >= 1")
        check_head(m.proj_layers, m.proj_hidden_dim, m.proj_out_dim)

    @classmethod
    def check_config(cls, cfg: DictConfig, world_size: int) -> None:
        """The method's own config rules, run by ``contrastive.validate`` before any training; raise ConfigError
        naming the key."""

    @classmethod
    def check_with_data(cls, cfg: DictConfig, num_train: int, world_size: int) -> None:
        """Rules that need the training set's size (``contrastive.validate.validate_with_data``)."""

    def contrastive_loss(self, views: list[Tensor], step: Step) -> StepOutput:
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
        out = self.contrastive_loss(views, self.step_context(index, labels))
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

    def step_context(self, index: Tensor, labels: Tensor) -> Step:
        return Step(index, labels, self.global_step, self.cfg.seed, self.train_labels)

    def images_of(self, index: Tensor) -> Tensor:
        """Training images by index (uint8, untransformed), on the module's device."""
        train_set = self.trainer.datamodule.train_set
        return torch.stack([train_set[int(i)][0] for i in index]).to(self.device)

    # -- checkpoints of earlier layouts ---------------------------------------------------------------------
    @classmethod
    def upgrade_config(cls, cfg: dict) -> dict:
        """A saved config under today's keys (a copy): ``method`` keys renamed since (``legacy_method_keys``), and
        the unread ``method.version`` dropped."""
        cfg = copy.deepcopy(cfg)
        method = cfg.get("method", {})
        method.pop("version", None)
        for old, new in cls.legacy_method_keys.items():
            if old in method and new not in method:
                method[new] = method.pop(old)
        return cfg

    @classmethod
    def upgrade_state_dict(cls, state_dict: dict) -> dict:
        """A saved state dict under today's names (a copy)."""
        state_dict = dict(state_dict)
        rename_legacy(state_dict, "", cls.legacy_names)
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy(state_dict, prefix, self.legacy_names)  # children load after this, from the renamed names
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    """Queries against keys: query view i's positive is the key of view ``1 - i`` (or, with one view, the sample's own
    stored entry), its negatives come from :attr:`negatives`. Keys come from the query encoder itself, with gradient
    (:attr:`key_encoder` ``None``), or from a :class:`MomentumEncoder`. A subclass builds the two, in this order (both
    draw their start from the global random stream), and shows its step."""

    key_encoder: MomentumEncoder | None
    negatives: Negatives
    legacy_names: ClassVar[dict[str, str]] = {
        "key_backbone.": "key_encoder.backbone.",
        "key_projector.": "key_encoder.projector.",
        "momentum": "key_encoder.momentum",
        "bank.": "negatives.bank.",
        "queue.": "negatives.queue.",
        "log_z": "negatives.log_z",
    }

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
            not source.pairs_only or m.num_views == 2,
            f"method.num_views={m.num_views}: negatives={m.negatives} needs 2 views (a positive pair); "
            "only the memory bank can use 1 (its positive is the stored entry)",
        )
        require(m.num_views <= 2, f"method.num_views={m.num_views} must be 1 or 2 for {m.name}")
        if m.key_encoder == "momentum":
            MomentumEncoder.check(cfg)
        source.check(cfg, world_size)

    @classmethod
    def check_with_data(cls, cfg: DictConfig, num_train: int, world_size: int) -> None:
        NEGATIVES[cfg.method.negatives].check_with_data(cfg, num_train, world_size)

    # -- building blocks of a step ---------------------------------------------------------------------------
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

    def record_drift(self, step: Step, view: Tensor) -> None:
        """The stored dictionary's drift probe sees the view whose keys were just written."""
        if isinstance(self.negatives, StoredNegatives):
            self.negatives.record_drift(step.global_step, view, self.eval_key_net)

    def on_train_start(self) -> None:
        self.negatives.on_train_start(self.steps_per_epoch(max(int(self.trainer.estimated_stepping_batches), 1)))
        if isinstance(self.negatives, BankNegatives) and self.negatives.needs_fill():
            self.encode_bank(self.negatives)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.key_encoder is not None:
            self.key_encoder.update(self.backbone, self.projector, self.progress())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(self.negatives, StoredNegatives):
            checkpoint["drift_probe"] = self.negatives.drift.state_dict()  # not a module: beside the state dict

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(self.negatives, StoredNegatives) and "drift_probe" in checkpoint:  # older ones start it empty
            self.negatives.drift.load_state_dict(checkpoint["drift_probe"])

    @torch.no_grad()
    def encode_bank(self, negatives: BankNegatives) -> None:
        """``bank_init=encoder``: every entry starts as the untrained key encoder's embedding of an augmented view of
        its image, so the first epoch's positives are the image's own features rather than random vectors."""
        dm = getattr(self.trainer, "datamodule", None)
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
        with self.trainer.precision_plugin.forward_context():
            for images, _, index in loader:
                view = self.augment.large(images.to(self.device))  # one view: the others would be discarded
                if self.cfg.perf.channels_last:  # as training_step feeds the model
                    view = view.contiguous(memory_format=torch.channels_last)
                keys = self.key_net(view)
                negatives.bank.fill(dist.gather(index.to(self.device)), dist.gather(keys))
        seconds = time.perf_counter() - start
        rank_zero_info(f"memory bank: {n} entries encoded by the initial key encoder in {seconds:.0f} s")

    # -- the key path, for the dictionary's figures ------------------------------------------------------------
    def key_nets(self) -> tuple[nn.Module, nn.Module]:
        if self.key_encoder is None:
            return self.backbone, self.projector
        return self.key_encoder.backbone, self.key_encoder.projector

    def key_net(self, x: Tensor) -> Tensor:
        backbone, projector = self.key_nets()
        return projector(backbone(x))

    @torch.no_grad()
    def eval_key_net(self, x: Tensor) -> Tensor:
        """:meth:`key_net` with batch norm in eval mode (running statistics, not updated), modes restored after."""
        nets = self.key_nets()
        modes = [net.training for net in nets]
        for net in nets:
            net.eval()
        try:
            return self.key_net(x)
        finally:
            for net, mode in zip(nets, modes):
                net.train(mode)

    def dictionary_stats(self) -> dict[str, float]:
        attached = self._trainer is not None
        dm = getattr(self.trainer, "datamodule", None) if attached else None
        probe = Probe(
            key_net=self.eval_key_net,
            global_step=self.global_step,
            steps_per_epoch=self.steps_per_epoch(max(int(self.trainer.estimated_stepping_batches), 1))
            if attached
            else 1,
            global_batch=self.global_batch_size,
            num_train=self.num_train,
            images=self._probe_images,
            index=self._probe_index,
            transform=self.eval_transform,
            images_of=self.images_of if dm is not None else None,
        )
        return self.negatives.stats(probe)
