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
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as tdist
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger("contrastive")


# -- history and throughput ----------------------------------------------------------------------------------
class History(Callback):
    """One record per training epoch: the epoch-level metrics (loss and logs), plus the validation metrics and
    diagnostics when validation ran in that epoch; for metrics.json and the report. Saved in checkpoints, so a
    resumed run's history covers every epoch."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._validated_epoch = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after this epoch's validation (the module has logged its kNN accuracy and diagnostics) and after
        # the epoch's training metrics were reduced; older validation values stay out of the record
        validated = self._validated_epoch == trainer.current_epoch
        record: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
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


# -- crash-safe checkpoints ------------------------------------------------------------------------------------
def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """Writes ``last.ckpt`` at the end of every epoch. With no monitor the top-1 checkpoint is the latest one; the
    ``save_last`` option is not used because Lightning 2.6 writes it only together with a top-k checkpoint, so with
    ``save_top_k=0`` it would appear only when training ends, and a crash would lose the whole run."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, every_n_epochs=1)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target's folder, fsyncs it, then renames it over the target:
    a crash or a full disk while saving leaves the previous checkpoint as it was, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            # remote storage: Lightning's own transaction-based write
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hidden name that no `*.ckpt` glob matches; unique per writer
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the folder's entry is on disk
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- exact resume: RNG state ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG streams, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    mt = np_state["state"]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(mt["key"].astype(np.int64)), "pos": int(mt["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
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
            log.warning("resuming with %d processes from a checkpoint of %d: the random streams cannot continue "
                        "as in an uninterrupted run", world, len(states))
        set_rng_state(states[rank % len(states)])


# -- divergence ---------------------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely causes."""


class DivergenceGuard(Callback):
    """Stops the run at a NaN or infinite loss, before a checkpoint is written from that state.

    Each step records, on the device, the first step whose loss was not finite; the host reads that record every
    ``check_every`` steps, before validation, at the end of each epoch and before any checkpoint is dumped, so the
    last good ``last.ckpt`` is never overwritten by a diverged model. Processes agree by a min-reduction.
    """

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = max(int(check_every), 1)
        self._first_bad: torch.Tensor | None = None
        self._step = 0

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

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_bad is None:
            return
        step = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        if step != self.NONE:
            raise TrainingDiverged(self.message(trainer, pl_module, step))

    @staticmethod
    def message(trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> str:
        cfg = pl_module.cfg
        last = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        kept = (f"the last good checkpoint {last} was kept" if last and os.path.exists(last)
                else "no checkpoint had been written yet")
        causes = [(f"a learning rate too high (optim.lr={cfg.optim.lr}; try it 10x lower, or a longer "
                   f"optim.warmup_epochs than {cfg.optim.warmup_epochs})"),
                  f"a temperature too low (method.temperature={cfg.method.temperature})"]
        if str(trainer.precision) not in ("32-true", "64-true"):
            causes.append(f"reduced precision overflowing (trainer.precision={trainer.precision}; try bf16-mixed "
                          "or 32-true)")
        return (f"training diverged: the loss became NaN or infinite at step {step} (epoch {trainer.current_epoch}); "
                f"stopped without saving the diverged model ({kept}). Likely causes: {', '.join(causes[:-1])} or "
                f"{causes[-1]}.")


# -- collapse -------------------------------------------------------------------------------------------------------
class CollapseWarning(RuntimeWarning):
    """The embeddings collapsed or the loss stopped moving."""


class CollapseWatch(Callback):
    """Warns once when the embeddings collapse and once when the loss stops moving, with the likely causes.

    Collapse: ``diag/embedding_std`` (per-dimension std of the normalised embeddings, logged each validation) below
    ``std_ratio`` of its value for embeddings spread over the sphere (``1/sqrt(D)``) for ``patience`` validated
    epochs in a row. Stall: the epoch loss within ``rel_tol`` (relative) of the previous one for ``patience``
    epochs in a row; augmentation noise alone moves a learning run's epoch loss by far more.
    """

    def __init__(self, std_ratio: float = 0.02, rel_tol: float = 1e-4, patience: int = 3) -> None:
        self.std_ratio, self.rel_tol, self.patience = std_ratio, rel_tol, patience
        self._low_std = 0
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
            spread = 1 / math.sqrt(pl_module.cfg.method.proj_out_dim)
            self._low_std = self._low_std + 1 if float(std) < self.std_ratio * spread else 0
            if self._low_std >= self.patience:
                self._warn(trainer, "collapse", (
                    f"the embeddings look collapsed: for {self._low_std} epochs the per-dimension std of the "
                    f"normalised embeddings (diag/embedding_std={float(std):.2e}) stayed below {self.std_ratio:g} of "
                    f"the spread of embeddings covering the sphere ({spread:.3f}), so all images map to nearly one "
                    "point. Likely causes: a learning rate too high (optim.lr), a temperature too high "
                    "(method.temperature), too few or too easy negatives (data.batch_size, method.queue_size), "
                    "augmentations too weak to make the task hard (augment.*), or a projector that ignores its "
                    "input."))
        loss = metrics.get("train/loss_epoch")
        if loss is None or not math.isfinite(float(loss)):
            return
        loss = float(loss)
        if self._last_loss is not None:
            flat = abs(loss - self._last_loss) <= self.rel_tol * max(abs(self._last_loss), 1.0)
            self._flat = self._flat + 1 if flat else 0
        self._last_loss = loss
        if self._flat >= self.patience - 1:
            self._warn(trainer, "stall", (
                f"the training loss has not moved for {self._flat + 1} epochs (train/loss={loss:.6f}): the encoder "
                "no longer learns. Likely causes: a learning rate of (nearly) zero (optim.lr, optim.scheduler, "
                "optim.min_lr_ratio), parameters that receive no gradient (frozen or detached), or collapsed "
                "embeddings (a constant output gives a constant loss)."))

    def _warn(self, trainer: L.Trainer, kind: str, message: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        if trainer.is_global_zero:
            warnings.warn(message, CollapseWarning, stacklevel=2)


# -- checkpoints on disk: what they hold, which one to resume -----------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped (cheap to open for its metadata); raises ``ValueError`` naming the
    file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises many kinds of error for a damaged file
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err}); it is truncated, "
                         "damaged or not a checkpoint") from err


def checkpoint_method(checkpoint: dict[str, Any]) -> str | None:
    """``method.name`` the checkpoint was trained with (from its saved hyper-parameters)."""
    return checkpoint.get("hyper_parameters", {}).get("cfg", {}).get("method", {}).get("name")


def find_resume_checkpoint(folder: str | Path, method: str) -> tuple[Path | None, str]:
    """The newest readable ``*.ckpt`` in ``folder`` trained with ``method``, and a line saying what was found."""
    folder = Path(folder)
    paths = list(folder.glob("*.ckpt")) if folder.is_dir() else []
    candidates = sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = []
    for path in candidates:
        try:
            found = checkpoint_method(read_checkpoint(path))
        except ValueError:
            skipped.append(f"{path.name} (unreadable)")
            continue
        if found == method:
            return path, f"resume=auto: resuming from {path}"
        skipped.append(f"{path.name} (method {found})")
    why = f"; skipped {', '.join(skipped)}" if skipped else ""
    return None, f"resume=auto: no {method} checkpoint in {folder}{why}; starting a fresh run"
