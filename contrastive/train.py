"""Train one method: ``train(cfg)`` returns the run's summary metrics; ``python -m contrastive.train`` wraps it.

A run folder holds the resolved config (``config.yaml``), the CSV logs, ``checkpoints/last.ckpt`` and
``metrics.json`` (the summary; ``history`` inside it has one entry per epoch).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from contrastive.config import ConfigError, register_configs, validate, validate_with_data
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.data.datasets import DataError
from contrastive.evaluate import evaluate_encoder, extract_features, evaluate_features
from contrastive.methods import build_method

log = logging.getLogger("contrastive")
register_configs()


class History(Callback):
    """One record per validation epoch: the logged epoch-level metrics, for metrics.json and the report."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        record: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            name = key.split("/", 1)[-1].removesuffix("_epoch")
            if key.endswith("_step") or name in record:
                continue
            record[name] = round(float(value), 5)
        self.records.append(record)


class Throughput(Callback):
    """Training images per second, timed from the start of each training epoch to its last batch (validation and
    evaluation excluded); synchronises the device only at those two points."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start: float | None = None
        self._batches = 0

    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._start, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def _stop(self, trainer, pl_module) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        self.seconds += time.perf_counter() - self._start
        self.images += self._batches * pl_module.global_batch_size
        self._start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop(trainer, pl_module)

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


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
    them from rank 0 each step would cost bandwidth (and overwrite per-rank state)."""
    name = cfg.trainer.strategy
    if name in ("ddp", "ddp_spawn", "ddp_fork"):
        from lightning.pytorch.strategies import DDPStrategy

        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}[name]
        return DDPStrategy(start_method=start, broadcast_buffers=False)
    return name


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data``; returns the summary written to ``metrics.json``."""
    out = output_dir(cfg)
    world = int(cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1) * cfg.trainer.num_nodes
    validate(cfg, world_size=world)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.perf.matmul_precision)

    datamodule = ContrastiveDataModule(cfg.data)
    datamodule.setup("fit")
    validate_with_data(cfg, datamodule.num_train, world_size=world)
    model = build_method(cfg, datamodule.num_train)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
    summary: dict[str, Any] = {}
    rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if rank_zero and cfg.eval.init:
        model.to(device)
        summary.update(evaluate_encoder(model.backbone, model.eval_transform, datamodule, cfg.eval, device,
                                        prefix="init_", full=False))
        model.cpu()
    if rank_zero and cfg.eval.pixels:
        train_loader, val_loader = datamodule.eval_loaders()
        pixels = [extract_features(None, model.eval_transform, loader, device) for loader in (train_loader, val_loader)]
        summary.update(evaluate_features(*pixels, datamodule.num_classes, cfg.eval, prefix="pixels_", full=False))

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    history, throughput = History(), Throughput()
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1),
        history, throughput, LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = build_strategy(cfg)
    trainer = L.Trainer(
        **trainer_args, default_root_dir=str(out), logger=build_logger(cfg, out), callbacks=callbacks,
        sync_batchnorm=cfg.backbone.sync_batchnorm,
    )
    if cfg.perf.compile:
        model.backbone = torch.compile(model.backbone)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
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


if __name__ == "__main__":
    main()
