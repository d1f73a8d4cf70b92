"""Typed schemas for every config group, so a mistyped key or a wrong type fails when Hydra composes.

The YAML files in ``conf/`` (installed as ``contrastive.conf``) fill these in; ``validate`` then checks values that
types cannot express, before any training starts, and names the offending key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from contrastive.errors import ConfigError, ConfigWarning  # noqa: F401 (ConfigWarning: re-exported for callers)


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
    crops: str = "stored"  # full (imagefolder): training crops cut from each whole image (contrastive.data.crops)
    eval_crop: float = 1.0  # central fraction of each side kept for evaluation (0.875: Resize 256 + Crop 224)
    file: Optional[str] = None  # npz only: the archive, relative to data.root unless absolute
    on_device: bool = False  # in-memory sets: the training split on the device, no DataLoader (datamodule.py)


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
    random_order: bool = False  # the four ops in an order drawn per image (torchvision, SimCLR)


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
    grayscale_first: bool = False  # grey before the jitter (InstDisc, MoCo v1) instead of after (SimCLR, MoCo v2)
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
    pool_size: int = 1  # small_cnn: side of the pooled map (1: global average)
    fc_dim: int = 0  # small_cnn: >0 adds a fully connected layer (LeNet-style) after the pooling
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
    proj_batch_norm: bool = True  # BN after each hidden layer of the head (MoCo v2's official head has none)
    proj_final_bn: bool = False  # BN (scale, no offset) after the last layer, as SimCLR's official head
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
    nce_z: str = "random_start"  # loss=nce: Z against the paper's random bank (random_start) or the bank (first_batch)
    joint_views: bool = False  # both views through the encoder in one batch (BN over 2N), as SimCLR's code


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
    lars_eta: float = 0.001  # trust coefficient (SimCLR, SwAV); solo-learn's 0.02 goes with lars_clip
    lars_variant: str = "simclr"  # simclr (SimCLR's LARS) or larc (apex LARC around SGD, as SwAV)
    lars_clip: bool = False  # LARC's clipping: the layer's rate is min(trust ratio, lr)
    scale_lr: bool = True
    exclude_norm_bias: bool = True
    warmup_epochs: float = 1.0
    scheduler: str = "cosine"
    milestones: List[float] = field(default_factory=list)  # scheduler=step: epochs where the rate drops
    step_gamma: float = 0.1
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
    stages: bool = False  # probe every encoder stage at the end (kNN, few-shot linear): later stages serve better?


@dataclass
class PerfConfig:
    threads: Optional[int] = None  # CPU threads for torch (null: torch's default, one per core)
    # null threads on a CPU: give a core back to other processes while they keep it busy (see ThreadGovernor)
    adapt_threads: bool = True
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
    # the typed schemas live outside the user-facing groups, so that Hydra never offers them as options
    # (`method=instance_schema`); each preset extends its group's with `defaults: [/schema/<group>@_here_, _self_]`
    cs.store(group="schema", name="method_instance", node=InstanceConfig)
    cs.store(group="schema", name="method_swav", node=SwAVConfig)
    cs.store(group="schema", name="backbone", node=BackboneConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="augment", node=AugmentConfig)
    cs.store(group="schema", name="optim", node=OptimConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)


LOGGERS = ("csv", "tensorboard", "wandb", "none")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = (
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Any, world_size: int = 1) -> None:
    """Checks that need no data: names, signs, the shape constraints between keys, the devices asked for, and the
    checkpoint to resume from."""
    from contrastive.data.crops import CROP_SOURCES
    from contrastive.data.datasets import LOADERS
    from contrastive.methods import METHODS
    from contrastive.models import BACKBONES
    from contrastive.optim import LARS_VARIANTS, OPTIMIZERS, SCHEDULES

    m = cfg.method
    _require(m.name in METHODS, f"method.name={m.name!r} is not known; choose one of {', '.join(sorted(METHODS))}")
    _require(
        cfg.backbone.name in BACKBONES,
        f"backbone.name={cfg.backbone.name!r} is not known; choose one of {', '.join(BACKBONES)}",
    )
    b = cfg.backbone
    _require(b.pool_size >= 1, f"backbone.pool_size={b.pool_size} must be >= 1")
    _require(b.fc_dim >= 0, f"backbone.fc_dim={b.fc_dim} must be >= 0 (0: no fully connected layer)")
    _require(
        b.name == "small_cnn" or (b.pool_size, b.fc_dim) == (1, 0),
        f"backbone.pool_size and backbone.fc_dim apply to small_cnn only, not backbone.name={b.name!r}",
    )
    _require(cfg.data.name in LOADERS, f"data.name={cfg.data.name!r} is not known; choose one of {', '.join(LOADERS)}")
    _require(
        cfg.optim.name in OPTIMIZERS,
        f"optim.name={cfg.optim.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}",
    )
    _require(
        cfg.optim.scheduler in SCHEDULES,
        f"optim.scheduler={cfg.optim.scheduler!r} is not known; choose one of {', '.join(SCHEDULES)}",
    )
    _require(
        cfg.optim.scheduler != "step" or len(cfg.optim.milestones) > 0,
        "optim.scheduler=step needs optim.milestones (the epochs at which the rate drops), e.g. [120, 160]",
    )
    _require(
        cfg.optim.lars_variant in LARS_VARIANTS,
        f"optim.lars_variant={cfg.optim.lars_variant!r} is not known; choose one of {', '.join(LARS_VARIANTS)}",
    )
    _require(
        cfg.logger.name in LOGGERS, f"logger.name={cfg.logger.name!r} is not known; choose one of {', '.join(LOGGERS)}"
    )
    _require(
        str(cfg.trainer.precision) in PRECISIONS,
        f"trainer.precision={cfg.trainer.precision!r} is not known; choose one of {', '.join(PRECISIONS[:6])}",
    )
    _require(
        cfg.resume in (None, "auto"),
        f"resume={cfg.resume!r}: choose auto or null (use ckpt_path=<file> for a given checkpoint)",
    )
    for key, value in (("method.temperature", m.temperature), ("optim.lr", cfg.optim.lr)):
        _require(value > 0, f"{key}={value} must be > 0")
    _require(cfg.data.batch_size > 0, f"data.batch_size={cfg.data.batch_size} must be > 0")
    threads = cfg.perf.threads
    _require(threads is None or threads >= 1, f"perf.threads={threads} must be >= 1 (null: one per core)")
    in_batch = m.get("negatives") == "batch"
    _require(
        cfg.data.batch_size >= 2,
        f"data.batch_size={cfg.data.batch_size} must be >= 2: batch norm needs two samples per process"
        + (", and in-batch negatives (method.negatives=batch) need other samples in the batch" if in_batch else ""),
    )
    _require(
        cfg.trainer.max_epochs > 0 or cfg.trainer.max_steps > 0,
        f"trainer.max_epochs={cfg.trainer.max_epochs} must be > 0 (or set trainer.max_steps > 0)",
    )
    _require(m.num_views >= 1, f"method.num_views={m.num_views} must be >= 1")
    _check_at_least(cfg)
    validate_eval(cfg.eval)
    _check_known_keys(cfg)
    _check_crops(cfg)
    _require(cfg.data.crops in CROP_SOURCES, f"data.crops={cfg.data.crops!r}; choose one of {', '.join(CROP_SOURCES)}")
    _require(
        cfg.data.crops == "stored" or cfg.data.name == "imagefolder",
        f"data.crops=full cuts views from image files at their own resolution: only data=imagefolder has them, "
        f"not data.name={cfg.data.name!r}; use data.crops=stored",
    )
    _require(
        0 < cfg.data.eval_crop <= 1,
        f"data.eval_crop={cfg.data.eval_crop} must be in (0, 1] (the central fraction of each side kept)",
    )
    _check_devices(cfg.trainer)
    # the method's own rules, and those of its key encoder and source of negatives, live with them
    METHODS[m.name].check_config(cfg, world_size)
    if cfg.ckpt_path:
        check_resume(cfg, str(cfg.ckpt_path))


def validate_with_data(cfg: Any, num_train: int, world_size: int = 1) -> None:
    """Checks that need the training set's size."""
    m = cfg.method
    global_batch = cfg.data.batch_size * world_size
    _require(
        num_train >= global_batch,
        f"data.batch_size={cfg.data.batch_size}: the global batch ({global_batch}) is larger than the training set "
        f"({num_train} images) and drop_last would leave no batch",
    )
    from contrastive.methods import METHODS

    METHODS[m.name].check_with_data(cfg, num_train, world_size)


def _check_crops(cfg: Any) -> None:
    """Crops are resized to their size: larger than the image would only upsample, and multi-crop's small views are
    the local ones."""
    large, image = cfg.augment.large.size, cfg.data.image_size
    _require(
        large <= image,
        f"augment.large.size={large} is larger than data.image_size={image}; choose augment.large.size <= {image}",
    )
    if cfg.method.num_small_views > 0:
        small = cfg.augment.small.size
        _require(
            small < large,
            f"augment.small.size={small} must be smaller than augment.large.size={large} "
            f"(method.num_small_views={cfg.method.num_small_views} small crops are the local views)",
        )


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
    _require(
        accelerator in ACCELERATORS,
        f"trainer.accelerator={accelerator!r} is not known; choose one of {', '.join(ACCELERATORS)}",
    )
    try:
        requested = requested_devices(trainer.devices)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices={trainer.devices!r}: give a count, a list of indices, -1 or auto") from None
    import torch  # here, not at the top: `--help` and the config checks answer without loading torch

    if accelerator in ("gpu", "cuda"):
        _require(
            torch.cuda.is_available(),
            f"trainer.accelerator={accelerator} but no CUDA GPU is available here; "
            "use trainer.accelerator=cpu (or auto)",
        )
    if accelerator not in ("auto", "cpu", "gpu", "cuda") or requested is None:
        return
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available, kind = (torch.cuda.device_count(), "GPUs") if gpu else (os.cpu_count() or 1, "CPU cores")
    if isinstance(requested, int):
        _require(requested >= 1, f"trainer.devices={trainer.devices} must be >= 1, -1 (all) or auto")
        _require(
            requested <= available,
            f"trainer.devices={trainer.devices} but this machine has {available} {kind} "
            f"(trainer.accelerator={accelerator}); choose trainer.devices <= {available}",
        )
    else:
        _require(
            bool(requested) and all(0 <= d < available for d in requested),
            f"trainer.devices={trainer.devices}: device indices must be in 0..{available - 1} "
            f"(this machine has {available} {kind})",
        )


# keys a resumed run cannot honour: another optimiser (or other parameter groups) cannot take the saved optimiser
# state, and the random streams continue from the checkpoint whatever the seed
NOT_APPLIED_ON_RESUME = ("optim.exclude_norm_bias", "seed")


def check_resume(cfg: Any, path: str) -> None:
    """The checkpoint exists, can be read (checksums verified, no pickled code), was trained with the same method
    and optimiser, and differs from this config only in keys a resumed run applies. Everything else in the config
    applies on resume: the model and data are built from it, and ``ResumeSettings`` re-applies the optimiser's
    settings (learning rate, weight decay, momentum, schedule) over the checkpoint's."""
    from contrastive.checkpoints import checkpoint_method, read_checkpoint

    file = Path(path).expanduser()
    where = f"ckpt_path={path!r}" + ("" if file.is_absolute() else f" ({file.resolve()})")
    _require(
        file.is_file(),
        f"{where} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or resume=auto",
    )
    try:
        checkpoint = read_checkpoint(file)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    found, method = checkpoint_method(checkpoint), cfg.method.name
    _require(
        found == method,
        f"{where} was trained with method.name={found!r}, not {method!r}: resume it with "
        f"method={found}, or drop ckpt_path to start {method} afresh",
    )
    saved = checkpoint.get("hyper_parameters", {}).get("cfg", {})
    optim = saved.get("optim", {}).get("name")
    _require(
        optim in (None, cfg.optim.name),
        f"optim.name={cfg.optim.name}: {where} was trained with optim.name={optim!r}, whose state cannot be "
        f"loaded into another optimiser: resume it with optim={optim}, or drop ckpt_path to start afresh",
    )
    differ = []
    for key in NOT_APPLIED_ON_RESUME:
        before, now = _get(saved, key), _get(cfg, key)
        if before is not _ABSENT and before != now:
            differ.append(f"{key} (checkpoint {before}, now {now})")
    _require(
        not differ,
        f"{where}: these keys differ from the checkpoint's config and cannot be applied on resume: "
        f"{', '.join(differ)}; resume with the checkpoint's values (its run folder's config.yaml), or drop "
        "ckpt_path to start afresh",
    )


_ABSENT = object()


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(node, "get"):
            return _ABSENT
        node = node.get(part, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node


def _check_at_least(cfg: Any) -> None:
    """Counts and sizes that must be positive (or not negative): each would otherwise fail later, in a
    traceback from deep inside the model or the loader."""
    m, b = cfg.method, cfg.backbone
    checks = [
        ("method.proj_layers", m.proj_layers, 1),
        ("method.proj_hidden_dim", m.proj_hidden_dim, 1),
        ("method.proj_out_dim", m.proj_out_dim, 1),
        ("method.probe_size", m.probe_size, 1),
        ("method.num_small_views", m.num_small_views, 0),
        ("backbone.width", b.width, 1),
        ("backbone.depth", b.depth, 1),
        ("data.num_workers", cfg.data.num_workers, 0),
        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps, 1),
        ("trainer.check_val_every_n_epoch", cfg.trainer.check_val_every_n_epoch, 1),
        ("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches, 1),
    ]
    for key, value, least in checks:
        _require(value >= least, f"{key}={value} must be >= {least}")
    o = cfg.optim
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs} must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _require(o.probe_lr > 0, f"optim.probe_lr={o.probe_lr} must be > 0")


def validate_eval(e: Any) -> None:
    """The evaluation keys (``eval.*``), shared by training and ``python -m contrastive.evaluate``."""
    _require(e.knn_k >= 1, f"eval.knn_k={e.knn_k} must be >= 1")
    _require(e.knn_temperature > 0, f"eval.knn_temperature={e.knn_temperature} must be > 0")
    _require(e.fewshot_seeds >= 1, f"eval.fewshot_seeds={e.fewshot_seeds} must be >= 1")
    _require(all(shots >= 1 for shots in e.shots), f"eval.shots={list(e.shots)}: each must be >= 1")
    _require(e.linear_epochs >= 0, f"eval.linear_epochs={e.linear_epochs} must be >= 0 (0: no offline linear probe)")


def _check_known_keys(cfg: Any) -> None:
    """Keys added with ``+`` under a typed group (``+method.temprature=0.1``, Hydra's own suggestion for a key it
    does not know) would be carried along and never read: refused, with the closest known key."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    def walk(node: Any, prefix: str) -> None:
        kind = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(kind):
            return
        fields = {f.name for f in dataclasses.fields(kind)}
        for key in list(node):
            full = f"{prefix}{key}"
            if key not in fields:
                close = difflib.get_close_matches(str(key), sorted(fields), n=1)
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                group = prefix.rstrip(".") or "the config"
                raise ConfigError(f"{full} is not a key of {group}{hint} (keys added with + are not read)")
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{full}.")

    walk(cfg, "")
