"""How much of the processor's arithmetic a run uses: FLOPs of a training step, the machine's reachable peak, and
the utilisation (achieved FLOP/s over the measured peak, the "model FLOPs utilisation" of GPU work).

FLOPs are counted by torch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`): matrix products,
convolutions and attention, forward and backward, 2 FLOPs per multiply-add. Elementwise work (batch norm, ReLU,
softmax, augmentation, the optimiser's update) is not counted, as in the usual MFU; it shows up as a lower
utilisation. The peak is measured, not looked up: the best rate of a dense square matrix product in the run's
compute dtype, with the run's threads; on CUDA the datasheet's dense peak is named beside it.

Nothing here knows a LightningModule: :func:`count_flops` takes a callable step, :class:`FlopCounter` brackets
code between two hooks. :class:`contrastive.flops_callback.FlopsCallback` uses them once per run in a ``Trainer``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

OTHER = "other"  # FLOPs outside every named part: the loss, the negatives' products, Sinkhorn

# Dense (not 2:4 sparse) peaks of NVIDIA's datasheets, FLOP/s per GPU; keys are matched against the lowercased
# device name, most specific first. Lightning's table (get_available_flops, the fallback) lists the H200's sparse
# figures and does not match the plain name "NVIDIA H200".
DATASHEET: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("h200", "nvl"), "H200 NVL", {"float32": 60e12, "tfloat32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12}),
    (("h200",), "H200 SXM", {"float32": 67e12, "tfloat32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12}),
    (("h100", "nvl"), "H100 NVL", {"float32": 60e12, "tfloat32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12}),
    (("h100", "pcie"), "H100 PCIe", {"float32": 51e12, "tfloat32": 378e12, "bfloat16": 756e12, "float16": 756e12}),
    (("h100",), "H100 SXM", {"float32": 67e12, "tfloat32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12}),
    (("a100",), "A100", {"float32": 19.5e12, "tfloat32": 156e12, "bfloat16": 312e12, "float16": 312e12}),
]


# -- counting ------------------------------------------------------------------------------------------------
@dataclass
class FlopCount:
    """FLOPs of what ran under :class:`FlopCounter`, in all and per named part (``other``: outside every part)."""

    total: int = 0
    parts: dict[str, int] = field(default_factory=dict)


class _Parts(TorchDispatchMode):
    """FLOPs per named part, forward and backward. torch's own module tracker loses its place in a backward pass
    through a module whose input needs no gradient (the first convolution, a probe on detached features) and
    charges everything after to it; here a part's forward tags the autograd nodes it creates, and a backward op
    is charged to the part that created the node running it."""

    TAG = "contrastive.flops.part"

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = parts
        self.counts: dict[str, int] = defaultdict(int)
        self._stack: list[tuple[str, set]] = []
        self._handles: list[Any] = []

    def __enter__(self):
        for name, module in self.parts.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._enter_part, name)))
            self._handles.append(module.register_forward_hook(self._leave_part, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _enter_part(self, name: str, module: nn.Module, args: tuple) -> None:
        inputs = {t.grad_fn for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        self._stack.append((name, inputs))

    def _leave_part(self, module: nn.Module, args: tuple, output: Any) -> None:
        name, inputs = self._stack.pop()
        todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:  # the nodes between the part's inputs and its outputs are its own
            node = todo.pop()
            if node is None or node in inputs or self.TAG in node.metadata:
                continue
            node.metadata[self.TAG] = name
            todo.extend(next_node for next_node, _ in node.next_functions)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            node = torch._C._current_autograd_node()
            if node is not None:
                part = node.metadata.get(self.TAG, OTHER)
            else:
                part = self._stack[-1][0] if self._stack else OTHER
            self.counts[part] += formula(*args, **kwargs, out_val=out)
        return out


class FlopCounter:
    """Counts the FLOPs of any code (``with FlopCounter(parts) as c: ...``, or :meth:`start` / :meth:`stop` from two
    hooks) with ``FlopCounterMode``; ``parts`` names modules whose FLOPs, forward and backward, are reported apart
    (``{"backbone": ...}``)."""

    def __init__(self, parts: dict[str, nn.Module] | None = None) -> None:
        self.parts = dict(parts or {})
        self.count: FlopCount | None = None
        self._modes: tuple[FlopCounterMode, _Parts] | None = None

    def start(self) -> None:
        self._modes = (FlopCounterMode(display=False), _Parts(self.parts))
        for mode in self._modes:
            mode.__enter__()

    def stop(self) -> FlopCount:
        modes, self._modes = self._modes, None
        if modes is None:
            raise RuntimeError("FlopCounter.stop() without start()")
        for mode in reversed(modes):
            mode.__exit__(None, None, None)
        total, parts = modes[0].get_total_flops(), modes[1].counts
        self.count = FlopCount(total, {name: parts.get(name, 0) for name in [*self.parts, OTHER]})
        return self.count

    @property
    def running(self) -> bool:
        return self._modes is not None

    def __enter__(self) -> FlopCounter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def count_flops(fn: Callable[[], Any], parts: dict[str, nn.Module] | None = None) -> FlopCount:
    """FLOPs of ``fn()``; if it returns a scalar that requires grad (a loss), its backward is counted too."""
    with FlopCounter(parts) as counter:
        out = fn()
        if isinstance(out, torch.Tensor) and out.requires_grad and out.numel() == 1:
            out.backward()
    return counter.count


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The model's direct submodules that hold parameters (backbone, projector, key encoder, probe, prototypes):
    the parts a step's FLOPs are reported by."""
    return {name: m for name, m in model.named_children() if any(True for _ in m.parameters())}


# -- the peak ------------------------------------------------------------------------------------------------
def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype of a run's matrix products from Lightning's ``trainer.precision``."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


def low_precision_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` matrix products run natively (not emulated) on ``device``."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu" and dtype == torch.bfloat16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # oneDNN's test for AVX512-BF16 / AMX
        return bool(check and check())
    return False


def matmul_size(device: torch.device, threads: int) -> int:
    """A square size that keeps every thread (or the GPU) busy: 1024 saturates one AVX-512 core, two threads need
    2048 (2026-12-03, 2-core EPYC: 2 threads reach 25 % at 512, 80 % at 1024)."""
    if device.type == "cuda":
        return 8192
    return 1024 if threads <= 1 else 2048 if threads <= 8 else 4096


def matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    size: int | None = None,
    seconds: float = 0.5,
) -> float:
    """The best rate (FLOP/s) of a dense ``size x size`` matrix product over about ``seconds``: the peak a step's
    arithmetic can reach on this machine, with ``threads`` torch threads (default: the current setting).

    The best and not the mean of the timed products: on a shared machine the others' work only ever slows one
    down. On CUDA each sample times a batch of products with events (launches are asynchronous)."""
    device = torch.device(device)
    previous = torch.get_num_threads()
    threads = threads or previous
    n = size or matmul_size(device, threads)
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        c = torch.empty(n, n, device=device, dtype=dtype)
        flop = 2 * n**3
        best = 0.0
        if device.type == "cuda":
            inner = 20
            for _ in range(3):
                torch.mm(a, b, out=c)  # warm-up: cuBLAS heuristics and clocks
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                begin.record()
                for _ in range(inner):
                    torch.mm(a, b, out=c)
                end.record()
                end.synchronize()
                best = max(best, inner * flop / (begin.elapsed_time(end) / 1000))
            return best
        torch.mm(a, b, out=c)  # warm-up: oneDNN's kernel choice, first-touch of the pages
        deadline = time.perf_counter() + seconds
        samples = 0
        while time.perf_counter() < deadline or samples < 3:
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, flop / (time.perf_counter() - start))
            samples += 1
        return best
    finally:
        torch.set_num_threads(previous)


def datasheet_peak(device: torch.device | str, dtype: torch.dtype) -> tuple[str, float] | None:
    """(device name, dense FLOP/s of its datasheet) for a known CUDA device, else ``None``. A float32 product runs
    as TF32 when ``torch.get_float32_matmul_precision()`` allows it (Ampere and later)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    key = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        key = "tfloat32" if torch.cuda.get_device_capability(device)[0] >= 8 else key
    lowered = name.lower()
    for words, label, peaks in DATASHEET:
        if all(w in lowered for w in words):
            return (f"{label} ({name})", peaks[key]) if key in peaks else None
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, "tfloat32" if key == "tfloat32" else dtype)
    return (name, float(flops)) if flops else None


def efficiency(
    step: FlopCount | None,
    step_images: int,
    images_per_sec: float | None,
    peaks: dict[str, float],
    dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> dict[str, Any]:
    """The summary's figures from a counted step (``step_images`` images), the run's images/s (all processes) and
    the measured peaks per dtype name; FLOP/s are per device. Keys: see :meth:`FlopsCallback.summary
    <contrastive.flops_callback.FlopsCallback.summary>`."""
    out: dict[str, Any] = {}
    per_image = step.total / step_images if step is not None and step_images else None
    if per_image is not None:
        out["flops_per_image"] = round(per_image)
        out["flops_per_image_parts"] = {k: round(v / step_images) for k, v in step.parts.items() if v}
    achieved = per_image * images_per_sec / max(world_size, 1) if per_image is not None and images_per_sec else None
    if achieved is not None:
        out["achieved_flops"] = round(achieved)
    name = str(dtype).removeprefix("torch.")
    peak_dtype = name if name in peaks else "float32"
    peak = peaks.get(peak_dtype)
    if peak:
        out["peak_flops"], out["peak_dtype"] = round(peak), peak_dtype
        if peak_dtype != "bfloat16" and "bfloat16" in peaks:
            out["peak_flops_bf16"] = round(peaks["bfloat16"])
    if achieved is not None and peak:
        out["utilisation"] = round(achieved / peak, 4)
    return out


def format_flops(value: float | None, unit: str = "FLOP") -> str:
    """``1.23e9`` -> ``1.23 GFLOP``."""
    if value is None or not math.isfinite(value):
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
