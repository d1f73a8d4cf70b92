"""`make study` (the survey study): every training command composes into a valid config, and the sweeps are the
ones the README states (4 methods x 3 seeds; Figure 3 at equal epochs and at equal steps: 500 steps for every point
is tests/integration/test_budget.py's)."""

from __future__ import annotations

import os
import shlex
import subprocess

from conftest import REPO, make_cfg

from contrastive.validate import validate


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
    # the tuning stage (make tune, a loop over the methods: tests/integration/test_tuning.py) comes first
    lines = out.splitlines()
    tuning = [i for i, line in enumerate(lines) if "experiment=tune_cifar10_cpu" in line]
    assert tuning and tuning[0] < min(i for i, line in enumerate(lines) if "experiment=compare_cifar10_cpu" in line)
    return [shlex.split(line)[3:] for line in lines if "-m contrastive.train" in line and "+tune=" not in line]


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
    cifar = make_cfg(["experiment=compare_cifar10_cpu"], fast=False)
    assert cifar.data.name == "npz"
    # Figure 3 on the same split, each mechanism with the comparison's settings for it
    for point, method in (("e2e_64", "simclr"), ("bank_512", "memory_bank"), ("moco_4096", "moco")):
        fig3 = make_cfg(["experiment=negatives_sweep_cifar10", f"+experiment/nsweep_cifar10={point}"], fast=False)
        compared = make_cfg(["experiment=compare_cifar10_cpu", f"method={method}"], fast=False)
        assert fig3.data == {**compared.data, "batch_size": 64}, point
        assert fig3.augment == compared.augment and fig3.backbone == compared.backbone
        assert fig3.method.name == method and fig3.optim.lr == compared.optim.lr
        assert fig3.method.temperature == compared.method.temperature
        assert fig3.method.get("symmetric") == compared.method.get("symmetric")
