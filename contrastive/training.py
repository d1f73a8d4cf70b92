"""The training flow behind ``contrastive.train.train``, as named steps: check the config and the run folder, build
the data and the method, measure the baselines, fit, and write the summary. (``contrastive.train`` imports this
module only when a run starts, so ``--help`` answers without loading torch.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from contrastive import methods
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
    check_finished_settings,
    check_run_folder,
    keep_previous_log,
    last_checkpoint,
    prepare_checkpoint_folder,
    resume_checkpoint,
)
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.errors import RunStopped, json_safe
from contrastive.evaluate import evaluate_encoder, evaluate_features, evaluate_stages, extract_features, final_split
from contrastive.flops_callback import FlopsCallback
from contrastive.launch import build_plugins, build_strategy, world_size
from contrastive.loggers import build_logger
from contrastive.methods import ContrastiveMethod
from contrastive.summary import history_figures, peak_memory_mb, print_summary, run_overrides
from contrastive.validate import validate, validate_with_data

log = logging.getLogger("contrastive")


@dataclass
class Run:
    """Where a run writes and what it resumes."""

    out: Path
    world: int
    ckpt_path: str | None
    start_step: int = -1  # the resumed checkpoint's step
    previous_config: str | None = None  # the resumed run's config.yaml, kept if nothing trains


def train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    run = prepare(cfg, out)
    datamodule, model = build(cfg, run)
    device = training_device(cfg)
    summary = baselines(cfg, model, datamodule, device)
    # the baselines draw from the global RNG (loaders); re-seed so training is the same with or without them
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_config(cfg, run)
    callbacks = Callbacks(cfg, run)
    trainer = build_trainer(cfg, run, callbacks)
    train_time = fit(trainer, model, datamodule, run, callbacks.guard)
    if not trainer.is_global_zero:
        return {}
    if run.ckpt_path and trainer.global_step == run.start_step and (run.out / "metrics.json").is_file():
        return kept_summary(run)
    model.to(model.device if model.device.type != "meta" else device)
    summary.update(run_figures(cfg, trainer, model, callbacks, train_time))
    summary.update(split_names(cfg, datamodule))
    summary.update(final_evaluation(cfg, model, datamodule))
    return write_summary(run, summary, callbacks.history)


# -- the steps --------------------------------------------------------------------------------------------------
def prepare(cfg: DictConfig, out: Path) -> Run:
    """Every config check that needs no data, the checkpoint to resume and the run folder's state; then seeds and
    threads."""
    world = world_size(cfg.trainer)
    validate(cfg, world_size=world)
    ckpt_path = resume_checkpoint(cfg, out)
    auto = cfg.resume == "auto" and not cfg.ckpt_path
    check_run_folder(out, ckpt_path, auto=auto)
    if auto:
        check_finished_settings(cfg, out, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.perf.threads:
        torch.set_num_threads(cfg.perf.threads)  # parallel jobs on one machine: cores / jobs each
    torch.set_float32_matmul_precision(cfg.perf.matmul_precision)
    return Run(out=out, world=world, ckpt_path=ckpt_path)


def build(cfg: DictConfig, run: Run) -> tuple[ContrastiveDataModule, ContrastiveMethod]:
    """The data (checked against the config) and the method; a resumed checkpoint must fit the method."""
    datamodule = ContrastiveDataModule(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    validate_with_data(cfg, datamodule.num_train, world_size=run.world)
    model = methods.build_method(cfg, datamodule.num_train)  # looked up per call: tests and tools wrap it
    if run.ckpt_path:
        run.start_step = int(check_compatible(model, run.ckpt_path).get("global_step", -1))
    prepare_checkpoint_folder(run.out / "checkpoints")
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return datamodule, model


def training_device(cfg: DictConfig) -> torch.device:
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if gpu else "cpu")


def is_rank_zero() -> bool:
    # srun (SLURM) and torchrun start every rank before Lightning runs: they set SLURM_PROCID / RANK, not LOCAL_RANK
    return all(int(os.environ.get(k, "0")) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def baselines(
    cfg: DictConfig, model: ContrastiveMethod, datamodule: ContrastiveDataModule, device: torch.device
) -> dict[str, Any]:
    """What training is measured against: the encoder at initialisation (``init_*``) and raw pixels
    (``pixels_*``), before any step, on the final evaluation's split (so they compare with its figures)."""
    summary: dict[str, Any] = {}
    if not is_rank_zero():
        return summary
    split = final_split(cfg)
    if cfg.eval.init:
        model.to(device)
        summary.update(
            evaluate_encoder(
                model.backbone,
                model.eval_transform,
                datamodule,
                cfg.eval,
                device,
                split=split,
                prefix="init_",
                full=False,
            )
        )
        model.cpu()
    if cfg.eval.pixels:
        train_loader, val_loader = datamodule.eval_loaders(split)
        pixels = [extract_features(None, model.eval_transform, loader, device) for loader in (train_loader, val_loader)]
        summary.update(evaluate_features(*pixels, datamodule.num_classes, cfg.eval, prefix="pixels_", full=False))
    return summary


def write_config(cfg: DictConfig, run: Run) -> None:
    """The resolved config beside the run; a resumed run keeps the interrupted part's log."""
    run.out.mkdir(parents=True, exist_ok=True)
    if run.ckpt_path and (run.out / "config.yaml").is_file():
        run.previous_config = (run.out / "config.yaml").read_text()
    (run.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if run.ckpt_path:
        keep_previous_log(run.out / "logs" / "metrics.csv")


class Callbacks:
    """The run's callbacks; the history, throughput and divergence guard are read after ``fit``."""

    def __init__(self, cfg: DictConfig, run: Run):
        self.history, self.throughput, self.flops = History(), Throughput(), FlopsCallback()
        self.guard = DivergenceGuard(
            check_every=cfg.trainer.log_every_n_steps, folder=run.out / "checkpoints", resumed_from=run.ckpt_path
        )
        self.all: list[Callback] = [
            last_checkpoint(run.out / "checkpoints"),
            self.history,
            self.throughput,
            self.flops,
            RNGState(),
            self.guard,
            CollapseWatch(),
            ResumeSettings(),
        ]
        if cfg.perf.adapt_threads and not cfg.perf.threads:
            self.all.append(ThreadGovernor())
        if cfg.logger.name != "none":  # Lightning refuses a learning-rate monitor without a logger
            self.all.append(LearningRateMonitor(logging_interval="epoch"))
        if cfg.trainer.enable_progress_bar:
            self.all.append(ProgressBar(leave=True))


def build_trainer(cfg: DictConfig, run: Run, callbacks: Callbacks) -> L.Trainer:
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = build_strategy(cfg)
    return L.Trainer(
        **trainer_args,
        default_root_dir=str(run.out),
        logger=build_logger(cfg.logger, run.out),
        callbacks=callbacks.all,
        sync_batchnorm=cfg.backbone.sync_batchnorm,
        plugins=[AtomicCheckpointIO(), *build_plugins()],
    )


def fit(
    trainer: L.Trainer, model: ContrastiveMethod, datamodule: ContrastiveDataModule, run: Run, guard: DivergenceGuard
) -> float:
    """Train; a stop by signal becomes :class:`RunStopped`, naming the checkpoint that holds the run. Returns the
    seconds ``fit`` took."""
    if model.cfg.perf.compile:
        # in place: torch.compile's wrapper would prefix every saved name with `_orig_mod.`, and the checkpoint
        # would neither resume nor export without compile
        model.backbone.compile()
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    except SIGTERMException:
        raise RunStopped(stopped_message(trainer, guard, "SIGTERM"), 128 + signal.SIGTERM) from None
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1)
            raise RunStopped(stopped_message(trainer, guard, "SIGINT"), 128 + signal.SIGINT) from None
        raise
    return time.perf_counter() - start


def kept_summary(run: Run) -> dict[str, Any]:
    """A resumed run that had already finished: nothing trained, and its summary stays as it was."""
    log.info("the run in %s had already finished (step %d); its metrics.json is kept", run.out, run.start_step)
    if run.previous_config is not None:  # config.yaml says what ran
        (run.out / "config.yaml").write_text(run.previous_config)
    return json.loads((run.out / "metrics.json").read_text())


def run_figures(
    cfg: DictConfig, trainer: L.Trainer, model: ContrastiveMethod, callbacks: Callbacks, train_time: float
) -> dict[str, Any]:
    """What ran, how fast, and the last value of every figure the per-epoch history holds."""
    history = callbacks.history.records
    last = history[-1] if history else {}
    loss = trainer.callback_metrics.get("train/loss_epoch", last.get("loss"))
    return {
        "method": cfg.method.name,
        "family": model.family,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "global_batch_size": cfg.data.batch_size * trainer.world_size,
        "key_encoder": cfg.method.get("key_encoder"),
        "negatives": model.negatives_source,
        "images_per_sec": round(callbacks.throughput.images_per_sec, 1),
        **callbacks.flops.summary(callbacks.throughput.images_per_sec),
        "peak_mem_mb": round(peak_memory_mb(model.device), 1),
        "train_time_s": round(train_time, 1),
        "startup_s": callbacks.throughput.startup_s,
        "final_loss": round(float(loss), 4) if loss is not None else None,
        **history_figures(history),
    }


def split_names(cfg: DictConfig, datamodule: ContrastiveDataModule) -> dict[str, Any]:
    """Which split each figure comes from: the final evaluation and the baselines (``knn_acc``, few-shot, linear,
    ``init_*``, ``pixels_*``, ``stage_*``) read ``eval_split``; the per-epoch history (kNN, online linear probe,
    diagnostics) reads ``monitor_split``, always validation; the kNN bank is the training split's features."""
    return {"eval_split": final_split(cfg), "monitor_split": "validation", "split_sizes": datamodule.split_sizes()}


def final_evaluation(cfg: DictConfig, model: ContrastiveMethod, datamodule: ContrastiveDataModule) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    split, device = final_split(cfg), model.device
    backbone, transform = model.backbone, model.eval_transform
    if cfg.eval.final:
        summary.update(evaluate_encoder(backbone, transform, datamodule, cfg.eval, device, split=split))
    if cfg.eval.stages:
        summary.update(evaluate_stages(backbone, transform, datamodule, cfg.eval, device, split=split))
    return summary


def write_summary(run: Run, summary: dict[str, Any], history: History) -> dict[str, Any]:
    summary["overrides"] = run_overrides()
    summary["history"] = history.records
    summary = json_safe(summary)  # JSON has no NaN: a non-finite figure is written as null
    (run.out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    print_summary(summary, run.out)
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
