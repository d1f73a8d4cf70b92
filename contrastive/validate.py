"""Every rule on a run's config, checked before any work. Each component states the rules of its own keys, beside the
code they configure (``check_config`` of the backbone, data, optimiser, trainer, logger, evaluation and method modules;
``check_resume`` with the checkpoints); this module only runs them, so a refused value raises ConfigError naming its
key before anything is built (exit 2, :mod:`contrastive.errors`)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from contrastive import data, evaluate, loggers, models, optim
from contrastive.checkpoints import check_resume
from contrastive.config import check_known_keys
from contrastive.errors import ConfigError, require
from contrastive.launch import check_trainer
from contrastive.methods import method_class

MAX_SEED = 2**32 - 1  # what every random generator a run seeds accepts


def validate(cfg: Any, world_size: int = 1) -> None:
    """Checks that need no data: names, signs, the shape constraints between keys, the devices asked for, and the
    checkpoint to resume from."""
    check_resolves(cfg)
    check_known_keys(cfg)
    method = method_class(cfg.method)
    method.check_shared(cfg)
    models.check_config(cfg.backbone)
    data.check_config(cfg)
    optim.check_config(cfg.optim)
    loggers.check_config(cfg.logger)
    check_trainer(cfg.trainer)
    evaluate.check_config(cfg.eval)
    evaluate.check_split(cfg)  # the test split: only where there is one, never in a tuning trial
    check_run_keys(cfg)
    method.check_config(cfg, world_size)
    if cfg.ckpt_path:
        check_resume(cfg, str(cfg.ckpt_path))


def validate_with_data(cfg: Any, num_train: int, world_size: int = 1) -> None:
    """Checks that need the training set's size."""
    global_batch = cfg.data.batch_size * world_size
    require(
        num_train >= global_batch,
        f"data.batch_size={cfg.data.batch_size}: the global batch ({global_batch}) is larger than the training set "
        f"({num_train} images) and drop_last would leave no batch",
    )
    method_class(cfg.method).check_with_data(cfg, num_train, world_size)


def check_resolves(cfg: Any) -> None:
    """Every ``${...}`` interpolation resolves (a missing key would otherwise fail wherever it is first read)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key} cannot be resolved: {str(err.msg).splitlines()[0]}") from None


def check_run_keys(cfg: Any) -> None:
    """The top-level keys of a run."""
    require(0 <= cfg.seed <= MAX_SEED, f"seed={cfg.seed} must be in [0, {MAX_SEED}]")
    require(
        cfg.resume in (None, "auto"),
        f"resume={cfg.resume!r}: choose auto or null (use ckpt_path=<file> for a given checkpoint)",
    )
    threads = cfg.perf.threads
    require(threads is None or threads >= 1, f"perf.threads={threads} must be >= 1 (null: one per core)")
