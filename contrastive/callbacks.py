"""What a run needs besides the method: per-epoch history, throughput, crash-safe checkpoints, exact resume (RNG
state), a stop on a diverged loss and a warning on collapse. ``train()`` wires them into the Trainer.

Resume is exact at epoch boundaries (where ``last.ckpt`` is written): model, buffers (queue, bank, prototypes),
optimiser and schedule are Lightning's; the RNG streams (torch CPU and CUDA, numpy, python) are saved here. The
data order follows: on one process the shuffling sampler draws its permutation from the restored torch RNG, under
DDP Lightning's DistributedSampler permutes by ``seed + epoch``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as tdist
from lightning.pytorch.callbacks import Callback, RichProgressBar

from contrastive.errors import TrainingDiverged

log = logging.getLogger("contrastive")


# -- history and throughput ----------------------------------------------------------------------------------
class History(Callback):
    """One record per training epoch: the epoch-level metrics (loss and logs), plus the validation metrics and
    diagnostics when validation ran in that epoch; for metrics.json and the report. Saved in checkpoints, so a
    resumed run's history covers every epoch."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._validated_epoch = -1
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # wall_s counts on from a resumed run's last record, so time-to-accuracy spans the whole run
        done = self.records[-1].get("wall_s", 0.0) if self.records else 0.0
        self._start = time.perf_counter() - done

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after this epoch's validation (the module has logged its kNN accuracy and diagnostics) and after
        # the epoch's training metrics were reduced; older validation values stay out of the record
        validated = self._validated_epoch == trainer.current_epoch
        record: dict[str, float] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "wall_s": round(time.perf_counter() - self._start, 2),
        }
        for key, value in sorted(trainer.callback_metrics.items(), key=lambda kv: not kv[0].endswith("_epoch")):
            if key.endswith("_step") or (not validated and key.split("/", 1)[0] in ("val", "diag")):
                continue
            name = key.split("/", 1)[-1].removesuffix("_epoch")
            if name not in record:
                record[name] = round(float(value), 5)
        self.records.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])


class Throughput(Callback):
    """Training images per second, timed from the start of each training epoch to its last batch (validation and
    evaluation excluded); synchronises the device only at those two points."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start: float | None = None
        self._batches = 0
        self.startup_s: float | None = None  # process start to the first training step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.startup_s is None:
            self.startup_s = process_age()

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


def process_age() -> float | None:
    """Seconds since this process started, from the kernel's own clock (Linux; ``None`` elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)


class ThreadGovernor(Callback):
    """Fewer torch threads while other processes keep cores busy, all of them back when they leave.

    torch's OpenMP threads spin at every parallel region's barrier. When another process takes a core, one of them is
    descheduled for a whole time slice while the other spins: on a 2-core machine beside one CPU-bound process the
    default SimCLR run took 3.3x its quiet time for 2x the CPU (BENCHMARKS.md). Every ``interval`` seconds of
    training this reads the machine's busy time and this process's own (``/proc``, no device sync) and sets the
    threads to the cores the others leave free (at least 1); Linux only, a no-op elsewhere."""

    def __init__(self, interval: float = 2.0, busy: float = 0.6, idle: float = 0.3) -> None:
        self.interval, self.busy, self.idle = interval, busy, idle
        self.full = torch.get_num_threads()
        self._last: tuple[float, float, float] | None = None
        self.changes: list[tuple[int, int]] = []  # (step, threads) for each change

    @staticmethod
    def sample() -> tuple[float, float, float] | None:
        """(wall seconds, seconds all CPUs were busy, this process's CPU seconds), or None without /proc."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        hz = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.monotonic(), (sum(fields[:8]) - idle) / hz, own.user + own.system

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type != "cpu" or self.full < 2:
            return
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return
        sample = self.sample()
        if sample is None:
            return
        if self._last is not None:
            wall = sample[0] - self._last[0]
            others = max(0.0, (sample[1] - self._last[1]) - (sample[2] - self._last[2])) / wall  # cores
            threads = torch.get_num_threads()
            if others >= self.busy:
                wanted = max(1, min(self.full, self.full - round(others)))
            elif others <= self.idle:
                wanted = self.full
            else:
                wanted = threads
            if wanted != threads:
                torch.set_num_threads(wanted)
                self.changes.append((trainer.global_step, wanted))
                log.info("other processes keep %.1f cores busy: %d torch threads", others, wanted)
        self._last = sample

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.get_num_threads() != self.full:  # evaluation after training runs as a quiet run would
            torch.set_num_threads(self.full)


# -- crash-safe checkpoints ------------------------------------------------------------------------------------


# -- exact resume: RNG state ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG streams, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    mt = np_state["state"]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(mt["key"].astype(np.int64)),
            "pos": int(mt["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    n = state["numpy"]
    mt = {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}
    np.random.set_state({"bit_generator": "MT19937", "state": mt, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RNGState(Callback):
    """Saves every process's RNG streams in the checkpoint and restores them on resume, so augmentations, sampled
    negatives and the data order continue as in an uninterrupted run."""

    def state_dict(self) -> dict[str, Any]:
        # every rank dumps the checkpoint (rank 0 writes it): gather so each rank gets its own streams back
        states: list[Any] = [rng_state()]
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            states = [None] * tdist.get_world_size()
            tdist.all_gather_object(states, rng_state())
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_rank"]
        distributed = tdist.is_available() and tdist.is_initialized()
        rank, world = (tdist.get_rank(), tdist.get_world_size()) if distributed else (0, 1)
        if len(states) != world:
            log.warning(
                "resuming with %d processes from a checkpoint of %d: the random streams cannot continue "
                "as in an uninterrupted run",
                world,
                len(states),
            )
        set_rng_state(states[rank % len(states)])


# -- overrides on resume ---------------------------------------------------------------------------------------------
class ResumeSettings(Callback):
    """Makes a resumed run train with this config's optimiser settings, not the checkpoint's.

    Restoring the optimiser also restores each parameter group's settings (learning rate, weight decay, momentum,
    betas) and the schedule's base rates, so ``optim.lr=...`` on resume would be recorded in ``config.yaml`` and
    silently ignored. The groups as this config built them are noted before the checkpoint is restored and written
    back after it (the optimiser's statistics, such as momentum buffers, stay the checkpoint's); the schedule's
    current rate is then recomputed at the restored step. With the same config this changes nothing.
    """

    def __init__(self) -> None:
        self._fresh: tuple[list, list] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        groups = [
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers
        ]
        self._fresh = groups, [list(c.scheduler.base_lrs) for c in trainer.lr_scheduler_configs]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fresh is None:
            return
        groups, base_lrs = self._fresh
        for opt, fresh in zip(trainer.optimizers, groups, strict=True):
            for group, settings in zip(opt.param_groups, fresh, strict=True):
                group.update(settings)
        for config, lrs in zip(trainer.lr_scheduler_configs, base_lrs, strict=True):
            scheduler = config.scheduler
            scheduler.base_lrs = list(lrs)
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, lr, factor in zip(scheduler.optimizer.param_groups, lrs, scheduler.lr_lambdas, strict=True):
                    group["lr"] = lr * factor(scheduler.last_epoch)
                scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        self._fresh = None


# -- divergence ---------------------------------------------------------------------------------------------------
class DivergenceGuard(Callback):
    """Stops the run at a NaN or infinite loss, or at non-finite weights or buffers, before a checkpoint is written
    from that state.

    Each step records, on the device, the first step whose loss was not finite; the host reads that record every
    ``check_every`` steps, before validation, at the end of each epoch and before any checkpoint is dumped, so the
    last good ``last.ckpt`` is never overwritten by a diverged model. Processes agree by a min-reduction. Before a
    checkpoint is dumped every floating tensor of the model (BatchNorm statistics, queue, bank included) must also be
    finite: a huge learning rate can blow up a running variance while the loss stays finite.

    ``saved`` describes the last checkpoint this run wrote into ``folder`` (epoch, step, and the embedding spread
    when it looked collapsed), for the messages of a stopped or diverged run.
    """

    NONE = torch.iinfo(torch.int64).max

    def __init__(
        self, check_every: int = 50, folder: str | Path | None = None, resumed_from: str | None = None
    ) -> None:
        self.check_every = max(int(check_every), 1)
        self.folder = Path(folder) if folder is not None else None
        self.resumed_from = resumed_from
        self.saved: dict[str, Any] | None = None
        self._unset: set[str] = set()
        self._first_bad: torch.Tensor | None = None
        self._step = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        # buffers that start all-NaN mark a value not yet set (the NCE normaliser before its first batch); such a
        # buffer still all-NaN is not a diverged one
        self._unset = {
            name
            for name, t in pl_module.named_buffers()
            if t.is_floating_point() and t.numel() > 0 and bool(torch.isnan(t).all())
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), self.NONE, dtype=torch.int64, device=finite.device)
        self._first_bad = torch.where(finite, self._first_bad, self._first_bad.clamp_max(self._step))
        if (self._step + 1) % self.check_every == 0:
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._check(trainer, pl_module)
        bad = [
            name
            for name, t in pl_module.state_dict().items()
            if t.is_floating_point()
            and not bool(torch.isfinite(t).all())
            and not (name in self._unset and bool(torch.isnan(t).all()))
        ]
        flag = torch.tensor(float(bool(bad)), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="max")) > 0:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "on another process"
            raise TrainingDiverged(
                self.message(
                    trainer,
                    pl_module,
                    trainer.global_step,
                    what=f"model tensors are not finite ({shown}) at the end of epoch {trainer.current_epoch}",
                )
            )
        std = trainer.callback_metrics.get("diag/embedding_std")
        collapsed = std is not None and embeddings_collapsed(float(std), pl_module)
        self.saved = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "collapsed_std": float(std) if collapsed else None,
        }

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_bad is None:
            return
        step = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        if step != self.NONE:
            raise TrainingDiverged(self.message(trainer, pl_module, step))

    def kept(self) -> str:
        """What holds the run now: this run's last checkpoint (and whether it is a good one), or the checkpoint it
        resumed from."""
        if self.saved is not None:
            path = (self.folder / "last.ckpt") if self.folder else "last.ckpt"
            where = f"{path} (end of epoch {self.saved['epoch']}, step {self.saved['step']})"
            if self.saved["collapsed_std"] is None:
                return f"the last good checkpoint {where} was kept"
            return (
                f"the last checkpoint {where} was kept, but it is no good one to resume from: its embeddings had "
                f"collapsed (diag/embedding_std={self.saved['collapsed_std']:.2e})"
            )
        where = f" in {self.folder}" if self.folder else ""
        if self.resumed_from:
            return (
                f"no checkpoint had been written in {self.folder} yet; this run resumed from {self.resumed_from}, "
                "which is unchanged"
            )
        return f"no checkpoint had been written{where} yet"

    def message(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, what: str = "") -> str:
        cfg = pl_module.cfg
        kept = self.kept()
        causes = [
            (
                f"a learning rate too high (optim.lr={cfg.optim.lr}; try it 10x lower, or a longer "
                f"optim.warmup_epochs than {cfg.optim.warmup_epochs})"
            ),
            f"a temperature too low (method.temperature={cfg.method.temperature})",
        ]
        if str(trainer.precision) not in ("32-true", "64-true"):
            causes.append(
                f"reduced precision overflowing (trainer.precision={trainer.precision}; try bf16-mixed or 32-true)"
            )
        what = what or f"the loss became NaN or infinite at step {step} (epoch {trainer.current_epoch})"
        return (
            f"training diverged: {what}; stopped without saving the diverged model ({kept}). Likely causes: "
            f"{', '.join(causes[:-1])} or {causes[-1]}."
        )


# -- collapse -------------------------------------------------------------------------------------------------------
class CollapseWarning(RuntimeWarning):
    """The embeddings collapsed or the loss stopped moving."""


COLLAPSE_STD_RATIO = 0.02  # of the spread of embeddings covering the sphere, 1/sqrt(D)


def embeddings_collapsed(std: float, pl_module: L.LightningModule, ratio: float = COLLAPSE_STD_RATIO) -> bool:
    """``diag/embedding_std`` below ``ratio`` of its value for embeddings spread over the sphere: all images map to
    nearly one point. The one criterion of the collapse warning and of the checkpoint messages."""
    return std < ratio * embedding_spread(pl_module)


def embedding_spread(pl_module: L.LightningModule) -> float:
    return 1 / math.sqrt(pl_module.cfg.method.proj_out_dim)


class CollapseWatch(Callback):
    """The one collapse alarm: warns once per kind, with the likely causes, when the embeddings collapse, when the
    loss stops moving, or when the method reports its own signs of collapse.

    Collapse: ``diag/embedding_std`` (per-dimension std of the normalised embeddings, logged each validation) below
    ``std_ratio`` of its value for embeddings spread over the sphere (``1/sqrt(D)``) for ``patience`` validated
    epochs in a row. Stall: the epoch loss within ``rel_tol`` (relative) of the previous one for ``patience``
    epochs in a row; augmentation noise alone moves a learning run's epoch loss by far more. Method: a module with
    ``collapse_signs()`` (called at the end of each training epoch, before the module's own epoch-end hook) returns
    a message while its own figures look collapsed (SwAV: codes on one prototype), else None; ``patience`` epochs in
    a row warn.
    """

    def __init__(self, std_ratio: float = COLLAPSE_STD_RATIO, rel_tol: float = 1e-4, patience: int = 3) -> None:
        self.std_ratio, self.rel_tol, self.patience = std_ratio, rel_tol, patience
        self._low_std = 0
        self._method_signs = 0
        self._flat = 0
        self._last_loss: float | None = None
        self._validated_epoch = -1
        self.warned: set[str] = set()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        std = metrics.get("diag/embedding_std")
        if std is not None and self._validated_epoch == trainer.current_epoch:
            spread = embedding_spread(pl_module)
            self._low_std = self._low_std + 1 if embeddings_collapsed(float(std), pl_module, self.std_ratio) else 0
            if self._low_std >= self.patience:
                self._warn(
                    trainer,
                    "collapse",
                    (
                        f"the embeddings look collapsed: for {self._low_std} epochs the per-dimension std of the "
                        f"normalised embeddings (diag/embedding_std={float(std):.2e}) stayed below "
                        f"{self.std_ratio:g} of the spread of embeddings covering the sphere ({spread:.3f}), so all "
                        "images map to nearly one point. Likely causes: a learning rate too high (optim.lr), a "
                        "temperature too high (method.temperature), too few or too easy negatives (data.batch_size, "
                        "method.queue_size), augmentations too weak to make the task hard (augment.*), or a projector "
                        "that ignores its input."
                    ),
                )
        signs = getattr(pl_module, "collapse_signs", None)
        sign = signs() if callable(signs) else None
        self._method_signs = self._method_signs + 1 if sign else 0
        if self._method_signs >= self.patience:
            self._warn(trainer, "method", f"{sign} (for {self._method_signs} epochs)")
        loss = metrics.get("train/loss_epoch")
        if loss is None or not math.isfinite(float(loss)):
            return
        loss = float(loss)
        if self._last_loss is not None:
            flat = abs(loss - self._last_loss) <= self.rel_tol * max(abs(self._last_loss), 1.0)
            self._flat = self._flat + 1 if flat else 0
        self._last_loss = loss
        if self._flat >= self.patience - 1:
            self._warn(
                trainer,
                "stall",
                (
                    f"the training loss has not moved for {self._flat + 1} epochs (train/loss={loss:.6f}): the encoder "
                    "no longer learns. Likely causes: a learning rate of (nearly) zero (optim.lr, optim.scheduler, "
                    "optim.min_lr_ratio), parameters that receive no gradient (frozen or detached), or collapsed "
                    "embeddings (a constant output gives a constant loss)."
                ),
            )

    def _warn(self, trainer: L.Trainer, kind: str, message: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        if trainer.is_global_zero:
            warnings.warn(message, CollapseWarning, stacklevel=2)


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, which under a step budget (``trainer.max_epochs=-1``) reads "Epoch 3/-2": there it
    names the budget instead (the description is set once an epoch, so it cannot count the steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps > 0:
            description = f"Epoch {current_epoch} of a {trainer.max_steps}-step budget"
            return f"{description:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)
