"""Train one method: ``train(cfg)`` returns the run's summary metrics; ``python -m contrastive.train`` wraps it.

A run folder holds the resolved config (``config.yaml``), the CSV logs, ``checkpoints/last.ckpt`` and
``metrics.json`` (the summary; ``history`` inside it has one entry per epoch).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from omegaconf import DictConfig, OmegaConf

from contrastive.callbacks import (
    AtomicCheckpointIO,
    CollapseWatch,
    DivergenceGuard,
    History,
    RNGState,
    Throughput,
    TrainingDiverged,
    find_resume_checkpoint,
    last_checkpoint,
    read_checkpoint,
)
from contrastive.config import ConfigError, register_configs, requested_devices, validate, validate_with_data
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.data.datasets import DataError
from contrastive.evaluate import evaluate_encoder, evaluate_features, extract_features
from contrastive.methods import build_method

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
    if cfg.logger.name == "none":
        return False
    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:
            offline = os.environ.get("WANDB_MODE") != "online" and not os.environ.get("WANDB_API_KEY")
        return [CSVLogger(out, name="logs", version=""),
                WandbLogger(project=cfg.logger.project, save_dir=str(out), offline=offline)]
    if cfg.logger.name != "csv":
        raise ConfigError(f"logger.name={cfg.logger.name!r} is not known; choose csv, wandb or none")
    return CSVLogger(out, name="logs", version="")


def build_strategy(cfg: DictConfig):
    """DDP without buffer broadcasts: queues and banks are written identically on every rank, and re-sending
    them from rank 0 each step would cost bandwidth (and overwrite per-rank state).

    Every DDP name Lightning knows (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, their
    ``_find_unused_parameters_*`` forms) gets these settings. ``ddp`` is refused inside a Hydra multirun when Lightning
    would start the extra ranks itself (see :func:`check_ddp_launch`); the spawn and fork forms train in worker
    processes and bring rank 0's results back to the main process, which writes ``metrics.json``
    (:class:`SpawnDDPStrategy`).
    """
    name = cfg.trainer.strategy
    entry = StrategyRegistry[name] if name in StrategyRegistry else None  # its get() would build one  # noqa: SIM401
    if entry is None or not issubclass(entry["strategy"], DDPStrategy):
        return name
    params = {"start_method": "popen", **entry["init_params"], "broadcast_buffers": False}
    if params["start_method"] == "popen":
        check_ddp_launch(cfg)
        return DDPStrategy(**params)
    return SpawnDDPStrategy(**params)


def ranks_from_cluster() -> bool:
    """Whether a cluster launcher started one process per device (srun under SLURM, torchrun)."""
    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def check_ddp_launch(cfg: DictConfig) -> None:
    """Lightning's ``ddp`` starts ranks 1..N-1 by re-running the command line; inside a multirun that line is the
    whole sweep, so every extra rank would re-run every job (Lightning #11300). Refused unless the ranks come from a
    cluster launcher or there is one process per node."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    per_node = world_size(cfg.trainer) // cfg.trainer.num_nodes
    if per_node > 1 and not ranks_from_cluster():
        raise ConfigError(
            f"trainer.strategy=ddp with {per_node} devices per node inside a Hydra multirun (-m): Lightning starts "
            "the extra ranks by re-running this command line, so each of them would run the whole sweep again. "
            "Use trainer.strategy=ddp_spawn for a local sweep, or let a cluster launcher start one process per "
            "device (hydra/launcher=slurm runs trainer.devices tasks per node)."
        )


def build_plugins() -> list:
    """Under SLURM the submitit launcher (``hydra/launcher=slurm``) owns requeueing: it resubmits the job on
    timeout or preemption, and the job resumes from its run folder (``resume=auto``). Lightning's own SLURM
    auto-requeue is switched off, or a preempted job could be requeued twice."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class _ResultsLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, which sends back to the main process only the weights and
    ``callback_metrics``; this one also sends rank 0's loop progress (epochs, steps) and what ``train`` reads from
    its callbacks after ``fit`` (history, throughput)."""

    carried: ClassVar[dict[type, tuple[str, ...]]] = {History: ("records",), Throughput: ("seconds", "images")}

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        callbacks = [{name: getattr(cb, name) for name in self.carried[type(cb)]}
                     for cb in trainer.callbacks if type(cb) in self.carried]
        # through a file, as Lightning sends the weights: the main process reads the result queue only after the
        # workers exit, so a result larger than the pipe's buffer (a long history) would block rank 0 for ever
        path = os.path.join(tempfile.mkdtemp(), "results.pt")
        torch.save({"fit_loop": trainer.fit_loop.state_dict(), "callbacks": callbacks}, path)
        extra["contrastive_results"] = path
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        path = extra["contrastive_results"]
        state = torch.load(path, weights_only=True)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        own = [cb for cb in trainer.callbacks if type(cb) in self.carried]
        for callback, attributes in zip(own, state["callbacks"], strict=True):
            vars(callback).update(attributes)


class SpawnDDPStrategy(DDPStrategy):
    """DDP in spawned or forked workers whose results reach the main process (see :class:`_ResultsLauncher`)."""

    def _configure_launcher(self) -> None:
        self._launcher = _ResultsLauncher(self, start_method=self._start_method)


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the Trainer will run: devices per node (all GPUs for ``auto`` or -1 on a GPU) times nodes."""
    requested = requested_devices(trainer_cfg.devices)
    if requested is None:
        gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto" and torch.cuda.is_available())
        requested = torch.cuda.device_count() if gpu else 1
    return (requested if isinstance(requested, int) else len(requested)) * trainer_cfg.num_nodes


def resume_checkpoint(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path`` if given; with ``resume=auto`` the newest checkpoint of this method in the run folder, if any."""
    if cfg.ckpt_path or cfg.resume != "auto":
        return cfg.ckpt_path
    path, line = find_resume_checkpoint(out / "checkpoints", cfg.method.name)
    log.info(line)
    return str(path) if path else None


def check_compatible(model: L.LightningModule, ckpt_path: str) -> None:
    """The checkpoint's tensors have this model's names and shapes (a changed width, head, bank or queue size would
    otherwise fail inside ``fit`` with a long traceback)."""
    saved = read_checkpoint(ckpt_path)["state_dict"]
    own = model.state_dict()
    problems = [f"{k} missing" for k in own if k not in saved] + [f"{k} unexpected" for k in saved if k not in own]
    problems += [f"{k} has shape {list(saved[k].shape)}, this config gives {list(v.shape)}"
                 for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not fit this config's model ({shown}): resume with the "
                          "config it was trained with (its run folder's config.yaml)")


def keep_previous_log(csv: Path) -> None:
    """Lightning's CSV logger deletes an existing ``metrics.csv``: a run resumed in its own folder keeps the
    interrupted part's log beside the new one."""
    if csv.is_file():
        kept = csv.with_name(f"metrics.before-resume-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        csv.rename(kept)
        log.info("resuming: the interrupted run's log is kept as %s", kept)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data``; returns the summary written to ``metrics.json``."""
    out = output_dir(cfg)
    world = world_size(cfg.trainer)
    validate(cfg, world_size=world)
    ckpt_path = resume_checkpoint(cfg, out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.perf.threads:
        torch.set_num_threads(cfg.perf.threads)  # parallel jobs on one machine: cores / jobs each
    torch.set_float32_matmul_precision(cfg.perf.matmul_precision)

    datamodule = ContrastiveDataModule(cfg.data)
    datamodule.setup("fit")
    validate_with_data(cfg, datamodule.num_train, world_size=world)
    model = build_method(cfg, datamodule.num_train)
    if ckpt_path:
        check_compatible(model, ckpt_path)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
    summary: dict[str, Any] = {}
    # srun (SLURM) and torchrun start every rank before Lightning runs: they set SLURM_PROCID / RANK, not LOCAL_RANK
    rank_zero = all(int(os.environ.get(k, "0")) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))
    if rank_zero and cfg.eval.init:
        model.to(device)
        summary.update(evaluate_encoder(model.backbone, model.eval_transform, datamodule, cfg.eval, device,
                                        prefix="init_", full=False))
        model.cpu()
    if rank_zero and cfg.eval.pixels:
        train_loader, val_loader = datamodule.eval_loaders()
        pixels = [extract_features(None, model.eval_transform, loader, device) for loader in (train_loader, val_loader)]
        summary.update(evaluate_features(*pixels, datamodule.num_classes, cfg.eval, prefix="pixels_", full=False))

    # the baselines above draw from the global RNG (loaders); re-seed so training is the same with or without them
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        keep_previous_log(out / "logs" / "metrics.csv")
    history, throughput = History(), Throughput()
    callbacks: list[Callback] = [
        last_checkpoint(out / "checkpoints"),
        history, throughput, RNGState(), DivergenceGuard(check_every=cfg.trainer.log_every_n_steps), CollapseWatch(),
    ]
    if cfg.logger.name != "none":  # Lightning refuses a learning-rate monitor without a logger
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = build_strategy(cfg)
    trainer = L.Trainer(
        **trainer_args, default_root_dir=str(out), logger=build_logger(cfg, out), callbacks=callbacks,
        sync_batchnorm=cfg.backbone.sync_batchnorm, plugins=[AtomicCheckpointIO(), *build_plugins()],
    )
    if cfg.perf.compile:
        model.backbone = torch.compile(model.backbone)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    train_time = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}

    device = model.device if model.device.type != "meta" else device
    model.to(device)
    summary.update({
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
        "final_loss": round(float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))), 4),
    })
    last = history.records[-1] if history.records else {}
    for key in ("linear_acc", "negatives_per_query", "dictionary_size", "staleness", "staleness_age_steps",
                "false_negative_rate", "alignment", "uniformity", "embedding_std", "prototype_entropy"):
        if key in last:
            summary[key] = last[key]
    if cfg.eval.final:
        summary.update(evaluate_encoder(model.backbone, model.eval_transform, datamodule, cfg.eval, device))
    summary["overrides"] = _overrides()
    summary["history"] = history.records
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return summary


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['method']} on {summary['data']} ({summary['backbone']}, {summary['epochs']} epochs)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("history", "overrides", "method", "data", "backbone") or value is None:
            continue
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"run folder: {out}")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
