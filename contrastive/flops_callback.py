"""FLOPs and utilisation of a run, once per run: :class:`FlopsCallback` (the measurement is
:mod:`contrastive.metrics.flops`)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from contrastive.metrics.flops import (
    FlopCount,
    FlopCounter,
    compute_dtype,
    datasheet_peak,
    efficiency,
    low_precision_supported,
    matmul_peak,
    model_parts,
)

MEASURED_PEAKS: dict[tuple[str, torch.dtype, int], float] = {}


def batch_images(batch: Any) -> int:
    """Images in a batch: the length of its first tensor (``(images, labels, index)``, or a list of views first)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = batch_images(item)
            if n:
                return n
    return 0


class FlopsCallback(Callback):
    """Counts the FLOPs of one real training step and of the first validation pass, and measures the peak; after
    ``fit``, :meth:`summary` turns the run's images/s into the figures of ``metrics.json``.

    The count brackets one batch (``on_train_batch_start`` to ``on_train_batch_end``: forward of every view and
    crop, key encoder, loss, backward, optimiser step) with torch's counter; it only observes, so training is the
    same with or without it. ``at_step``: the batch of this ``fit`` that is counted (1, the second: past work done
    once on the first batch), or the last one of a shorter run. The peak (float32, and bf16 where the device runs
    it natively, ``peak_seconds`` each) is measured in ``on_train_start`` with the threads the run starts with,
    before the epochs' timing starts, and again (``resample_seconds``) after every epoch: the peak is the best of
    them, so a load spike on a shared machine at the start cannot pass for the machine's limit (utilisation over 1).
    """

    def __init__(
        self, at_step: int = 1, peak_seconds: float = 0.5, measure_peak: bool = True, resample_seconds: float = 0.1
    ) -> None:
        self.at_step = at_step
        self.peak_seconds = peak_seconds
        self.resample_seconds = resample_seconds
        self.measure_peak = measure_peak
        self.peak_low: dict[str, float] = {}  # the lowest sample per dtype name: the load the run saw
        self.peak_samples = 0
        self.step: FlopCount | None = None
        self.step_images = 0
        self.eval: FlopCount | None = None
        self.peaks: dict[str, float] = {}  # measured FLOP/s per dtype name
        self.datasheet: tuple[str, float] | None = None
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.threads = torch.get_num_threads()
        self.world_size = 1
        self._count_at = at_step
        self._batches = 0
        self._counter: FlopCounter | None = None
        self._eval_counter: FlopCounter | None = None

    # -- hooks ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.device, self.world_size = pl_module.device, max(trainer.world_size, 1)
        self.dtype = compute_dtype(trainer.precision)
        self.threads = torch.get_num_threads()
        self._batches = 0
        total = trainer.estimated_stepping_batches  # optimiser steps of the whole run, done ones included
        left = (total - trainer.global_step) * trainer.accumulate_grad_batches if math.isfinite(total) else math.inf
        self._count_at = int(max(min(self.at_step, left - 1), 0))
        if self.measure_peak and not self.peaks:
            self.peaks = {"float32": self.peak(torch.float32)}
            for dtype in (torch.bfloat16, self.dtype):
                name = str(dtype).removeprefix("torch.")
                if name not in self.peaks and low_precision_supported(self.device, dtype):
                    self.peaks[name] = self.peak(dtype)
            self.datasheet = datasheet_peak(self.device, self.dtype)
            self.peak_low, self.peak_samples = dict(self.peaks), 1

    def peak(self, dtype: torch.dtype) -> float:
        """The best peak measured in this process for a device, type and thread count (runs in one process, as a
        sweep's or the tests', share it); measured once if none is."""
        key = (str(self.device), dtype, self.threads)
        if key not in MEASURED_PEAKS:
            self.sample_peak(dtype, self.peak_seconds)
        return MEASURED_PEAKS[key]

    def sample_peak(self, dtype: torch.dtype, seconds: float) -> float:
        """A new measurement of the peak, kept in the process's best; returns the measurement."""
        key = (str(self.device), dtype, self.threads)
        sample = matmul_peak(self.device, dtype, self.threads, seconds=seconds)
        MEASURED_PEAKS[key] = max(sample, MEASURED_PEAKS.get(key, 0.0))
        return sample

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not (self.measure_peak and self.peaks and self.resample_seconds > 0):
            return
        for name in list(self.peaks):
            sample = self.sample_peak(getattr(torch, name), self.resample_seconds)
            self.peaks[name] = max(self.peaks[name], sample)
            self.peak_low[name] = min(self.peak_low.get(name, math.inf), sample)
        self.peak_samples += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step is None and self._counter is None and self._batches == self._count_at:
            self._counter = FlopCounter(model_parts(pl_module))
            self._counter.start()
            self.step_images = batch_images(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._counter is not None:
            self.step, self._counter = self._counter.stop(), None

    def on_validation_start(self, trainer, pl_module) -> None:
        # the first real validation pass: the kNN monitor, the online probe's accuracy, the diagnostics
        if self.eval is None and self._eval_counter is None and not trainer.sanity_checking:
            self._eval_counter = FlopCounter(model_parts(pl_module))
            self._eval_counter.start()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._eval_counter is not None:
            self.eval, self._eval_counter = self._eval_counter.stop(), None

    def on_exception(self, trainer, pl_module, exception) -> None:
        # a dispatch mode left on would count (and slow) whatever the process runs next
        for counter in (self._counter, self._eval_counter):
            if counter is not None and counter.running:
                counter.stop()
        self._counter = self._eval_counter = None

    # -- figures --------------------------------------------------------------------------------------------
    def summary(self, images_per_sec: float | None) -> dict[str, Any]:
        """The run's figures for ``metrics.json``; ``images_per_sec``: the run's training images per second over all
        processes. FLOP/s are per device; a key is left out when its figure was not measured.

        * ``flops_per_image``: FLOPs of one training step per image it trains on (forward and backward of every view
          and crop, the key encoder, the loss; evaluation excluded);
        * ``flops_per_image_parts``: the same by part of the model (``other``: the loss, negatives, Sinkhorn);
        * ``eval_flops``: FLOPs of one validation pass (kNN monitor, online probe, diagnostics);
        * ``achieved_flops``: ``flops_per_image x images_per_sec / devices``, FLOP/s;
        * ``peak_flops``: the measured peak of one device (``peak_dtype``: the run's compute dtype, bf16 for
          bf16-mixed), on a CPU with ``peak_threads`` threads: the best of ``peak_samples`` samples (the start and
          every epoch's end), ``peak_flops_low`` the lowest (far below the best: the machine was shared);
          ``peak_flops_bf16`` beside a float32 peak where the device runs bf16 natively;
        * ``datasheet_device``, ``datasheet_flops``: the datasheet's dense peak (CUDA, known devices);
        * ``utilisation``: ``achieved_flops / peak_flops``.
        """
        out = efficiency(self.step, self.step_images, images_per_sec, self.peaks, self.dtype, self.world_size)
        if self.eval is not None:
            out["eval_flops"] = self.eval.total
        if self.peaks and self.device.type == "cpu":
            out["peak_threads"] = self.threads
        if "peak_dtype" in out and self.peak_samples:
            out["peak_samples"] = self.peak_samples
            out["peak_flops_low"] = round(self.peak_low.get(out["peak_dtype"], out["peak_flops"]))
        if self.datasheet is not None:
            out["datasheet_device"], out["datasheet_flops"] = self.datasheet[0], round(self.datasheet[1])
        return out
