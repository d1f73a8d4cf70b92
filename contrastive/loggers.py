"""The run's loggers (``logger=csv|tensorboard|wandb|none``): the CSV log, which the report reads, always comes too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from contrastive.errors import require

LOGGERS = ("csv", "tensorboard", "wandb", "none")


def check_config(logger: Any) -> None:
    require(logger.name in LOGGERS, f"logger.name={logger.name!r} is not known; choose one of {', '.join(LOGGERS)}")


def build_logger(logger: Any, out: Path):
    """Lightning loggers writing into the run folder ``out``; ``False`` for none."""
    from lightning.pytorch.loggers import CSVLogger

    check_config(logger)
    if logger.name == "none":
        return False
    csv = CSVLogger(out, name="logs", version="")
    if logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = logger.offline
        if offline is None:
            offline = os.environ.get("WANDB_MODE") != "online" and not os.environ.get("WANDB_API_KEY")
        return [csv, WandbLogger(project=logger.project, save_dir=str(out), offline=offline)]
    if logger.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # event files in RUN/tensorboard (`tensorboard --logdir RUN`); the CSV beside them feeds the report
        return [csv, TensorBoardLogger(out, name="tensorboard", version="")]
    return csv
