"""Installing: the Makefile installs where a user's Python allows (the active virtual environment, else a project
.venv: a system Python refuses `pip install`, PEP 668), always with the known-good pair of constraints.txt; the
wheel carries the top-level conf/ as contrastive.conf, and the CLI finds it outside the source tree; the code
passes the linter and the formatter."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="needs ruff (the dev extra)")
LINTED = ["contrastive", "tests", "benchmarks"]


def dry_run(target: str, **env: str) -> list[str]:
    # under `make test` the tests run inside make: its MAKELEVEL / MAKEFLAGS must not reach this make
    skip = ("VIRTUAL_ENV", "PYTHON", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    base = {k: v for k, v in os.environ.items() if k not in skip}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**base, **env},
    )
    return done.stdout.splitlines()


@needs_make
def test_without_an_active_venv_make_creates_and_uses_the_project_venv():
    lines = dry_run("install")
    assert lines[0] == "python3 -m venv .venv"
    assert lines[1] == ".venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,tune]'"


@needs_make
def test_an_active_venv_is_used_as_it_is(tmp_path):
    lines = dry_run("test", VIRTUAL_ENV=str(tmp_path))
    assert not any("-m venv" in line for line in lines)
    assert lines[0] == f"{tmp_path}/bin/python -m pip install -q -c constraints.txt -e '.[dev,tune]'"
    assert lines[1] == f"{tmp_path}/bin/python -m pytest -q"


@needs_make
def test_python_overrides_both():
    lines = dry_run("install", PYTHON="/opt/py/bin/python3", VIRTUAL_ENV="/elsewhere")
    assert lines == ["/opt/py/bin/python3 -m pip install -q -c constraints.txt -e '.[dev,tune]'"]


def test_pyproject_declares_a_range_and_constraints_pin_the_tested_pair():
    torch_dep = re.search(r'^\s*"(torch[<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert "==" not in torch_dep and ">=" in torch_dep
    pins = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # the tested torch pair, and the tuning extra's sweeper with the optuna it works with
    assert set(pins) == {"torch", "torchvision", "hydra-optuna-sweeper", "optuna"}
    import torch
    import torchvision

    # the environment the tests run in is the pinned pair (make and CI install with the constraints)
    if os.environ.get("CI"):
        assert torch.__version__.split("+")[0] == pins["torch"]
        assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def composed_job(overrides: list[str], cwd: Path, env: dict[str, str], no_site: bool = False) -> dict:
    """The config ``python -m contrastive.train --cfg job`` composes, run from ``cwd`` (``-S``: no site-packages)."""
    python = [sys.executable, "-S"] if no_site else [sys.executable]
    cli = subprocess.run(
        [*python, "-m", "contrastive.train", "--cfg", "job", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    return yaml.safe_load(cli.stdout)


# -- the configs: found through the package, from any folder -----------------------------------------------------
def test_the_cli_of_this_install_finds_its_configs_from_another_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cfg = composed_job(["method=swav", "optim=lars"], cwd=tmp_path, env=env)
    expected = yaml.safe_load((REPO / "conf" / "method" / "swav.yaml").read_text())
    assert cfg["method"]["name"] == "swav" and cfg["optim"]["name"] == "lars"
    assert cfg["method"]["num_prototypes"] == expected["num_prototypes"]
    help_text = subprocess.run(
        [sys.executable, "-m", "contrastive.train", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    groups = dict(line.split(": ", 1) for line in help_text.splitlines() if re.match(r"^\w+: \w", line))
    assert "usage: python -m contrastive.train" in help_text  # the project's help (conf/hydra/help)
    assert {"moco", "simclr", "swav"} <= set(groups["method"].split(", "))
    assert not list(tmp_path.iterdir())


def without_site(*paths: Path) -> dict[str, str]:
    """The environment of ``python -S`` importing from ``paths`` first, then this environment's site-packages: no
    .pth file runs, so the editable install of this checkout (a finder mapping contrastive.conf to its conf/) is out."""
    deps = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), *deps]), "OMP_NUM_THREADS": "1"}


def test_an_uninstalled_copy_of_the_checkout_reads_its_own_configs(tmp_path):
    copy = tmp_path / "copy"
    for folder in ("contrastive", "conf"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    swav = copy / "conf" / "method" / "swav.yaml"
    text = swav.read_text()
    assert re.search(r"^num_prototypes: \d+", text, re.M)
    swav.write_text(re.sub(r"^num_prototypes: \d+", "num_prototypes: 77", text, flags=re.M))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = composed_job(["method=swav"], cwd=elsewhere, env=without_site(copy), no_site=True)
    assert cfg["method"]["num_prototypes"] == 77


# -- the wheel ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (the build writes build/ and egg-info beside its sources),
    offline: no build isolation, no index."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    for folder in ("contrastive", "conf"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("contrastive-*.whl")
    return built


def test_the_wheel_holds_every_module_and_every_config_where_the_code_reads_them(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"contrastive/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(configs) > 50 and "contrastive/conf/config.yaml" in configs
    assert "contrastive/conf/hydra/help/contrastive.yaml" in configs
    assert configs <= names, sorted(configs - names)
    assert "contrastive/conf/__init__.py" in names  # Hydra reads a pkg:// path only from a package
    # pyproject.toml lists the packages: a new subpackage left out of the list would be missing here
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "contrastive").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if n.startswith(("conf/", "benchmarks/", "tests/")) or n.endswith("bench.py")]


def test_the_cli_installed_from_the_wheel_composes_its_config_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = without_site(site)
    probe = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys, importlib.resources, contrastive; print(contrastive.__file__); "
            "print(importlib.resources.files('contrastive.conf')); print('\\n'.join(sys.path))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]  # e.g. No module named 'contrastive.conf'
    package, conf, *path = probe.stdout.splitlines()
    assert Path(package).is_relative_to(site) and Path(conf).is_relative_to(site), probe.stdout
    assert str(REPO) not in path and "" not in path[1:], path  # the checkout is not on the path
    cfg = composed_job(["method=moco", "data=synthetic"], cwd=elsewhere, env=env, no_site=True)
    # the moco preset over the defaults, the override applied
    expected = yaml.safe_load((REPO / "conf" / "method" / "moco.yaml").read_text())
    assert cfg["method"]["name"] == "moco" and cfg["data"]["name"] == "synthetic"
    assert cfg["method"]["key_encoder"] == "momentum" and cfg["method"]["negatives"] == "queue"
    assert cfg["method"]["queue_size"] == expected["queue_size"]
    assert cfg["backbone"]["name"] == "small_cnn" and cfg["optim"]["name"] == "sgd"
    assert not list(elsewhere.iterdir())  # --cfg job writes no run folder


# -- lint and format -----------------------------------------------------------------------------------------------
def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *LINTED],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@needs_ruff
def test_ruff_check_is_clean():
    done = ruff("check", "--output-format", "concise")
    assert done.returncode == 0, done.stdout[-5000:]


@needs_ruff
def test_the_code_is_formatted_and_keeps_to_the_declared_line_length():
    formatted = ruff("format", "--check")
    assert formatted.returncode == 0, "not formatted (ruff format FILE):\n" + formatted.stdout[-5000:]
    # the formatter leaves long strings and comments alone: the line length is checked apart
    long_lines = ruff("check", "--select", "E501", "--output-format", "concise")
    assert long_lines.returncode == 0, long_lines.stdout[-5000:]
