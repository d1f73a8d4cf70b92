"""How the processes of a run start: Lightning's DDP strategies with this project's settings, the spawn launcher
that brings rank 0's results home, the guard against ``ddp`` re-running a Hydra sweep, and the cluster plugins."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from omegaconf import DictConfig

from contrastive.callbacks import History, Throughput
from contrastive.errors import ConfigError, require

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


def check_devices(trainer: Any) -> None:
    """The accelerator exists on this machine and has as many devices as asked for (Lightning would fail later,
    with a traceback)."""
    accelerator = str(trainer.accelerator)
    require(
        accelerator in ACCELERATORS,
        f"trainer.accelerator={accelerator!r} is not known; choose one of {', '.join(ACCELERATORS)}",
    )
    try:
        requested = requested_devices(trainer.devices)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices={trainer.devices!r}: give a count, a list of indices, -1 or auto") from None
    if accelerator in ("gpu", "cuda"):
        require(
            torch.cuda.is_available(),
            f"trainer.accelerator={accelerator} but no CUDA GPU is available here; "
            "use trainer.accelerator=cpu (or auto)",
        )
    if accelerator not in ("auto", "cpu", "gpu", "cuda") or requested is None:
        return
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available, kind = (torch.cuda.device_count(), "GPUs") if gpu else (os.cpu_count() or 1, "CPU cores")
    if isinstance(requested, int):
        require(requested >= 1, f"trainer.devices={trainer.devices} must be >= 1, -1 (all) or auto")
        require(
            requested <= available,
            f"trainer.devices={trainer.devices} but this machine has {available} {kind} "
            f"(trainer.accelerator={accelerator}); choose trainer.devices <= {available}",
        )
    else:
        require(
            bool(requested) and all(0 <= d < available for d in requested),
            f"trainer.devices={trainer.devices}: device indices must be in 0..{available - 1} "
            f"(this machine has {available} {kind})",
        )


def check_trainer(trainer: Any) -> None:
    """The ``trainer`` keys Lightning would otherwise refuse late, with a traceback."""
    require(
        str(trainer.precision) in PRECISIONS,
        f"trainer.precision={trainer.precision!r} is not known; choose one of {', '.join(PRECISIONS[:6])}",
    )
    require(
        trainer.max_epochs > 0 or trainer.max_steps > 0,
        f"trainer.max_epochs={trainer.max_epochs} must be > 0 (or set trainer.max_steps > 0)",
    )
    require(
        trainer.max_steps == -1 or trainer.max_steps > 0,
        f"trainer.max_steps={trainer.max_steps} must be > 0, or -1 (no step budget)",
    )
    for key in ("log_every_n_steps", "check_val_every_n_epoch", "accumulate_grad_batches"):
        require(trainer[key] >= 1, f"trainer.{key}={trainer[key]} must be >= 1")
    check_devices(trainer)


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
        callbacks = [
            {name: getattr(cb, name) for name in self.carried[type(cb)]}
            for cb in trainer.callbacks
            if type(cb) in self.carried
        ]
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
        gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
            trainer_cfg.accelerator == "auto" and torch.cuda.is_available()
        )
        requested = torch.cuda.device_count() if gpu else 1
    return (requested if isinstance(requested, int) else len(requested)) * trainer_cfg.num_nodes
