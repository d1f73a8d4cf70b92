"""Typed schemas for every config group, so a mistyped key or a wrong type fails when Hydra composes.

The YAML files in ``contrastive/conf`` fill these in; ``validate`` then checks values that types cannot express,
before any training starts, and names the offending key.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    batch_size: int = 128
    num_workers: int = 0
    image_size: int = 16
    small_size: int = 8
    channels: int = 1
    num_classes: int = 10
    mean: List[float] = field(default_factory=lambda: [0.5])
    std: List[float] = field(default_factory=lambda: [0.5])
    flip: bool = False
    val_fraction: float = 0.2
    split_seed: int = 0
    size: int = 2048
    subset: Optional[str] = None
    load_size: int = 0


@dataclass
class CropConfig:
    size: int = 32
    scale: List[float] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class JitterConfig:
    p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1


@dataclass
class BlurConfig:
    p: float = 0.5
    sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class CutoutConfig:
    p: float = 0.0
    size: float = 0.25


@dataclass
class AugmentConfig:
    large: CropConfig = field(default_factory=CropConfig)
    small: CropConfig = field(default_factory=CropConfig)
    hflip: float = 0.5
    rotation: float = 0.0
    translate: float = 0.0
    color_jitter: JitterConfig = field(default_factory=JitterConfig)
    grayscale: float = 0.2
    blur: BlurConfig = field(default_factory=BlurConfig)
    solarize: float = 0.0
    noise: float = 0.0
    cutout: CutoutConfig = field(default_factory=CutoutConfig)


@dataclass
class BackboneConfig:
    name: str = "small_cnn"
    small_images: bool = True
    width: int = 32
    depth: int = 4
    pool_size: int = 1      # small_cnn: side of the pooled map (1: global average)
    fc_dim: int = 0         # small_cnn: >0 adds a fully connected layer (LeNet-style) after the pooling
    sync_batchnorm: bool = False


@dataclass
class MethodConfig:
    """Keys every method has: which views it sees, its head and its temperature."""

    name: str = MISSING
    temperature: float = 0.1
    num_views: int = 2
    num_small_views: int = 0
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 2
    probe_size: int = 256


@dataclass
class InstanceConfig(MethodConfig):
    """Instance discrimination as two axes: the key encoder and the source of negatives (see README)."""

    version: Optional[str] = None
    key_encoder: str = "shared"
    negatives: str = "batch"
    loss: str = "info_nce"
    symmetric: bool = True
    momentum: float = 0.99
    momentum_schedule: str = "constant"
    shuffle_bn: bool = True
    bn_splits: int = 8
    queue_size: int = 4096
    num_negatives: Optional[int] = None
    bank_momentum: float = 0.5
    bank_init: str = "encoder"


@dataclass
class SwAVConfig(MethodConfig):
    num_prototypes: int = 100
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = -1
    queue_size: int = 0
    queue_start_epoch: int = 0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    lars_eta: float = 0.02
    scale_lr: bool = True
    exclude_norm_bias: bool = True
    warmup_epochs: float = 1.0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    probe_lr: float = 0.1


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 30
    max_steps: int = -1
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    deterministic: Any = False
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    benchmark: Optional[bool] = None


@dataclass
class LoggerConfig:
    name: str = "csv"
    project: str = "contrastive"
    offline: Optional[bool] = None


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    shots: List[int] = field(default_factory=lambda: [1, 10])
    fewshot_seeds: int = 5
    linear_epochs: int = 100
    final: bool = True
    init: bool = True
    pixels: bool = True


@dataclass
class PerfConfig:
    threads: Optional[int] = None   # CPU threads for torch (null: torch's default, one per core)
    channels_last: bool = False
    compile: bool = False
    matmul_precision: str = "high"


@dataclass
class Config:
    method: Any = MISSING
    backbone: BackboneConfig = MISSING
    data: DataConfig = MISSING
    augment: AugmentConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    seed: int = 0
    ckpt_path: Optional[str] = None
    resume: Optional[str] = None
    diagnostics: bool = True
    output_dir: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="method", name="instance_schema", node=InstanceConfig)
    cs.store(group="method", name="swav_schema", node=SwAVConfig)
    cs.store(group="backbone", name="schema", node=BackboneConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="augment", name="schema", node=AugmentConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


class ConfigWarning(UserWarning):
    """A config value that runs but is unlikely to be what was meant."""


INSTANCE_METHODS = ("simclr", "memory_bank", "moco")
KEY_ENCODERS = ("shared", "momentum")
NEGATIVE_SOURCES = ("batch", "bank", "queue")
BANK_INITS = ("random", "encoder")
LOGGERS = ("csv", "wandb", "none")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Any, world_size: int = 1) -> None:
    """Checks that need no data: names, signs, the shape constraints between keys, the devices asked for, and the
    checkpoint to resume from."""
    from contrastive.data.datasets import LOADERS
    from contrastive.methods import METHODS
    from contrastive.models import BACKBONES
    from contrastive.optim import OPTIMIZERS, SCHEDULES

    m = cfg.method
    _require(m.name in METHODS, f"method.name={m.name!r} is not known; choose one of {', '.join(sorted(METHODS))}")
    _require(cfg.backbone.name in BACKBONES, f"backbone.name={cfg.backbone.name!r} is not known; choose one of {', '.join(BACKBONES)}")
    b = cfg.backbone
    _require(b.pool_size >= 1, f"backbone.pool_size={b.pool_size} must be >= 1")
    _require(b.fc_dim >= 0, f"backbone.fc_dim={b.fc_dim} must be >= 0 (0: no fully connected layer)")
    _require(b.name == "small_cnn" or (b.pool_size, b.fc_dim) == (1, 0),
             f"backbone.pool_size and backbone.fc_dim apply to small_cnn only, not backbone.name={b.name!r}")
    _require(cfg.data.name in LOADERS, f"data.name={cfg.data.name!r} is not known; choose one of {', '.join(LOADERS)}")
    _require(cfg.optim.name in OPTIMIZERS, f"optim.name={cfg.optim.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    _require(cfg.optim.scheduler in SCHEDULES,
             f"optim.scheduler={cfg.optim.scheduler!r} is not known; choose one of {', '.join(SCHEDULES)}")
    _require(cfg.logger.name in LOGGERS, f"logger.name={cfg.logger.name!r} is not known; choose one of {', '.join(LOGGERS)}")
    _require(str(cfg.trainer.precision) in PRECISIONS,
             f"trainer.precision={cfg.trainer.precision!r} is not known; choose one of {', '.join(PRECISIONS[:6])}")
    _require(cfg.resume in (None, "auto"), f"resume={cfg.resume!r}: choose auto or null (use ckpt_path=<file> for a given checkpoint)")
    for key, value in (("method.temperature", m.temperature), ("optim.lr", cfg.optim.lr)):
        _require(value > 0, f"{key}={value} must be > 0")
    _require(cfg.data.batch_size > 0, f"data.batch_size={cfg.data.batch_size} must be > 0")
    threads = cfg.perf.threads
    _require(threads is None or threads >= 1, f"perf.threads={threads} must be >= 1 (null: one per core)")
    in_batch = m.name in INSTANCE_METHODS and m.negatives == "batch"
    _require(cfg.data.batch_size >= 2,
             f"data.batch_size={cfg.data.batch_size} must be >= 2: batch norm needs two samples per process"
             + (", and in-batch negatives (method.negatives=batch) need other samples in the batch" if in_batch else ""))
    _require(cfg.trainer.max_epochs > 0 or cfg.trainer.max_steps > 0,
             f"trainer.max_epochs={cfg.trainer.max_epochs} must be > 0 (or set trainer.max_steps > 0)")
    _require(m.num_views >= 1, f"method.num_views={m.num_views} must be >= 1")
    _check_crops(cfg)
    _check_devices(cfg.trainer)
    global_batch = cfg.data.batch_size * world_size
    if m.name in INSTANCE_METHODS:
        _require(m.key_encoder in KEY_ENCODERS, f"method.key_encoder={m.key_encoder!r}; choose one of {', '.join(KEY_ENCODERS)}")
        _require(m.negatives in NEGATIVE_SOURCES, f"method.negatives={m.negatives!r}; choose one of {', '.join(NEGATIVE_SOURCES)}")
        _require(m.loss in ("info_nce", "nce"), f"method.loss={m.loss!r}; choose info_nce or nce")
        _require(m.loss == "info_nce" or m.negatives == "bank", "method.loss=nce needs method.negatives=bank")
        _require(m.negatives == "bank" or m.num_views == 2,
                 f"method.num_views={m.num_views}: negatives={m.negatives} needs 2 views (a positive pair); "
                 "only the memory bank can use 1 (its positive is the stored entry)")
        _require(m.num_views <= 2, f"method.num_views={m.num_views} must be 1 or 2 for {m.name}")
        _require(0 <= m.momentum <= 1, f"method.momentum={m.momentum} must be in [0, 1]")
        _require(0 <= m.bank_momentum < 1, f"method.bank_momentum={m.bank_momentum} must be in [0, 1)")
        _require(m.bank_init in BANK_INITS, f"method.bank_init={m.bank_init!r}; choose one of {', '.join(BANK_INITS)}")
        if m.negatives == "queue":
            _require(m.queue_size > 0 and m.queue_size % global_batch == 0,
                     f"method.queue_size={m.queue_size} must be a positive multiple of the global batch "
                     f"({cfg.data.batch_size} x {world_size} processes = {global_batch}), or the queue is silently truncated")
        if m.num_negatives is not None:
            _require(m.num_negatives > 0, f"method.num_negatives={m.num_negatives} must be > 0")
    if cfg.ckpt_path:
        _check_checkpoint(str(cfg.ckpt_path), m.name)


def validate_with_data(cfg: Any, num_train: int, world_size: int = 1) -> None:
    """Checks that need the training set's size."""
    m = cfg.method
    global_batch = cfg.data.batch_size * world_size
    _require(num_train >= global_batch,
             f"data.batch_size={cfg.data.batch_size}: the global batch ({global_batch}) is larger than the training set "
             f"({num_train} images) and drop_last would leave no batch")
    if m.name in INSTANCE_METHODS and m.negatives == "bank" and m.num_negatives is not None:
        _require(m.num_negatives < num_train,
                 f"method.num_negatives={m.num_negatives} must be smaller than the bank ({num_train} training images)")
    if m.name == "swav" and m.num_prototypes > num_train // 2:
        warnings.warn(
            f"method.num_prototypes={m.num_prototypes} for {num_train} training images: with more than one "
            f"prototype per two images the equipartitioned codes cannot group images; use at most {num_train // 2} "
            "(about 10x the number of classes works on small data)", ConfigWarning, stacklevel=2)


def _check_crops(cfg: Any) -> None:
    """Crops are resized to their size: larger than the image would only upsample, and multi-crop's small views are
    the local ones."""
    large, image = cfg.augment.large.size, cfg.data.image_size
    _require(large <= image, f"augment.large.size={large} is larger than data.image_size={image}; "
             f"choose augment.large.size <= {image}")
    if cfg.method.num_small_views > 0:
        small = cfg.augment.small.size
        _require(small < large, f"augment.small.size={small} must be smaller than augment.large.size={large} "
                 f"(method.num_small_views={cfg.method.num_small_views} small crops are the local views)")


def requested_devices(devices: Any) -> int | list[int] | None:
    """``trainer.devices`` as a count, a list of device indices, or ``None`` for all of them (``auto``, -1)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        devices = int(text)
    if isinstance(devices, int):
        return None if devices == -1 else devices
    return [int(d) for d in devices]


def _check_devices(trainer: Any) -> None:
    """The accelerator exists on this machine and has as many devices as asked for (Lightning would fail later,
    with a traceback)."""
    accelerator = str(trainer.accelerator)
    _require(accelerator in ACCELERATORS,
             f"trainer.accelerator={accelerator!r} is not known; choose one of {', '.join(ACCELERATORS)}")
    try:
        requested = requested_devices(trainer.devices)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices={trainer.devices!r}: give a count, a list of indices, -1 or auto") from None
    if accelerator in ("gpu", "cuda"):
        _require(torch.cuda.is_available(), f"trainer.accelerator={accelerator} but no CUDA GPU is available here; "
                 "use trainer.accelerator=cpu (or auto)")
    if accelerator not in ("auto", "cpu", "gpu", "cuda") or requested is None:
        return
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available, kind = (torch.cuda.device_count(), "GPUs") if gpu else (os.cpu_count() or 1, "CPU cores")
    if isinstance(requested, int):
        _require(requested >= 1, f"trainer.devices={trainer.devices} must be >= 1, -1 (all) or auto")
        _require(requested <= available, f"trainer.devices={trainer.devices} but this machine has {available} {kind} "
                 f"(trainer.accelerator={accelerator}); choose trainer.devices <= {available}")
    else:
        _require(bool(requested) and all(0 <= d < available for d in requested),
                 f"trainer.devices={trainer.devices}: device indices must be in 0..{available - 1} "
                 f"(this machine has {available} {kind})")


def _check_checkpoint(path: str, method: str) -> None:
    """The checkpoint exists, can be read and was trained with the same method."""
    from contrastive.callbacks import checkpoint_method, read_checkpoint

    file = Path(path).expanduser()
    where = f"ckpt_path={path!r}" + ("" if file.is_absolute() else f" ({file.resolve()})")
    _require(file.is_file(), f"{where} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)"
             " or resume=auto")
    try:
        found = checkpoint_method(read_checkpoint(file))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    _require(found == method, f"{where} was trained with method.name={found!r}, not {method!r}: resume it with "
             f"method={found}, or drop ckpt_path to start {method} afresh")
