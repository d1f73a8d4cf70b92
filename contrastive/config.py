"""Typed schemas for every config group, so a mistyped key or a wrong type fails when Hydra composes.

The YAML files in ``conf/`` (installed as ``contrastive.conf``) fill these in. The rules on values that types cannot
express live with the component each key configures; :mod:`contrastive.validate` runs them before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from contrastive.errors import ConfigError


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
    test_fraction: float = 0.0  # >0: a test split read only by the final evaluation (data/datasets.py load_splits)
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
    feature_queue_size: int = 0  # per process, per large crop; 0: no queue
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
    split: str = "auto"  # the final evaluation's split: validation, test, or auto (test where the data has one)


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
    tuning: bool = False  # a trial of a tuning sweep: selects on validation, never reads the test split


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


def check_known_keys(cfg: Any) -> None:
    """Keys added with ``+`` under a typed group (``+method.temprature=0.1``, Hydra's own suggestion for a key it
    does not know) would be carried along and never read: refused, with the closest known key."""

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
