"""`make study` (the survey study): every training command composes into a valid config, and the sweeps are the
ones the README states (4 methods x 3 seeds; Figure 3 at equal epochs and at equal steps)."""

from __future__ import annotations

import os
import shlex
import subprocess

from conftest import REPO, make_cfg

from contrastive.config import validate


def study_commands() -> list[list[str]]:
    skip = ("VIRTUAL_ENV", "PYTHON", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")  # as in test_install: not make's own
    env = {k: v for k, v in os.environ.items() if k not in skip}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "study", "PYTHON=python"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.replace("\\\n", " ")
    return [shlex.split(line)[3:] for line in out.splitlines() if "-m contrastive.train" in line]


def test_every_study_command_composes_and_validates():
    commands = study_commands()
    assert len(commands) == 3
    sweeps = []
    for args in commands:
        assert args[0] == "-m"
        overrides = [a for a in args[1:] if not a.startswith(("hydra", "data.root="))]
        swept = {a.split("=", 1)[0]: a.split("=", 1)[1].split(",") for a in overrides if "," in a}
        sweeps.append(swept)
        for seed in swept["seed"]:
            # one job of the sweep: this seed, the first value of every other swept key
            job = {**{key: values[0] for key, values in swept.items()}, "seed": seed}
            first = [a if "," not in a else f"{a.split('=', 1)[0]}={job[a.split('=', 1)[0]]}" for a in overrides]
            validate(make_cfg(first, fast=False))
    assert [s["seed"] for s in sweeps] == [["0", "1", "2"], ["0", "1"], ["0", "1"]]
    # equal steps: only the end-to-end points train again (the bank's and MoCo's batch of 64 makes the equal-epoch
    # sweep's 4 epochs exactly 500 steps); the report takes those points from the equal-epoch folder
    assert sweeps[2]["+nsweep"] == ["e2e_32", "e2e_128", "e2e_512"]
    for point in ("bank_64", "bank_256", "bank_1024", "bank_4096", "moco_64", "moco_256", "moco_1024", "moco_4096"):
        cfg = make_cfg(["experiment=negatives_sweep", f"+nsweep={point}", "trainer.max_epochs=4"], fast=False)
        assert cfg.data.batch_size == 64, point  # 8,000 images / 64 x 4 epochs = 500 steps
    cifar = make_cfg(["experiment=compare_cifar10_cpu"], fast=False)
    assert cifar.data.name == "npz"
    steps = make_cfg(["experiment=negatives_sweep_steps", "trainer.max_steps=500"], fast=False)
    assert (steps.trainer.max_epochs, steps.trainer.max_steps) == (-1, 500)
