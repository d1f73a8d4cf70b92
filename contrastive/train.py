"""Train one method: ``train(cfg)`` returns the run's summary metrics; ``python -m contrastive.train`` wraps it.

A run folder holds the resolved config (``config.yaml``), the CSV logs, ``checkpoints/last.ckpt`` and
``metrics.json`` (the summary; ``history`` inside it has one entry per epoch).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from contrastive.config import register_configs
from contrastive.errors import (
    FAILED,
    REFUSED,
    STATE,
    ConfigError,
    DataError,
    RunStopped,
    TrainingDiverged,
    clean_error_message,
    record_job,
    run_cli,
)
from contrastive.runlock import locks_run_folder

# torch, Lightning and the package's modules that need them are imported when a run starts (contrastive.training):
# `--help` and a config Hydra rejects answer in a second instead of after the several seconds those imports take.
log = logging.getLogger("contrastive")
register_configs()


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    out = Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
    with open_dict(cfg):  # the lock and the run must agree on the folder, whatever the clock says by then
        cfg.output_dir = str(out)
    return out


@locks_run_folder(output_dir)  # one run at a time in a run folder, from its checks to its summary
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data``; returns the summary written to ``metrics.json``. The steps are in
    :mod:`contrastive.training`."""
    from contrastive import training

    return training.train(cfg, output_dir(cfg))


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def objective(cfg: DictConfig, summary: dict[str, Any]) -> float | None:
    """What a tuning sweep's sampler (hydra-optuna-sweeper) is told: the trial's final kNN accuracy on the validation
    split; None outside tuning (nothing to tell)."""
    if not cfg.get("tuning", False) or not summary:  # not tuning, or not the process that evaluates
        return None
    if summary.get("eval_split") != "validation":  # check_split refuses this before work: a second lock
        split = summary.get("eval_split")
        raise ConfigError(f"a tuning trial selects on validation, but its figures come from {split}")
    return float(summary["knn_acc"])


@hydra.main(config_path="pkg://contrastive.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Exit codes: see :mod:`contrastive.errors`. In a multirun a failed job is reported and the sweep goes on;
    the sweep's report (``errors.SweepReport``) lists the failures at the end and sets the exit code. A tuning trial
    returns its objective (:func:`objective`); one that diverged returns NaN, which the sampler records as a failed
    trial, and counts as a finished job: a learning rate that diverges is a result of the search, not an error."""
    STATE["job_started"] = True
    multirun = _in_multirun()
    try:
        summary = train(cfg)
    except (ConfigError, DataError, TrainingDiverged, RunStopped) as err:
        code = err.code if isinstance(err, RunStopped) else FAILED if isinstance(err, TrainingDiverged) else REFUSED
        message = clean_error_message(err)
        print(f"error: {message}", file=sys.stderr)
        if multirun:
            tuned_away = isinstance(err, TrainingDiverged) and cfg.get("tuning", False)
            record_job(0 if tuned_away else code, message)
            if tuned_away:
                return float("nan")
            if not isinstance(err, RunStopped):  # a stop request ends the whole sweep
                return None
        sys.exit(code)
    except Exception as err:
        if not multirun:
            raise
        traceback.print_exc()
        record_job(FAILED, f"{type(err).__name__}: {err}")
        return None
    if multirun:
        record_job(0)
    return objective(cfg, summary)


if __name__ == "__main__":
    run_cli(main)
