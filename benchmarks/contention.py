"""How a CPU run degrades beside another CPU-bound process: the default SimCLR run, quiet and next to a busy-loop
process this script starts itself, with torch's threads fixed and with the ThreadGovernor (perf.adapt_threads).

    python benchmarks/contention.py [--epochs 10] [--hogs 1]

Prints the training seconds of each case and the ratios measured in this one run. Not a test: a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG = "while True: pass"


def run(epochs: int, adapt: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "contrastive.train",
            f"trainer.max_epochs={epochs}",
            "trainer.enable_progress_bar=false",
            "eval.final=false",
            "eval.init=false",
            "eval.pixels=false",
            "diagnostics=false",
            f"perf.adapt_threads={str(adapt).lower()}",
            f"hydra.run.dir={out}",
        ]
        start, cpu0 = time.perf_counter(), os.times()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        cpu1 = os.times()
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    return {"train_s": metrics["train_time_s"], "wall_s": time.perf_counter() - start, "cpu_s": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=1, help="busy-loop processes started beside the loaded runs")
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{args.epochs} epochs of the default SimCLR run"
    )
    results = {}
    for adapt in (False, True):
        results[("quiet", adapt)] = run(args.epochs, adapt)
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
        try:
            results[("loaded", adapt)] = run(args.epochs, adapt)
        finally:
            for hog in hogs:
                hog.kill()
    print("| threads | quiet: train s (CPU s) | beside the busy loop: train s (CPU s) | slowdown |")
    print("|---|---|---|---|")
    for adapt, name in ((False, "fixed (perf.adapt_threads=false)"), (True, "governed (default)")):
        quiet, loaded = results[("quiet", adapt)], results[("loaded", adapt)]
        print(
            f"| {name} | {quiet['train_s']:.1f} ({quiet['cpu_s']:.0f}) | {loaded['train_s']:.1f} "
            f"({loaded['cpu_s']:.0f}) | {loaded['train_s'] / quiet['train_s']:.2f}x |"
        )
    base = results[("quiet", False)]["train_s"]
    print(
        f"governed beside the loop / fixed quiet: {results[('loaded', True)]['train_s'] / base:.2f}x; "
        f"governed quiet / fixed quiet: {results[('quiet', True)]['train_s'] / base:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
