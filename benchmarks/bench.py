"""Speed benchmark: ``python benchmarks/bench.py [--device cpu|cuda] [--backbone ...] [--batch N] [--steps N]``.

Everything compared runs in one invocation, each contender in its own worker process, and the workers take turns
(the others wait, blocked, using no CPU): in every round each contender runs ``--steps`` timed steps right before
or right after a chunk of the reference, SimCLR through the framework, so both see the same load of a shared
machine; a ratio is the median over rounds of these paired ratios. The contenders:

* ``simclr``, ``memory_bank``, ``moco``, ``swav`` (and ``swav_2crop``, SwAV without its two small crops): the
  framework's own path, a Lightning ``Trainer.fit`` of the method, timed by a callback between batches (startup and
  warmup excluded);
* ``bare``: a plain PyTorch loop doing SimCLR's work (same loader, on-device augmentation, backbone and projector,
  ``nt_xent``, optimiser and schedule; no Lightning, no online probe);
* ``cpu_aug`` (``--device cuda``): the same model fed by torchvision transforms in DataLoader workers, in float32;
* ``lightly``: lightly's usual SimCLR recipe (``SimCLRTransform`` in DataLoader workers, ``SimCLRProjectionHead``,
  ``NTXentLoss``) on the same backbone, data, batch and optimiser, run by the Python that has lightly installed.

Each worker also audits one training step for operations that make the host wait for the device (scalar reads,
boolean-mask indexing, ...) and counts the FLOPs of one untimed step (``contrastive.metrics.flops``); with the
machine's peak, measured once by the coordinator (a dense matrix product with the contenders' threads), that gives
each contender's achieved FLOP/s and utilisation. The SimCLR-like workers report the kNN accuracy after the same
number of steps.

``make bench-gpu`` is ``--device cuda --lightly none --markdown BENCHMARKS.md``: the GPU recipe (bf16,
channels_last, ``cpu_aug``, a whole SimCLR epoch eager and compiled) at CIFAR size, written as a section of the
Markdown file; ``--device cpu --tiny --gpu-recipe`` is its dry run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


def registered_methods() -> tuple[str, ...]:
    """Every method of the package's registry (imported late: the benchmark's workers start without it)."""
    from contrastive.methods import METHODS

    return tuple(METHODS)


LIGHTLY_PYTHON = os.environ.get("CONTRASTIVE_LIGHTLY_PYTHON", "/tmp/lightly-venv/bin/python")
PREFETCH_FACTOR = 2  # DataLoader's default, for the workers' loaders
LOADER_KINDS = ("cpu_aug", "lightly")  # contenders whose DataLoader has worker processes
REFERENCE = "simclr"  # every other contender is timed next to it
KNN_CONTENDERS = (REFERENCE, "bare", "cpu_aug", "lightly")  # SimCLR each: their kNN after the same budget
MARK = "@@bench "  # prefix of protocol lines on a subprocess worker's stdout
SECTION_BEGIN = "<!-- benchmarks/bench.py {device}: begin -->"
SECTION_END = "<!-- benchmarks/bench.py {device}: end -->"
WAIT_S = 3600  # the longest a worker may take to answer: a round on a slow, loaded machine, or its finish
TARGETS = {
    "framework_vs_bare": ("<=", 1.05),
    "method_vs_simclr": ("<=", 1.10),
    "data_vs_step": ("<=", 0.05),
    "vs_lightly": (">=", 1.0),
    "vs_cpu_aug": (">=", 4.0),
    "epoch_s": ("<=", 2.0),
}


# -- settings --------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What every worker shares; the defaults of a mode come from :func:`settings_from_args`."""

    device: str = "cpu"
    backbone: str = "small_cnn"
    width: int = 32
    batch: int = 128
    steps: int = 3
    rounds: int = 5
    contenders: int = 2  # set from the plan (plan_workers)
    warmup: int = 3
    budget: int = 0  # training steps every worker runs in all (kNN budget); 0: just the timed schedule
    image_size: int = 16
    channels: int = 3
    data_size: int = 4096
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    threads: int = 1
    loader_workers: int = 2
    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False
    epoch: bool = False  # also time one whole epoch of SimCLR (the GPU figure)
    epoch_compile: bool = False  # and one more with the backbone compiled
    cpu_aug: bool = False  # the contender fed by torchvision transforms in DataLoader workers (float32)
    on_device: bool = False  # the framework and the bare loop read the training split kept on the device
    knn: bool = True
    audit: bool = True
    methods: tuple[str, ...] = ()  # empty: every registered method
    lightly: str | None = None  # the Python that imports lightly
    seed: int = 0

    def settle(self, kind: str) -> int:
        """Untimed steps at the start of every round: a loader with worker processes keeps filling its prefetch
        queue while its process waits for its turn, and those ready batches must not count as fast steps."""
        return self.loader_workers * PREFETCH_FACTOR if kind in LOADER_KINDS else 0

    def chunks(self, name: str) -> int:
        """Timed chunks of ``steps`` steps a contender runs: one per round, and the reference (SimCLR) one next to
        each other contender's in every round."""
        return self.rounds * (self.contenders - 1) if name == REFERENCE else self.rounds

    def timed_end(self, kind: str, name: str) -> int:
        return self.warmup + self.chunks(name) * (self.settle(kind) + self.steps)

    @property
    def train_images(self) -> int:
        return self.data_size - round(self.data_size * 0.2)  # data.val_fraction

    def epochs(self, steps: int) -> int:
        return math.ceil(steps / (self.train_images // self.batch))

    def overrides(self, method: str, steps: int) -> list[str]:
        """Hydra overrides composing the real config of ``method`` for this benchmark, trained ``steps`` steps."""
        cuda = self.device == "cuda"
        out = [
            f"method={method}",
            f"backbone={self.backbone}",
            "data=synthetic",
            "augment=simclr",
            "logger=csv",
            f"data.size={self.data_size}",
            f"data.batch_size={self.batch}",
            f"data.image_size={self.image_size}",
            f"data.small_size={self.image_size // 2}",
            f"data.channels={self.channels}",
            f"data.mean=[{','.join(['0.5004'] * self.channels)}]",
            f"data.std=[{','.join(['0.2226'] * self.channels)}]",
            f"method.proj_hidden_dim={self.proj_hidden_dim}",
            f"method.proj_out_dim={self.proj_out_dim}",
            f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
            "trainer.devices=1",
            f"trainer.precision={self.precision}",
            f"trainer.max_epochs={self.epochs(steps)}",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            f"perf.channels_last={str(self.channels_last).lower()}",
            f"perf.compile={str(self.compile).lower()}",
            f"seed={self.seed}",
            f"data.on_device={str(self.on_device).lower()}",
        ]
        if self.backbone == "small_cnn":
            out.append(f"backbone.width={self.width}")
        if cuda:
            out.append("trainer.benchmark=true")  # cuDNN picks the fastest convolution for the fixed shapes
        if method == "swav":
            out.append("method.freeze_prototypes_steps=0")  # the steady state: prototypes that learn
        return out


def compose_config(settings: Settings, method: str, steps: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config of ``method`` trained ``steps`` steps (plus ``extra`` overrides) as a plain dict: it
    travels to the worker processes as JSON."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from contrastive.config import register_configs
    from contrastive.validate import validate

    register_configs()
    with initialize_config_module("contrastive.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*settings.overrides(method, steps), *extra])
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


# -- measurement helpers -----------------------------------------------------------------------------------------
# aten ops after which the host holds a value computed on the device: on a GPU each one waits for the queue to drain
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::equal",
    "aten::is_nonzero",
}
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _sync_op(func, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name
    if name in SYNC_OPS:
        return True
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
        return True
    if name in INDEX_OPS and len(args) > 1:
        # a boolean mask is turned into indices first, whose count the host must know
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    if name in ("aten::_to_copy", "aten::copy_") and args and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device") if name == "aten::_to_copy" else args[0].device
        source = args[0].device if name == "aten::_to_copy" else args[1].device
        return source.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


def _call_site() -> str:
    """The innermost caller outside torch and the audit: ``package/file.py:line``; for an op of the backward pass,
    the autograd node that ran it."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward ({node.name()})"
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or frame.name in ("__torch_dispatch__", "_call_site"):
            continue
        for root in ("/contrastive/", "/lightning/", "/lightly/"):
            if root in path:
                return f"{root.strip('/')}/{path.split(root, 1)[1]}:{frame.lineno}"
        return f"{Path(path).name}:{frame.lineno}"
    return "?"


def _in_data_loading() -> bool:
    return any("/torch/utils/data/" in f.filename.replace("\\", "/") for f in traceback.extract_stack())


def make_sync_audit():
    """A dispatch mode that records every op that would make the host wait for the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncAudit(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.hits: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            # the loader's work is on host tensors before the copy to the device, whatever it reads
            if _sync_op(func, args, kwargs) and not _in_data_loading():
                self.hits.append(f"{func._schema.name} at {_call_site()}")
            return func(*args, **kwargs)

    return SyncAudit()


def peak_memory_mb(device: str) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (a DataLoader's workers), user + system."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- the worker side: a schedule of steps, paused between rounds -------------------------------------------------
class Channel:
    """The worker's end of the line to the coordinator: a multiprocessing connection or stdin/stdout."""

    def __init__(self, conn=None) -> None:
        self.conn = conn
        if conn is None:
            self._out = os.fdopen(os.dup(1), "w", buffering=1)
        # stdout carries the coordinator's report (or this protocol): whatever libraries print goes to stderr
        sys.stdout.flush()
        os.dup2(2, 1)
        import lightning.pytorch  # its import sets its loggers' level: quieten them after it

        logging.getLogger(lightning.pytorch.__name__).setLevel(logging.WARNING)

    def send(self, message: dict[str, Any]) -> None:
        if self.conn is not None:
            self.conn.send(message)
        else:
            self._out.write(MARK + json.dumps(message) + "\n")

    def recv(self) -> str:
        if self.conn is not None:
            return self.conn.recv()
        line = sys.stdin.readline()
        if not line:
            raise EOFError("the coordinator closed the line")
        return line.strip()


class Schedule:
    """Steps ``0 .. total-1`` of one worker: ``warmup`` steps, then chunks of ``settle`` untimed and ``steps`` timed
    steps, each started by the coordinator's ``go``; then, after its ``finish``, the rest of the budget. The loop
    calls :meth:`before_fetch`, :meth:`fetched` and :meth:`step_end` around each step."""

    def __init__(
        self, s: Settings, kind: str, name: str, channel: Channel, sync: Callable[[], None], audit: bool
    ) -> None:
        self.s, self.channel, self.sync = s, channel, sync
        self.settle, self.timed_end = s.settle(kind), s.timed_end(kind, name)
        self.round_starts = [s.warmup + r * (self.settle + s.steps) for r in range(s.chunks(name))]
        self.audit_step = s.warmup - 2 if audit and s.warmup >= 3 else None
        self.rounds: list[dict[str, float]] = []
        self.audit_hits: list[str] | None = None
        self.rss_at_start = resident_mb()
        self.peak_mem_mb = 0.0
        self._waited_finish = False
        self._t0: float | None = None
        self._cpu0 = 0.0
        self._data = 0.0
        self._last_end: float | None = None
        self._audit = None

    def _timed(self, step: int) -> bool:
        return any(start + self.settle <= step < start + self.settle + self.s.steps for start in self.round_starts)

    def _wait(self, expected: str) -> None:
        command = self.channel.recv()
        if command != expected:
            raise RuntimeError(f"expected {expected!r} from the coordinator, got {command!r}")

    def before_fetch(self, step: int) -> None:
        if step == 0:
            self.channel.send({"event": "ready"})  # set up: the others' rounds can be timed without this one busy
        if step == 0 or step in self.round_starts[1:]:
            self._wait("go")
        if step == self.timed_end:
            self.wait_finish()
        if step in (start + self.settle for start in self.round_starts):
            self.sync()
            self._t0, self._data, self._cpu0 = time.perf_counter(), 0.0, cpu_seconds()
        self._last_end = time.perf_counter()

    def fetched(self, step: int) -> None:
        if self._timed(step) and self._last_end is not None:
            self._data += time.perf_counter() - self._last_end
        # the audit spans one whole loop iteration: under Lightning, the hooks after a step's callbacks included
        if self._audit is not None:
            self._audit.__exit__(None, None, None)
            self.audit_hits, self._audit = self._audit.hits, None
        if step == self.audit_step:
            self._audit = make_sync_audit()
            self._audit.__enter__()

    def step_end(self, step: int) -> None:
        if any(step == start + self.settle + self.s.steps - 1 for start in self.round_starts):
            self.sync()
            seconds, cpu = time.perf_counter() - self._t0, cpu_seconds() - self._cpu0
            self.rounds.append(
                {"step_s": seconds / self.s.steps, "data_s": self._data / self.s.steps, "cpu_s": cpu / self.s.steps}
            )
            if step == self.timed_end - 1:
                self.peak_mem_mb = peak_memory_mb(self.s.device)
            self.channel.send({"event": "round", **self.rounds[-1]})

    def wait_finish(self) -> None:
        if not self._waited_finish:
            self._waited_finish = True
            self._wait("finish")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rounds": self.rounds, "peak_mem_mb": round(self.peak_mem_mb, 1)}
        if self.s.device == "cpu":
            out["train_mem_mb"] = round(max(self.peak_mem_mb - self.rss_at_start, 0.0), 1)
        if self.audit_hits is not None:
            out["sync_points"] = len(self.audit_hits)
            out["sync_sites"] = sorted(set(self.audit_hits))
        return out


def _device_sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def flops_step(s: Settings) -> int | None:
    """The step whose FLOPs a worker counts: the last warmup step (untimed, and not the audited one)."""
    return s.warmup - 1 if s.warmup >= 1 else None


class LoopFlops:
    """FLOPs of one step of a plain loop: :meth:`before` after the fetch, :meth:`after` at the step's end."""

    def __init__(self, s: Settings, parts: dict[str, Any]) -> None:
        from contrastive.metrics.flops import FlopCounter

        self.at, self.counter = flops_step(s), FlopCounter(parts)
        self.images = s.batch

    def before(self, step: int) -> None:
        if step == self.at:
            self.counter.start()

    def after(self, step: int) -> None:
        if step == self.at:
            self.counter.stop()

    def summary(self) -> dict[str, Any]:
        return step_flops_result(self.counter.count, self.images)


def step_flops_result(count, images: int) -> dict[str, Any]:
    """A worker's counted step as JSON: FLOPs of the step, the images it trained on, FLOPs by part."""
    if count is None or not images:
        return {}
    return {"step_flops": count.total, "step_images": images, "step_flops_parts": count.parts}


def _knn(backbone, eval_transform, datamodule, cfg, device) -> float:
    from contrastive.evaluate import extract_features
    from contrastive.metrics import knn_accuracy

    train_loader, val_loader = datamodule.eval_loaders()
    train = extract_features(backbone, eval_transform, train_loader, device)
    val = extract_features(backbone, eval_transform, val_loader, device)
    acc = knn_accuracy(*train, *val, datamodule.num_classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    return round(float(acc), 2)


def _setup_worker(spec: dict[str, Any]):
    from omegaconf import OmegaConf

    s = Settings(**{**spec["settings"], "methods": tuple(spec["settings"]["methods"])})
    torch.set_num_threads(s.threads)
    cfg = OmegaConf.create(spec["cfg"])
    torch.set_float32_matmul_precision(cfg.perf.matmul_precision)
    # what the Trainer sets from trainer.benchmark, for the loops without one
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    return s, cfg, torch.device(s.device)


def _datamodule(cfg):
    from contrastive.data.datamodule import ContrastiveDataModule
    from contrastive.validate import validate_with_data

    dm = ContrastiveDataModule(cfg.data)
    dm.setup("fit")
    validate_with_data(cfg, dm.num_train)
    return dm


def run_framework(spec: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """The method through the real Lightning path: ``Trainer.fit`` with a callback driving the schedule."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from contrastive.launch import build_strategy
    from contrastive.loggers import build_logger
    from contrastive.methods import build_method

    s, cfg, device = _setup_worker(spec)
    L.seed_everything(cfg.seed, verbose=False)
    dm = _datamodule(cfg)
    model = build_method(cfg, dm.num_train)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result: dict[str, Any] = {}
    want_knn = s.knn and spec["name"] == "simclr"
    from contrastive.flops_callback import FlopsCallback

    flops = FlopsCallback(at_step=flops_step(s), measure_peak=False) if flops_step(s) is not None else None
    if want_knn:
        result["init_knn_acc"] = _knn(model.backbone.to(device), model.eval_transform, dm, cfg, device)
    schedule = Schedule(s, "framework", spec["name"], channel, _device_sync(s.device), audit=s.audit and not s.compile)

    class Driver(Callback):
        """Steps counted across epochs (``batch_idx`` restarts with each)."""

        step = 0

        def on_train_start(self, trainer, pl_module) -> None:
            schedule.before_fetch(0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            schedule.fetched(self.step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            schedule.step_end(self.step)
            self.step += 1
            if self.step < spec["total_steps"]:
                schedule.before_fetch(self.step)

    with tempfile.TemporaryDirectory() as out:
        trainer_args = {k: v for k, v in cfg.trainer.items()}
        trainer_args["strategy"] = build_strategy(cfg)
        trainer = L.Trainer(
            **trainer_args,
            default_root_dir=out,
            logger=build_logger(cfg.logger, Path(out)),
            callbacks=[Driver(), *([flops] if flops else [])],
            enable_checkpointing=False,
            enable_model_summary=False,
            sync_batchnorm=cfg.backbone.sync_batchnorm,
        )
        if cfg.perf.compile:
            model.backbone.compile()  # in place, as train does
        trainer.fit(model, datamodule=dm)
        schedule.wait_finish()
        result.update(schedule.summary())
        if flops is not None:
            result.update(step_flops_result(flops.step, flops.step_images))
        if want_knn:
            result["knn_acc"] = _knn(model.backbone, model.eval_transform, dm, cfg, device)
        if s.epoch and spec["name"] == "simclr":
            result.update(time_epoch(model, dm, cfg, out))
            if s.epoch_compile and not cfg.perf.compile:
                model.backbone.compile()
                result.update({f"compiled_{k}": v for k, v in time_epoch(model, dm, cfg, out).items()})
    return result


def time_epoch(model, dm, cfg, out: str) -> dict[str, float]:
    """Seconds of one whole training epoch (the second of two, so compilation and autotuning are excluded), and
    the peak memory of the two (CUDA: allocated; CPU: the process's resident set so far)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from contrastive.launch import build_strategy

    device = str(model.device.type)
    sync = _device_sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds: list[float] = []

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            sync()
            seconds.append(time.perf_counter() - self.start)

    trainer_args = {k: v for k, v in cfg.trainer.items()}
    trainer_args.update(strategy=build_strategy(cfg), max_epochs=2, max_steps=-1)
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=out,
        logger=False,
        callbacks=[EpochTimer()],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    images = trainer.num_training_batches * cfg.data.batch_size
    return {
        "epoch_s": round(seconds[-1], 3),
        "epoch_images": images,
        "epoch_images_per_sec": round(images / seconds[-1], 1),
        "epoch_peak_mem_mb": round(peak_memory_mb(device), 1),
    }


def _bare_optimizer(cfg, modules, total: int):
    """The framework's optimiser, parameter groups and schedule (as ``configure_optimizers`` sets them up)."""
    from contrastive.optim import build_optimizer, warmup_cosine

    named = [(f"{i}.{n}", p) for i, m in enumerate(modules) for n, p in m.named_parameters()]
    lr = cfg.optim.lr * (cfg.data.batch_size / 256 if cfg.optim.scale_lr else 1.0)
    optimizer = build_optimizer(cfg.optim, named, [], lr)
    warmup = int(cfg.optim.warmup_epochs * max(total // max(cfg.trainer.max_epochs, 1), 1))
    schedule = warmup_cosine(optimizer, warmup, total, cfg.optim.min_lr_ratio, cfg.optim.scheduler)
    return optimizer, schedule


def run_bare(spec: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """SimCLR's step written as a plain PyTorch loop, on the framework's loader and augmentation module."""
    from contrastive.data.augment import build_augment
    from contrastive.losses import nt_xent
    from contrastive.models import backbone_from_config, projection_head

    s, cfg, device = _setup_worker(spec)
    torch.manual_seed(cfg.seed)
    dm = _datamodule(cfg)
    m, b = cfg.method, cfg.backbone
    backbone = backbone_from_config(b, cfg.data.channels)
    projector = projection_head(backbone.out_dim, m.proj_hidden_dim, m.proj_out_dim, m.proj_layers)
    augment = build_augment(cfg.augment, cfg.data, m.num_views)
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format
    for module in (backbone, projector, augment):
        module.to(device, memory_format=memory_format)
    optimizer, lr_schedule = _bare_optimizer(cfg, [backbone, projector], spec["total_steps"])
    encoder = torch.compile(backbone) if cfg.perf.compile else backbone
    bf16 = cfg.trainer.precision.startswith("bf16")
    schedule = Schedule(s, "bare", "bare", channel, _device_sync(s.device), audit=s.audit and not s.compile)
    flops = LoopFlops(s, {"backbone": backbone, "projector": projector})
    dm.device = device  # for data.on_device: there is no Trainer to say where
    batches = _cycle(dm.train_dataloader())
    for step in range(spec["total_steps"]):
        schedule.before_fetch(step)
        images, _, _ = next(batches)
        images = images.to(device, non_blocking=True)
        schedule.fetched(step)
        flops.before(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                views = augment(images)
            views = [v.contiguous(memory_format=memory_format) for v in views]
            loss = nt_xent(projector(encoder(views[0])), projector(encoder(views[1])), m.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        flops.after(step)
        schedule.step_end(step)
    schedule.wait_finish()
    result = {**schedule.summary(), **flops.summary()}
    if s.knn:
        result["knn_acc"] = _knn(backbone, _eval_transform(cfg).to(device), dm, cfg, device)
    return result


def _eval_transform(cfg):
    from contrastive.data.augment import build_eval_transform

    return build_eval_transform(cfg.data)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


class PILImages:
    """The uint8 training images as PIL images through ``transform``, as torchvision's CIFAR data sets give them;
    item -> ``(transform(image), label)``."""

    def __init__(self, images, labels, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        image = self.images[i]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(image), self.labels[i]


class TwoViews:
    """Two independent draws of ``view`` (a module-level class: DataLoader workers may be spawned, not forked)."""

    def __init__(self, view: Callable) -> None:
        self.view = view

    def __call__(self, image) -> list:
        return [self.view(image), self.view(image)]


def torchvision_views(cfg):
    """The framework's augmentation recipe as torchvision transforms on PIL images, two views per image."""
    from torchvision import transforms as T

    from contrastive.data.augment import blur_kernel_size

    a, d = cfg.augment, cfg.data
    jitter = a.color_jitter
    view = T.Compose(
        [
            T.RandomResizedCrop(a.large.size, scale=tuple(a.large.scale)),
            T.RandomHorizontalFlip(a.hflip if d.flip else 0.0),
            T.RandomApply(
                [T.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)], p=jitter.p
            ),
            T.RandomGrayscale(a.grayscale),
            T.RandomApply(
                [T.GaussianBlur(blur_kernel_size(a.large.size, a.blur.sigma[1]), tuple(a.blur.sigma))], p=a.blur.p
            ),
            T.ToTensor(),
            T.Normalize(list(d.mean), list(d.std)),
        ]
    )
    return TwoViews(view)


def lightly_views(cfg):
    """lightly's SimCLR transform with the framework's augmentation settings. lightly is imported only here and in
    :func:`run_loader_loop`: it is the benchmark's contender, run from its own venv, never a dependency."""
    from lightly.transforms import SimCLRTransform  # optional

    a, d = cfg.augment, cfg.data
    jitter = a.color_jitter
    return SimCLRTransform(
        input_size=a.large.size,
        cj_prob=jitter.p,
        cj_strength=1.0,
        cj_bright=jitter.brightness,
        cj_contrast=jitter.contrast,
        cj_sat=jitter.saturation,
        cj_hue=jitter.hue,
        min_scale=a.large.scale[0],
        random_gray_scale=a.grayscale,
        gaussian_blur=a.blur.p,
        sigmas=tuple(a.blur.sigma),
        hf_prob=a.hflip if d.flip else 0.0,
        normalize={"mean": list(d.mean), "std": list(d.std)},
    )


def run_loader_loop(spec: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """A plain float32 loop fed by CPU transforms in DataLoader workers: ``cpu_aug`` (torchvision, the framework's
    head and loss) or ``lightly`` (lightly's transform, projection head and NT-Xent loss)."""
    from torch import nn
    from torch.utils.data import DataLoader

    from contrastive.losses import nt_xent
    from contrastive.models import backbone_from_config, projection_head

    s, cfg, device = _setup_worker(spec)
    torch.manual_seed(cfg.seed)
    dm = _datamodule(cfg)
    m, b = cfg.method, cfg.backbone
    backbone = backbone_from_config(b, cfg.data.channels)
    if spec["kind"] == "lightly":
        import lightly  # optional
        from lightly.loss import NTXentLoss  # optional
        from lightly.models.modules import SimCLRProjectionHead  # optional

        projector: nn.Module = SimCLRProjectionHead(backbone.out_dim, m.proj_hidden_dim, m.proj_out_dim)
        criterion = NTXentLoss(temperature=m.temperature)
        transform = lightly_views(cfg)
        version = lightly.__version__
    else:
        projector = projection_head(backbone.out_dim, m.proj_hidden_dim, m.proj_out_dim, m.proj_layers)
        criterion = lambda z1, z2: nt_xent(z1, z2, m.temperature)
        transform, version = torchvision_views(cfg), None
    backbone.to(device)
    projector.to(device)
    optimizer, lr_schedule = _bare_optimizer(cfg, [backbone, projector], spec["total_steps"])
    train = dm.train_set
    dataset = PILImages(train.images, train.labels, transform)
    # the loader's workers fork, as by default on Linux, also when this worker was itself spawned (CUDA)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=s.loader_workers,
        persistent_workers=s.loader_workers > 0,
        pin_memory=device.type == "cuda",
        multiprocessing_context=mp.get_context("fork") if s.loader_workers > 0 else None,
    )
    schedule = Schedule(s, spec["kind"], spec["name"], channel, _device_sync(s.device), audit=s.audit)
    flops = LoopFlops(s, {"backbone": backbone, "projector": projector})
    batches = _cycle(loader)
    for step in range(spec["total_steps"]):
        schedule.before_fetch(step)
        (x1, x2), _ = next(batches)
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        schedule.fetched(step)
        flops.before(step)
        loss = criterion(projector(backbone(x1)), projector(backbone(x2)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        flops.after(step)
        schedule.step_end(step)
    schedule.wait_finish()
    result = {**schedule.summary(), **flops.summary()}
    if version:
        result["lightly_version"] = version
    if s.knn:
        result["knn_acc"] = _knn(backbone, _eval_transform(cfg).to(device), dm, cfg, device)
    return result


RUNNERS = {"framework": run_framework, "bare": run_bare, "cpu_aug": run_loader_loop, "lightly": run_loader_loop}


def worker_main(spec: dict[str, Any], conn=None) -> None:
    """Entry of a worker process: run the schedule, answer ``done`` (or ``error``) at the end."""
    channel = Channel(conn)
    try:
        result = RUNNERS[spec["kind"]](spec, channel)
        if spec["settings"]["device"] == "cuda":
            result["gpu"] = torch.cuda.get_device_name()
        channel.send({"event": "done", **result})
    except Exception:
        with contextlib.suppress(OSError):  # unless the coordinator is gone already
            channel.send({"event": "error", "message": traceback.format_exc()})


# -- the coordinator ---------------------------------------------------------------------------------------------
class Worker:
    """The coordinator's handle on one worker: a forked process (the package's own loops) or a subprocess
    running another Python (lightly's venv)."""

    def __init__(self, name: str, spec: dict[str, Any], python: str | None = None) -> None:
        self.name, self.spec = name, spec
        if python is None:
            # fork starts in no time with the coordinator's imports; CUDA does not survive a fork
            ctx = mp.get_context("spawn" if spec["settings"]["device"] == "cuda" else "fork")
            self.conn, child = ctx.Pipe()
            # not a daemon: a contender's DataLoader starts worker processes of its own
            self.proc = ctx.Process(target=worker_main, args=(spec, child))
            self.proc.start()
            child.close()
            self.popen = None
        else:
            self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open as long as the worker runs)
            self.popen = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker-spec", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
                bufsize=1,
                env=package_env(),
            )

    def send(self, command: str) -> None:
        if self.popen is None:
            self.conn.send(command)
        else:
            self.popen.stdin.write(command + "\n")
            self.popen.stdin.flush()

    def recv(self) -> dict[str, Any]:
        if self.popen is None:
            if not self.conn.poll(WAIT_S):
                raise RuntimeError(f"worker {self.name} did not answer in {WAIT_S} s")
            try:
                message = self.conn.recv()
            except EOFError:
                raise RuntimeError(f"worker {self.name} died (exit code {self.proc.exitcode})") from None
        else:
            # one line answers each command, so nothing waits in the reader's buffer while select blocks
            if not select.select([self.popen.stdout], [], [], WAIT_S)[0]:
                raise RuntimeError(f"worker {self.name} did not answer in {WAIT_S} s")
            line = self.popen.stdout.readline()
            if not line.startswith(MARK):
                self.stderr.seek(0)
                raise RuntimeError(f"worker {self.name} died:\n{self.stderr.read()[-3000:]}")
            message = json.loads(line[len(MARK) :])
        if message.get("event") == "error":
            raise RuntimeError(f"worker {self.name} failed:\n{message['message']}")
        return message

    def close(self) -> None:
        if self.popen is None:
            self.conn.close()  # a worker still waiting for a command gets EOF and ends
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.terminate()
        else:
            self.popen.stdin.close()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def package_env() -> dict[str, str]:
    """The environment of a worker run by another Python (lightly's venv): it imports the same ``contrastive`` as
    this process, from the folder holding it (the worker needs the package's modules, not its configs)."""
    import contrastive

    home = str(Path(contrastive.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))}


def lightly_available(python: str) -> str | None:
    """The version of lightly that ``python`` imports, or None."""
    if not python or not Path(python).exists():
        return None
    probe = subprocess.run(
        [python, "-c", "import lightly; print(lightly.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def training_steps(s: Settings, plan: list[tuple[str, str, str, tuple[str, ...]]]) -> dict[str, int]:
    """Steps each contender trains: its timed schedule, or for the ones whose kNN accuracy is compared, the same
    budget for all (at least ``--budget``, and enough for the longest of their schedules)."""
    ends = {name: s.timed_end(kind, name) for name, kind, _, _ in plan}
    knn = [name for name in ends if s.knn and name in KNN_CONTENDERS]
    budget = max([s.budget, *(ends[name] for name in knn)])
    return {name: budget if name in knn else end for name, end in ends.items()}


def plan_workers(s: Settings) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, kind, method, extra overrides) of every contender."""
    plan: list[tuple[str, str, str, tuple[str, ...]]] = [(m, "framework", m, ()) for m in s.methods]
    if "swav" in s.methods:
        # SwAV's multi-crop adds two small crops per image: the same method with SimCLR's two views
        plan.append(("swav_2crop", "framework", "swav", ("method.num_small_views=0",)))
    plan.append(("bare", "bare", "simclr", ()))
    if s.cpu_aug:
        plan.append(("cpu_aug", "cpu_aug", "simclr", ()))
    if s.lightly:
        plan.append(("lightly", "lightly", "simclr", ()))
    return plan


def run(s: Settings) -> dict[str, Any]:
    """Start every contender, take the rounds in turn, finish them together; returns the raw results."""
    plan = plan_workers(s)
    steps_of = training_steps(s, plan)
    workers = []
    for name, kind, method, extra in plan:
        steps = steps_of[name]
        spec = {
            "name": name,
            "kind": kind,
            "settings": asdict(s),
            "total_steps": steps,
            "cfg": compose_config(s, method, steps, extra),
        }
        workers.append(Worker(name, spec, python=s.lightly if kind == "lightly" else None))
    reference, others = workers[0], workers[1:]
    paired: dict[str, dict[str, list[float]]] = {w.name: {"step_s": [], "cpu_s": []} for w in others}
    try:
        for w in workers:
            w.recv()  # ready: set up and waiting
        for r in range(s.rounds):
            # each contender right next to a chunk of the reference, before it or after it in turn; a different
            # order of contenders each round
            shift = r % len(others)
            for j, w in enumerate(others[shift:] + others[:shift]):
                for x in (reference, w) if (r + j) % 2 == 0 else (w, reference):
                    x.send("go")
                    timed = x.recv()
                    if x is reference:
                        for key in ("step_s", "cpu_s"):
                            paired[w.name][key].append(timed[key])
        # the rest of the budget and the evaluations run side by side; the epoch timing comes last, alone
        timing_epoch = [w for w in workers if w.name == "simclr" and s.epoch]
        results = {}
        for group in ([w for w in workers if w not in timing_epoch], timing_epoch):
            for w in group:
                w.send("finish")
            results.update({w.name: {"kind": w.spec["kind"], **w.recv()} for w in group})
        results = {w.name: results[w.name] for w in workers}
        for name, reference_times in paired.items():
            results[name].update({f"reference_{key}": times for key, times in reference_times.items()})
        for name, steps in steps_of.items():
            results[name]["trained_steps"] = steps
    finally:
        for w in workers:
            w.close()
    return results


# -- summarising -------------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _target(key: str, value: float) -> dict[str, Any]:
    op, bound = TARGETS[key]
    met = value <= bound if op == "<=" else value >= bound
    return {"value": round(value, 3), "target": f"{op} {bound}", "met": bool(met)}


def paired_ratio(result: dict[str, Any], key: str = "step_s") -> float:
    """Median over rounds of the contender's step time (``key="cpu_s"``: CPU time) over the reference's, timed
    right next to it (under the same load)."""
    return _median([x[key] / ref for x, ref in zip(result["rounds"], result[f"reference_{key}"])])


def measure_peak(s: Settings) -> dict[str, Any]:
    """The machine's reachable peak, once per benchmark: a dense matrix product with the contenders' threads, in
    float32 and bf16 (where the device runs it natively), and on CUDA the datasheet's dense peak of the device."""
    from contrastive.metrics.flops import compute_dtype, datasheet_peak, low_precision_supported, matmul_peak

    device = torch.device(s.device)
    dtype = compute_dtype(s.precision)
    peaks = {"float32": matmul_peak(device, torch.float32, s.threads)}
    for low in (torch.bfloat16, dtype):
        name = str(low).removeprefix("torch.")
        if name not in peaks and low_precision_supported(device, low):
            peaks[name] = matmul_peak(device, low, s.threads)
    out: dict[str, Any] = {"flops": {k: round(v) for k, v in peaks.items()}, "dtype": str(dtype).removeprefix("torch.")}
    if s.device == "cpu":
        out["threads"] = s.threads
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        out["datasheet_device"], out["datasheet_flops"] = sheet[0], round(sheet[1])
    return out


def summarise(s: Settings, results: dict[str, Any], peak: dict[str, Any] | None = None) -> dict[str, Any]:
    from contrastive.metrics.flops import FlopCount, compute_dtype, efficiency

    for r in results.values():
        step = _median([x["step_s"] for x in r["rounds"]])
        data = _median([x["data_s"] for x in r["rounds"]])
        cpu = _median([x["cpu_s"] for x in r["rounds"]])
        r.update(
            step_s=round(step, 5),
            data_s=round(data, 5),
            data_vs_step=round(data / step, 4),
            images_per_sec=round(s.batch / step, 1),
            cpu_s=round(cpu, 5),
            cores_busy=round(cpu / step, 2),
        )
        if "step_flops" in r and peak is not None:
            count = FlopCount(r["step_flops"], r.get("step_flops_parts", {}))
            peaks = {k: float(v) for k, v in peak["flops"].items()}
            r.update(efficiency(count, r["step_images"], r["images_per_sec"], peaks, compute_dtype(s.precision)))
    ratios: dict[str, Any] = {}
    ratios["framework_vs_bare"] = _target("framework_vs_bare", 1 / paired_ratio(results["bare"]))
    for name, r in results.items():
        if r["kind"] == "framework" and name != REFERENCE:
            ratios[f"{name}_vs_simclr"] = _target("method_vs_simclr", paired_ratio(r))
    for other, key in (("lightly", "vs_lightly"), ("cpu_aug", "vs_cpu_aug")):
        if other in results:
            ratios[f"simclr_{key}"] = _target(key, paired_ratio(results[other]))
            # per CPU-second: a loader's worker processes add cores that the step time alone does not show
            ratios[f"simclr_{key}_per_cpu_s"] = _target(key, paired_ratio(results[other], "cpu_s"))
    for prefix in ("", "compiled_"):
        if f"{prefix}epoch_s" in results[REFERENCE]:
            ratios[f"simclr_{prefix}epoch_s"] = _target("epoch_s", results[REFERENCE][f"{prefix}epoch_s"])
    for name, r in results.items():
        if r["kind"] in ("framework", "bare"):
            ratios[f"{name}_data_vs_step"] = _target("data_vs_step", r["data_vs_step"])
    return {"results": results, "ratios": ratios}


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        (
            f"{s['backbone']} | batch {s['batch']} | {s['image_size']} px x {s['channels']} ch | {s['device']} "
            f"({report['machine']['device_name']}) | {s['precision']} | {s['rounds']} rounds x {s['steps']} steps"
        ),
        "",
        (
            f"{'contender':<12} {'images/s':>10} {'step ms':>9} {'data ms':>8} {'data/step':>9} {'cores':>6} "
            f"{'mem MB':>8} {'syncs/step':>10} {'kNN':>6} {'GFLOP/img':>9} {'GFLOP/s':>8} {'util':>6}"
        ),
    ]
    for name, r in report["results"].items():
        syncs = r.get("sync_points")
        lines.append(
            f"{name:<12} {r['images_per_sec']:>10.1f} {1000 * r['step_s']:>9.1f} {1000 * r['data_s']:>8.2f} "
            f"{r['data_vs_step']:>9.3f} {r['cores_busy']:>6.2f} {r.get('train_mem_mb', r['peak_mem_mb']):>8.0f} "
            f"{'-' if syncs is None else syncs:>10} "
            f"{r.get('knn_acc', '-'):>6} {_scaled(r.get('flops_per_image'), 1e9, 3):>9} "
            f"{_scaled(r.get('achieved_flops'), 1e9, 1):>8} {_scaled(r.get('utilisation'), 0.01, 1, '%'):>6}"
        )
    lines += ["", f"{'ratio':<28} {'value':>8} {'target':>8}  met"]
    for name, t in report["ratios"].items():
        lines.append(f"{name:<28} {t['value']:>8.3f} {t['target']:>8}  {'yes' if t['met'] else 'NO'}")
    reference = report["results"][REFERENCE]
    for prefix, label in (("", "eager"), ("compiled_", "compiled")):
        if f"{prefix}epoch_s" in reference:
            lines.append(
                f"simclr epoch ({label}, {s['precision']}): {reference[f'{prefix}epoch_s']:.3f} s for "
                f"{reference[f'{prefix}epoch_images']} images, peak {reference[f'{prefix}epoch_peak_mem_mb']:.0f} MB"
            )
    lines.append(peak_line(report))
    lines.append(
        "mem MB: "
        + (
            "peak CUDA memory allocated"
            if s["device"] == "cuda"
            else "growth of the resident set during training (loader workers not counted)"
        )
    )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _scaled(value: float | None, scale: float, digits: int, suffix: str = "") -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{suffix}"


def peak_line(report: dict[str, Any]) -> str:
    """The measured peak the utilisation is relative to, in words."""
    peak = report.get("peak")
    if not peak:
        return "peak: not measured"
    flops = ", ".join(f"{name} {v / 1e9:,.1f} GFLOP/s" for name, v in peak["flops"].items())
    threads = f" with {peak['threads']} thread(s)" if "threads" in peak else ""
    sheet = (
        f"; datasheet ({peak['datasheet_device']}, {peak['dtype']}, dense) "
        f"{peak['datasheet_flops'] / 1e12:,.0f} TFLOP/s"
        if "datasheet_flops" in peak
        else ""
    )
    return (
        f"peak (best dense matmul{threads}): {flops}; utilisation = achieved FLOP/s / the {peak['dtype']} peak "
        f"(FLOPs: matmuls and convolutions of one step, forward and backward){sheet}"
    )


def markdown_section(report: dict[str, Any]) -> str:
    """The report as a Markdown section (between markers, so that a later run replaces it)."""
    s, m, results, ratios = report["settings"], report["machine"], report["results"], report["ratios"]
    device = s["device"]
    title = "GPU" if device == "cuda" else "CPU"
    mem = "peak CUDA memory allocated" if device == "cuda" else "growth of the resident set during training"
    lines = [
        SECTION_BEGIN.format(device=device),
        f"## {title}: {m['device_name']}, {report['date']} (written by `benchmarks/bench.py --markdown`)",
        "",
        f"Command: `{report['command']}`{' (`make bench-gpu`)' if device == 'cuda' else ''}. Machine: "
        f"{m['device_name'] + ', host ' if device == 'cuda' else ''}`{m['cpu']}` with {m['cores']} cores; "
        f"Python {m['python']}, torch {m['torch']}, Lightning "
        f"{m['lightning']}. Settings: {s['backbone']}, batch {s['batch']}, {s['train_images']:,} synthetic "
        f"{s['image_size']} px x {s['channels']} ch training images, {s['precision']}, channels_last "
        f"{str(s['channels_last']).lower()}, data.on_device {str(s['on_device']).lower()}; {s['rounds']} rounds x "
        f"{s['steps']} timed steps per contender. Wall "
        f"time {report['wall_s']:.0f} s.",
        "",
    ]
    reference = results[REFERENCE]
    if "epoch_s" in reference:
        lines += ["| SimCLR, one whole epoch | seconds | images | images/s | peak MB |", "|---|---:|---:|---:|---:|"]
        for prefix, label in (("", "eager"), ("compiled_", "compiled (`torch.compile`, inductor)")):
            if f"{prefix}epoch_s" in reference:
                lines.append(
                    f"| {s['precision']}, {label} | {reference[f'{prefix}epoch_s']:.3f} | "
                    f"{reference[f'{prefix}epoch_images']:,} | {reference[f'{prefix}epoch_images_per_sec']:,.0f} | "
                    f"{reference[f'{prefix}epoch_peak_mem_mb']:,.0f} |"
                )
        lines.append("")
    lines += [
        f"| contender | images/s | step ms | data ms | data/step | mem MB ({mem}) | syncs/step | kNN | GFLOP/image "
        "| achieved GFLOP/s | utilisation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        syncs = r.get("sync_points")
        lines.append(
            f"| {name} | {r['images_per_sec']:.1f} | {1000 * r['step_s']:.2f} | {1000 * r['data_s']:.2f} | "
            f"{r['data_vs_step']:.3f} | {r.get('train_mem_mb', r['peak_mem_mb']):.0f} | "
            f"{'-' if syncs is None else syncs} | {r.get('knn_acc', '-')} | "
            f"{_scaled(r.get('flops_per_image'), 1e9, 3)} | {_scaled(r.get('achieved_flops'), 1e9, 1)} | "
            f"{_scaled(r.get('utilisation'), 0.01, 1, ' %')} |"
        )
    lines += ["", peak_line(report) + "."]
    lines += ["", "| ratio (median of paired rounds; epoch: seconds) | value | target | met |", "|---|---:|---|---|"]
    for name, t in ratios.items():
        lines.append(f"| {name} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    lines.append(SECTION_END.format(device=device))
    return "\n".join(lines) + "\n"


def write_markdown_section(path: Path, section: str, device: str) -> None:
    """Replace the section an earlier run on ``device`` wrote into ``path``, or append it."""
    text = path.read_text() if path.is_file() else ""
    begin, end = SECTION_BEGIN.format(device=device), SECTION_END.format(device=device)
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.write_text(text)


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda (make bench-gpu): torch sees no CUDA device here (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}); without a GPU, the dry run is "
            "--device cpu --tiny --gpu-recipe"
        )
    s = Settings(device=args.device, backbone=args.backbone or ("resnet18" if cuda else "small_cnn"))
    notes: list[str] = []
    if cuda or args.gpu_recipe:
        # what `make bench-gpu` measures: bf16, channels_last, the training split on the device, a whole SimCLR
        # epoch eager and compiled, and the float32 loop fed by torchvision transforms in DataLoader workers
        s.precision, s.channels_last, s.epoch, s.epoch_compile, s.cpu_aug = "bf16-mixed", True, True, True, True
        s.on_device = True
    if cuda:
        # CIFAR size: 50,000 training images of 32 px (plus 12,500 for the kNN queries)
        s.batch, s.image_size, s.data_size, s.steps, s.rounds, s.warmup = 512, 32, 62_500, 10, 5, 5
        s.threads, s.loader_workers = max(1, (os.cpu_count() or 2) // 2), os.cpu_count() or 2
    if args.tiny:
        s.width, s.batch, s.data_size, s.steps, s.rounds, s.warmup = 8, 16, 320, 1, 2, 3
        s.proj_hidden_dim, s.proj_out_dim, s.image_size, s.loader_workers = 32, 16, 16, 1
    for key in ("batch", "steps", "rounds", "warmup", "budget", "threads", "loader_workers"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    s.compile = args.compile
    s.on_device = s.on_device or args.on_device
    s.knn, s.audit = not args.no_knn, not args.no_audit
    known = registered_methods()
    s.methods = tuple(args.methods.split(",")) if args.methods else known
    if set(s.methods) - set(known) or s.methods[0] != REFERENCE:
        raise SystemExit(f"--methods must start with {REFERENCE} and name only {', '.join(known)}")
    if args.lightly != "none":
        python = LIGHTLY_PYTHON if args.lightly == "auto" else args.lightly
        version = lightly_available(python)
        if version:
            s.lightly = python
        else:
            notes.append(
                f"lightly not run: {python} cannot import lightly (python -m venv --system-site-packages "
                f"/tmp/lightly-venv && /tmp/lightly-venv/bin/pip install lightly)"
            )
    s.contenders = len(plan_workers(s))
    return s, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--backbone",
        choices=("small_cnn", "resnet18"),
        default=None,
        help="default: small_cnn on cpu, resnet18 on cuda",
    )
    p.add_argument("--batch", type=int, help="images per step (default 128 on cpu, 512 on cuda)")
    p.add_argument("--steps", type=int, help="timed steps per contender per round")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds: every contender runs --steps timed steps in each, next to as many of the reference (simclr)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps before the first round")
    p.add_argument("--budget", type=int, help="training steps of every contender in all, for the kNN comparison")
    p.add_argument("--threads", type=int, help="torch threads per contender (default 1 on cpu)")
    p.add_argument("--loader-workers", type=int, help="DataLoader workers of the CPU-transform contenders")
    p.add_argument("--methods", help="comma-separated subset of the methods, simclr first")
    p.add_argument("--lightly", default="auto", help="the Python with lightly installed; 'auto' or 'none'")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (framework and bare loop)")
    p.add_argument("--tiny", action="store_true", help="a few tiny steps: checks that the benchmark runs")
    p.add_argument(
        "--on-device",
        action="store_true",
        help="data.on_device=true: the framework and the bare loop "
        "read the training split kept on the device (no DataLoader; set by --device cuda)",
    )
    p.add_argument(
        "--gpu-recipe",
        action="store_true",
        help="what --device cuda measures (bf16, channels_last, "
        "epoch eager and compiled, the cpu_aug loop) on any device: with --device cpu --tiny, a dry run "
        "of make bench-gpu",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        help="write the report as a section of this Markdown file "
        "(BENCHMARKS.md), replacing the section an earlier run of the same device kind wrote",
    )
    p.add_argument("--no-knn", action="store_true", help="skip the kNN evaluations")
    p.add_argument("--no-audit", action="store_true", help="skip the host-sync audit of a training step")
    p.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker_spec:
        worker_main(json.loads(args.worker_spec))
        return None
    s, notes = settings_from_args(args)
    start = time.perf_counter()
    peak = measure_peak(s)  # before the workers start: the machine as they will find it, nothing else of ours busy
    results = run(s)
    report = summarise(s, results, peak)
    import lightning

    device_name = cpu_model() if s.device == "cpu" else results["simclr"].get("gpu", "cuda")
    report = {
        "command": " ".join(["python benchmarks/bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "device_name": device_name,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "lightly": results.get("lightly", {}).get("lightly_version"),
        },
        "settings": {
            **asdict(s),
            "settle_loader_workers": s.settle("lightly"),
            "reference_chunks": s.chunks(REFERENCE),
            "train_images": s.train_images,
        },
        "peak": peak,
        **report,
        "notes": notes,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(table(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.markdown:
        write_markdown_section(args.markdown, markdown_section(report), s.device)
    return report


if __name__ == "__main__":
    main()
