"""Where a training step's time goes, and how much of the processor's arithmetic it uses, per method:
``python benchmarks/profile_step.py [--methods simclr,moco] [--steps N] [--threads N] [OVERRIDES ...]``.

Each method runs its real config (default: ``experiment=compare_cifar10_cpu data.root=../shared/data``, the CIFAR-10
benchmark recipe, one thread as the recipe's side-by-side runs) through Lightning's ``Trainer.fit``: warm-up steps,
``--steps`` timed steps (images/s), then ``--steps`` steps under ``torch.profiler`` with named ranges for the parts
of a step, then one validation pass (kNN monitor, online probe, diagnostics) timed and counted on its own. FLOPs
come from :class:`contrastive.flops_callback.FlopsCallback`, the peak from one dense matrix product per run.

The breakdown (CPU time of the profiler's ranges; on the CPU the step is synchronous, so that is wall time):
augmentation (the method's ``augment`` module), forward (the model's parts: backbone, projector, key encoder,
probe, prototypes), loss/negatives (the rest of ``training_step``), backward, optimiser (``optimizer.step`` less
the closure it runs), other (Lightning's loop, batch fetch, hooks such as the momentum update) and evaluation
(one validation pass, once per epoch; per step: divided by the epoch's steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT = ["experiment=compare_cifar10_cpu", "data.root=../shared/data"]
PARTS = ("augmentation", "forward", "loss/negatives", "backward", "optimiser", "other")


class Ranges:
    """Profiler ranges around the step's parts: forward hooks on modules (outermost only: a part calling another
    is counted once) and wrappers of the LightningModule's hooks."""

    def __init__(self) -> None:
        self.depth = 0
        self.stack: list[Any] = []
        self.handles: list[Any] = []

    def _pre(self, label: str):
        def hook(module, args):
            self.depth += 1
            if self.depth == 1:
                self.stack.append(torch.profiler.record_function(label).__enter__())

        return hook

    def _post(self, module, args, output) -> None:
        if self.depth == 1:
            self.stack.pop().__exit__(None, None, None)
        self.depth -= 1

    def watch(self, module: torch.nn.Module, label: str) -> None:
        self.handles.append(module.register_forward_pre_hook(self._pre(label)))
        self.handles.append(module.register_forward_hook(self._post, always_call=True))

    @staticmethod
    def wrap(obj: Any, name: str, label: str) -> None:
        original = getattr(obj, name)

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        setattr(obj, name, wrapped)


def profile_method(method: str, overrides: list[str], steps: int, warmup: int, peak: dict[str, float]) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_module
    from lightning.pytorch.callbacks import Callback

    from contrastive.config import register_configs
    from contrastive.data.datamodule import ContrastiveDataModule
    from contrastive.flops_callback import FlopsCallback
    from contrastive.methods import build_method
    from contrastive.metrics.flops import efficiency, model_parts

    register_configs()
    total = warmup + 2 * steps
    with initialize_config_module("contrastive.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *overrides,
                f"method={method}",
                f"trainer.max_steps={total}",
                "trainer.max_epochs=1",
                "+trainer.val_check_interval=" + str(total),  # one validation pass, right after the last step
                "trainer.num_sanity_val_steps=0",
                "trainer.enable_progress_bar=false",
                "logger=none",
                "eval.init=false",
                "eval.pixels=false",
            ],
        )
    L.seed_everything(cfg.seed, verbose=False)
    torch.set_num_threads(cfg.perf.threads or torch.get_num_threads())
    dm = ContrastiveDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    model = build_method(cfg, dm.num_train)
    ranges = Ranges()
    ranges.watch(model.augment, "augmentation")
    for part in model_parts(model).values():
        ranges.watch(part, "forward")
        for child in part.children():  # a part whose own forward is not called (a key encoder holding nets)
            ranges.watch(child, "forward")
    for hook, label in (
        ("training_step", "training_step"),
        ("backward", "backward"),
        ("optimizer_step", "optimizer_step"),
        ("optimizer_zero_grad", "zero_grad"),
    ):
        Ranges.wrap(model, hook, label)

    times: list[float] = []
    val_s: list[float] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Steps(Callback):
        step = 0
        last = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.step == warmup + steps:
                profiler.__enter__()
                self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            if warmup < self.step <= warmup + steps:
                times.append(now - self.last)
            self.last = now
            self.step += 1
            if self.step == total:
                profiler.__exit__(None, None, None)

        def on_validation_start(self, trainer, pl_module) -> None:
            self.val_start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            val_s.append(time.perf_counter() - self.val_start)

    flops = FlopsCallback(at_step=1, measure_peak=False)
    trainer = L.Trainer(
        **{k: v for k, v in cfg.trainer.items() if k not in ("enable_checkpointing", "logger")},
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[Steps(), flops],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    profiled_s = time.perf_counter() - start
    averages = {e.key: e.cpu_time_total / 1e6 for e in profiler.key_averages()}
    top_ops = sorted(
        ((e.key, e.self_cpu_time_total / 1e6) for e in profiler.key_averages() if e.key.startswith("aten::")),
        key=lambda kv: -kv[1],
    )[:12]
    # the profiled steps' wall time: from the events' span (the callback timed the unprofiled ones)
    step_wall = sum(e.cpu_time_total for e in profiler.key_averages() if e.key == "ProfilerStep*") / 1e6

    step_s = statistics.median(times)
    batch = cfg.data.batch_size
    images_per_sec = batch / step_s
    n = steps  # profiled steps
    fwd, aug = averages.get("forward", 0.0), averages.get("augmentation", 0.0)
    ts, bwd = averages.get("training_step", 0.0), averages.get("backward", 0.0)
    opt, zero = averages.get("optimizer_step", 0.0), averages.get("zero_grad", 0.0)
    # the forward ranges of a step all run inside training_step (validation is not profiled)
    breakdown = {
        "augmentation": aug / n,
        "forward": fwd / n,
        "loss/negatives": (ts - aug - fwd) / n,
        "backward": bwd / n,
        "optimiser": (opt - ts - bwd - zero) / n + zero / n,
    }
    profiled_step = step_wall / n if step_wall else (profiled_s / total)
    steps_per_epoch = dm.num_train // batch
    out = {
        "method": method,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "step_s": round(step_s, 4),
        "images_per_sec": round(images_per_sec, 1),
        "breakdown_ms": {k: round(1000 * v, 1) for k, v in breakdown.items()},
        "profiled_step_ms": round(1000 * profiled_step, 1) if step_wall else None,
        "eval_pass_s": round(val_s[0], 2),  # FLOPs counted during it: a little slower than uncounted
        "eval_per_step_ms": round(1000 * val_s[0] / steps_per_epoch, 1),
        "steps_per_epoch": steps_per_epoch,
        "eval_flops": flops.eval.total if flops.eval else None,
        "top_ops_s": [(k, round(v / n, 4)) for k, v in top_ops],
    }
    out.update(efficiency(flops.step, flops.step_images, images_per_sec, peak))
    out["breakdown_ms"]["other"] = round(1000 * step_s - sum(out["breakdown_ms"].values()), 1)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="simclr,memory_bank,moco,swav")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the recipe's perf.threads)")
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*", help=f"Hydra overrides (default: {' '.join(DEFAULT)})")
    args = p.parse_args(argv)
    from contrastive.metrics.flops import low_precision_supported, matmul_peak

    overrides = [*(args.overrides or DEFAULT), f"perf.threads={args.threads}"]
    torch.set_num_threads(args.threads)
    peak = {"float32": matmul_peak("cpu", torch.float32, args.threads)}
    if low_precision_supported(torch.device("cpu"), torch.bfloat16):
        peak["bfloat16"] = matmul_peak("cpu", torch.bfloat16, args.threads)
    results = []
    for method in args.methods.split(","):
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            results.append(profile_method(method, overrides, args.steps, args.warmup, peak))
        r = results[-1]
        print(
            f"{method:<12} {r['flops_per_image'] / 1e9:.3f} GFLOP/img  {r['images_per_sec']:.1f} img/s  "
            f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s  util {100 * r['utilisation']:.1f} %  "
            f"{json.dumps(r['breakdown_ms'])}  eval {r['eval_pass_s']} s/pass",
            flush=True,
        )
    report = {
        "peak": {k: round(v) for k, v in peak.items()},
        "load_average": os.getloadavg(),
        "overrides": overrides,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
