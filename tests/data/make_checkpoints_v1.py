"""Writes the small checkpoints in ``checkpoints_v1/`` that ``tests/methods/test_checkpoint_compat.py`` resumes: one per
method, and two cells of the design space with a momentum key encoder (bank, batch), each trained for one short
epoch on digits with a tiny backbone. They were written by commit 1dbae36 (the code before the methods were split
into one module per strategy and per source of negatives); re-running this script with later code writes files
from that code instead, which proves nothing about old checkpoints: keep the committed files.

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/make_checkpoints_v1.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest composes the real config

from conftest import make_cfg  # noqa: E402

from contrastive.train import train  # noqa: E402

# digits, a 4-wide CNN, 16-d embeddings, two steps of 16 images: each file a few hundred KB at most
TINY = [
    "data=digits",
    "data.batch_size=16",
    "backbone.width=4",
    "method.proj_hidden_dim=16",
    "method.proj_out_dim=8",
    "method.probe_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.deterministic=true",
    "eval.init=false",
    "eval.pixels=false",
    "eval.final=false",
    "logger=none",
]
RUNS = {
    "simclr": ["method=simclr"],
    "moco": ["method=moco", "method.queue_size=64"],
    "memory_bank": ["method=memory_bank", "method.loss=nce"],
    "swav": ["method=swav", "method.num_prototypes=8", "method.feature_queue_size=32"],  # queue_size when written
    "momentum_bank": ["method=memory_bank", "method.key_encoder=momentum"],
    "momentum_batch": ["method=simclr", "method.key_encoder=momentum"],
}


def main() -> None:
    out = HERE / "checkpoints_v1"
    out.mkdir(exist_ok=True)
    for name, overrides in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            train(make_cfg(TINY + overrides, fast=False, tmp_path=Path(tmp)))
            target = out / f"{name}.ckpt"
            shutil.copyfile(Path(tmp) / "checkpoints" / "last.ckpt", target)
            print(f"{target.relative_to(HERE.parent.parent)}: {target.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
