"""The run's summary: what ``metrics.json`` records beside the figures, and the table printed at the end."""

from __future__ import annotations

import re
import resource
from pathlib import Path
from typing import Any

import torch

# per-epoch record keys that are bookkeeping, or that the summary holds under another name (the final loss; knn_acc
# from the final evaluation rather than the per-epoch monitor), and the learning rates of the optimiser's groups
NOT_FIGURES = ("epoch", "step", "wall_s", "loss", "knn_acc")
LEARNING_RATE = re.compile(r"^(pg\d+|lr-.*)$")


def history_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest value of every figure the per-epoch history holds. A step budget can end inside an epoch, whose
    record then lacks the end-of-epoch figures: each figure comes from the last record that has it."""
    figures: dict[str, Any] = {}
    for record in records:
        for key, value in record.items():
            if key not in NOT_FIGURES and not LEARNING_RATE.match(key) and value is not None:
                figures[key] = value
    return figures


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_overrides() -> list[str]:
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
        if key in ("history", "overrides", "method", "data", "backbone") or value is None or isinstance(value, dict):
            continue
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"run folder: {out}")
