"""Train one method: ``train(cfg)`` returns the run's summary metrics; ``python -m contrastive.train`` wraps it.

A run folder holds the resolved config (``config.yaml``), the CSV logs, ``checkpoints/last.ckpt`` and
``metrics.json`` (the summary; ``history`` inside it has one entry per epoch).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from contrastive.config import ConfigError, register_configs, validate, validate_with_data
from contrastive.errors import (
    FAILED,
    REFUSED,
    STATE,
    DataError,
    RunStopped,
    TrainingDiverged,
    clean_error_message,
    json_safe,
    record_job,
    run_cli,
)

if TYPE_CHECKING:
    import lightning as L

    from contrastive.callbacks import DivergenceGuard

# torch, Lightning and the package's modules that need them are imported inside `train`: `--help` and a config
# Hydra rejects answer in a second instead of after the several seconds those imports take.
log = logging.getLogger("contrastive")
register_configs()


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def build_logger(cfg: DictConfig, out: Path):
    from lightning.pytorch.loggers import CSVLogger

    if cfg.logger.name == "none":
        return False
    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:
            offline = os.environ.get("WANDB_MODE") != "online" and not os.environ.get("WANDB_API_KEY")
        return [
            CSVLogger(out, name="logs", version=""),
            WandbLogger(project=cfg.logger.project, save_dir=str(out), offline=offline),
        ]
    if cfg.logger.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # event files in RUN/tensorboard (`tensorboard --logdir RUN`); the CSV beside them feeds the report
        return [CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="tensorboard", version="")]
    if cfg.logger.name != "csv":
        raise ConfigError(f"logger.name={cfg.logger.name!r} is not known; choose csv, tensorboard, wandb or none")
    return CSVLogger(out, name="logs", version="")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data``; returns the summary written to ``metrics.json``."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from contrastive.callbacks import (
        CollapseWatch,
        DivergenceGuard,
        History,
        ProgressBar,
        ResumeSettings,
        RNGState,
        ThreadGovernor,
        Throughput,
    )
    from contrastive.checkpoints import (
        AtomicCheckpointIO,
        check_compatible,
        check_run_folder,
        keep_previous_log,
        last_checkpoint,
        prepare_checkpoint_folder,
        resume_checkpoint,
    )
    from contrastive.data.datamodule import ContrastiveDataModule
    from contrastive.evaluate import evaluate_encoder, evaluate_features, evaluate_stages, extract_features
    from contrastive.launch import build_plugins, build_strategy, world_size
    from contrastive.methods import build_method
    from contrastive.summary import peak_memory_mb, print_summary, run_overrides

    out = output_dir(cfg)
    world = world_size(cfg.trainer)
    validate(cfg, world_size=world)
    ckpt_path = resume_checkpoint(cfg, out)
    check_run_folder(out, ckpt_path, auto=cfg.resume == "auto" and not cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.perf.threads:
        torch.set_num_threads(cfg.perf.threads)  # parallel jobs on one machine: cores / jobs each
    torch.set_float32_matmul_precision(cfg.perf.matmul_precision)

    datamodule = ContrastiveDataModule(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    validate_with_data(cfg, datamodule.num_train, world_size=world)
    model = build_method(cfg, datamodule.num_train)
    start_step = int(check_compatible(model, ckpt_path).get("global_step", -1)) if ckpt_path else -1
    prepare_checkpoint_folder(out / "checkpoints")
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)

    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    )
    summary: dict[str, Any] = {}
    # srun (SLURM) and torchrun start every rank before Lightning runs: they set SLURM_PROCID / RANK, not LOCAL_RANK
    rank_zero = all(int(os.environ.get(k, "0")) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))
    if rank_zero and cfg.eval.init:
        model.to(device)
        summary.update(
            evaluate_encoder(
                model.backbone, model.eval_transform, datamodule, cfg.eval, device, prefix="init_", full=False
            )
        )
        model.cpu()
    if rank_zero and cfg.eval.pixels:
        train_loader, val_loader = datamodule.eval_loaders()
        pixels = [extract_features(None, model.eval_transform, loader, device) for loader in (train_loader, val_loader)]
        summary.update(evaluate_features(*pixels, datamodule.num_classes, cfg.eval, prefix="pixels_", full=False))

    # the baselines above draw from the global RNG (loaders); re-seed so training is the same with or without them
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    previous_config = (out / "config.yaml").read_text() if ckpt_path and (out / "config.yaml").is_file() else None
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        keep_previous_log(out / "logs" / "metrics.csv")
    history, throughput = History(), Throughput()
    guard = DivergenceGuard(
        check_every=cfg.trainer.log_every_n_steps, folder=out / "checkpoints", resumed_from=ckpt_path
    )
    callbacks: list[Callback] = [
        last_checkpoint(out / "checkpoints"),
        history,
        throughput,
        RNGState(),
        guard,
        CollapseWatch(),
        ResumeSettings(),
    ]
    if cfg.perf.adapt_threads and not cfg.perf.threads:
        callbacks.append(ThreadGovernor())
    if cfg.logger.name != "none":  # Lightning refuses a learning-rate monitor without a logger
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.trainer.enable_progress_bar:
        callbacks.append(ProgressBar(leave=True))
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = build_strategy(cfg)
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=str(out),
        logger=build_logger(cfg, out),
        callbacks=callbacks,
        sync_batchnorm=cfg.backbone.sync_batchnorm,
        plugins=[AtomicCheckpointIO(), *build_plugins()],
    )
    if cfg.perf.compile:
        # in place: torch.compile's wrapper would prefix every saved name with `_orig_mod.`, and the checkpoint
        # would neither resume nor export without compile
        model.backbone.compile()

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        raise RunStopped(stopped_message(trainer, guard, "SIGTERM"), 128 + signal.SIGTERM) from None
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1)
            raise RunStopped(stopped_message(trainer, guard, "SIGINT"), 128 + signal.SIGINT) from None
        raise
    train_time = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    if ckpt_path and trainer.global_step == start_step and (out / "metrics.json").is_file():
        # resumed a finished run: nothing trained, and its summary stays as it was
        log.info("the run in %s had already finished (step %d); its metrics.json is kept", out, start_step)
        if previous_config is not None:  # config.yaml says what ran
            (out / "config.yaml").write_text(previous_config)
        return json.loads((out / "metrics.json").read_text())

    device = model.device if model.device.type != "meta" else device
    model.to(device)
    summary.update(
        {
            "method": cfg.method.name,
            "data": cfg.data.name,
            "backbone": cfg.backbone.name,
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "global_batch_size": cfg.data.batch_size * trainer.world_size,
            "key_encoder": cfg.method.get("key_encoder"),
            "negatives": getattr(model, "negatives_source", None),
            "images_per_sec": round(throughput.images_per_sec, 1),
            "peak_mem_mb": round(peak_memory_mb(device), 1),
            "train_time_s": round(train_time, 1),
            "startup_s": throughput.startup_s,
            "final_loss": None,
        }
    )
    last = history.records[-1] if history.records else {}
    loss = trainer.callback_metrics.get("train/loss_epoch", last.get("loss"))
    summary["final_loss"] = round(float(loss), 4) if loss is not None else None
    for key in (
        "linear_acc",
        "negatives_per_query",
        "dictionary_size",
        "staleness",
        "staleness_age_steps",
        "false_negative_rate",
        "alignment",
        "uniformity",
        "embedding_std",
        "prototype_entropy",
        "drift",
        "drift_age_steps",
        "drift_age_epochs",
        "dictionary_ratio",
    ):
        # a step budget can end inside an epoch, whose record then lacks the end-of-epoch figures: the latest one
        value = next((record[key] for record in reversed(history.records) if key in record), None)
        if value is not None:
            summary[key] = value
    if cfg.eval.final:
        summary.update(evaluate_encoder(model.backbone, model.eval_transform, datamodule, cfg.eval, device))
    if cfg.eval.stages:
        summary.update(evaluate_stages(model.backbone, model.eval_transform, datamodule, cfg.eval, device))
    summary["overrides"] = run_overrides()
    summary["history"] = history.records
    summary = json_safe(summary)  # JSON has no NaN: a non-finite figure is written as null
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    print_summary(summary, out)
    return summary


def stopped_message(trainer: L.Trainer, guard: DivergenceGuard, signal_name: str) -> str:
    """Where a run stopped by a signal stopped, and which checkpoint holds it."""
    where = f"stopped by {signal_name} at step {trainer.global_step} (epoch {trainer.current_epoch})"
    if guard.saved is not None:
        path = guard.folder / "last.ckpt"
        return (
            f"{where}; {path} holds the end of epoch {guard.saved['epoch']} (step {guard.saved['step']}): "
            f"continue with resume=auto in this run folder (or ckpt_path={path})"
        )
    if guard.resumed_from:
        return (
            f"{where}; no checkpoint was written since it resumed from {guard.resumed_from}, which still holds "
            "the run: continue with resume=auto in this run folder (or that ckpt_path)"
        )
    return f"{where}; no checkpoint had been written yet (the first is at the end of epoch 0): start it again"


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="pkg://contrastive.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Exit codes: see :mod:`contrastive.errors`. In a multirun a failed job is reported and the sweep goes on;
    the sweep's report (``errors.SweepReport``) lists the failures at the end and sets the exit code."""
    STATE["job_started"] = True
    multirun = _in_multirun()
    try:
        train(cfg)
    except (ConfigError, DataError, TrainingDiverged, RunStopped) as err:
        code = err.code if isinstance(err, RunStopped) else FAILED if isinstance(err, TrainingDiverged) else REFUSED
        message = clean_error_message(err)
        print(f"error: {message}", file=sys.stderr)
        if multirun:
            record_job(code, message)
            if not isinstance(err, RunStopped):  # a stop request ends the whole sweep
                return
        sys.exit(code)
    except Exception as err:
        if not multirun:
            raise
        traceback.print_exc()
        record_job(FAILED, f"{type(err).__name__}: {err}")
        return
    if multirun:
        record_job(0)


if __name__ == "__main__":
    run_cli(main)
