"""The Makefile installs where a user's Python allows: the active virtual environment, else a project .venv (a
system Python refuses `pip install`, PEP 668), always with the known-good pair of constraints.txt."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target: str, **env: str) -> list[str]:
    # under `make test` the tests run inside make: its MAKELEVEL / MAKEFLAGS must not reach this make
    skip = ("VIRTUAL_ENV", "PYTHON", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    base = {k: v for k, v in os.environ.items() if k not in skip}
    done = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=REPO, capture_output=True,
                          text=True, check=True, env={**base, **env})
    return done.stdout.splitlines()


def test_without_an_active_venv_make_creates_and_uses_the_project_venv():
    lines = dry_run("install")
    assert lines[0] == "python3 -m venv .venv"
    assert lines[1] == ".venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'"


def test_an_active_venv_is_used_as_it_is(tmp_path):
    lines = dry_run("test", VIRTUAL_ENV=str(tmp_path))
    assert not any("-m venv" in line for line in lines)
    assert lines[0] == f"{tmp_path}/bin/python -m pip install -q -c constraints.txt -e '.[dev]'"
    assert lines[1] == f"{tmp_path}/bin/python -m pytest -q"


def test_python_overrides_both():
    lines = dry_run("install", PYTHON="/opt/py/bin/python3", VIRTUAL_ENV="/elsewhere")
    assert lines == ["/opt/py/bin/python3 -m pip install -q -c constraints.txt -e '.[dev]'"]


def test_pyproject_declares_a_range_and_constraints_pin_the_tested_pair():
    torch_dep = re.search(r'^\s*"(torch[<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert "==" not in torch_dep and ">=" in torch_dep
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {"torch", "torchvision"}
    import torch
    import torchvision

    # the environment the tests run in is the pinned pair (make and CI install with the constraints)
    if os.environ.get("CI"):
        assert torch.__version__.split("+")[0] == pins["torch"]
        assert torchvision.__version__.split("+")[0] == pins["torchvision"]
