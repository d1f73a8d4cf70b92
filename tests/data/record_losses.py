"""The first training steps' contrastive losses of every method and of several cells of the design space, for a
fixed seed on digits with a tiny backbone: ``losses_v1.json`` holds them as commit 1dbae36 computed them (before
the methods were split into one module per strategy and per source of negatives). ``--check`` recomputes them
with the code in the tree and compares (relative tolerance 1e-6).

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/record_losses.py [--check]
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest composes the real config

from conftest import make_cfg  # noqa: E402

import contrastive.methods as methods  # noqa: E402
from contrastive.train import train  # noqa: E402

STEPS = 4
TINY = [
    "data=digits",
    "data.batch_size=16",
    "backbone.width=4",
    "method.proj_hidden_dim=16",
    "method.proj_out_dim=8",
    "method.probe_size=16",
    "trainer.max_epochs=1",
    f"trainer.limit_train_batches={STEPS}",
    "trainer.limit_val_batches=1",
    "trainer.deterministic=true",
    "eval.init=false",
    "eval.pixels=false",
    "eval.final=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
RUNS = {
    "simclr": ["method=simclr"],
    "moco": ["method=moco", "method.queue_size=32"],
    "memory_bank": ["method=memory_bank"],
    "memory_bank_nce": ["method=memory_bank", "method.loss=nce"],
    "swav": ["method=swav", "method.num_prototypes=8", "method.feature_queue_size=32"],
    "momentum_batch": ["method=simclr", "method.key_encoder=momentum"],
    "momentum_bank": ["method=memory_bank", "method.key_encoder=momentum"],
    "shared_queue": ["method=simclr", "method.negatives=queue", "method.queue_size=32"],
    "moco_bank_two_views": ["method=moco", "method.negatives=bank"],
    "moco_symmetric": ["method=moco", "method.queue_size=32", "method.symmetric=true"],
}


def losses(overrides: list[str]) -> list[float]:
    recorded: list[float] = []
    build = methods.build_method

    def recording_build(cfg, num_train):
        model = build(cfg, num_train)
        step = model.contrastive_loss

        def contrastive_loss(*args, **kwargs):
            out = step(*args, **kwargs)
            recorded.append(float(out.loss))
            return out

        model.contrastive_loss = contrastive_loss
        return model

    methods.build_method = recording_build
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(make_cfg(TINY + overrides, fast=False, tmp_path=Path(tmp)))
    finally:
        methods.build_method = build
    return recorded


def main() -> int:
    file = HERE / "losses_v1.json"
    now = {name: losses(overrides) for name, overrides in RUNS.items()}
    if "--check" not in sys.argv:
        file.write_text(json.dumps(now, indent=1) + "\n")
        print(json.dumps(now, indent=1))
        return 0
    before, bad = json.loads(file.read_text()), 0
    for name, values in before.items():
        worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(values, now[name]))
        ok = len(values) == len(now[name]) and worst <= 1e-6 and not any(map(math.isnan, now[name]))
        bad += not ok
        print(f"{name:22s} {'same' if ok else 'DIFFERS'}  max rel diff {worst:.1e}  before {values}  now {now[name]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
