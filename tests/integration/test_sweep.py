"""Sweeps over several processes: a Hydra multirun with DDP, the refusal of Lightning's re-running ``ddp`` inside one,
the SLURM launcher's job layout (a dry run through the real plugin and submitit) and the ImageNet presets.

Dry run from the command line, printing the sbatch script that ``hydra/launcher=slurm`` would submit:
    PYTHONPATH=tests python tests/integration/test_sweep.py experiment=imagenet_simclr hydra.launcher.partition=gpu
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, make_cfg
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from contrastive.errors import ConfigError
from contrastive.launch import SpawnDDPStrategy, build_plugins, build_strategy, check_ddp_launch, world_size
from contrastive.validate import validate

FAST_CLI = [
    "data=synthetic",
    "data.size=128",
    "data.batch_size=16",
    "backbone.width=8",
    "method.proj_hidden_dim=32",
    "method.proj_out_dim=16",
    "method.queue_size=64",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "eval.linear_epochs=0",
    "eval.fewshot_seeds=1",
    "eval.init=false",
    "eval.pixels=false",
    "logger=csv",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "contrastive.train", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


# -- a multirun with several processes per job --------------------------------------------------------------------
def test_multirun_with_ddp_spawn_writes_one_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    # a ${hydra:...} value inside the task config: the spawned workers, which have no Hydra, must never resolve it
    result = run_cli(
        [
            "-m",
            "method=simclr,moco",
            "trainer.strategy=ddp_spawn",
            *FAST_CLI,
            f"hydra.sweep.dir={sweep}",
            "data.root=${hydra:runtime.output_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_simclr", "1_moco"]
    metrics = sorted(tmp_path.rglob("metrics.json"))
    assert metrics == [job / "metrics.json" for job in jobs]  # one per job, none elsewhere (no re-run sweep)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    for job, method in zip(jobs, ["simclr", "moco"]):
        summary = json.loads((job / "metrics.json").read_text())
        assert summary["method"] == method and summary["global_batch_size"] == 32
        assert summary["epochs"] == 1 and summary["global_steps"] == 2 and len(summary["history"]) == 1
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "logs" / "metrics.csv").is_file()
        assert "${" not in (job / "config.yaml").read_text()  # the run folder holds the resolved config


def test_parallel_launcher_runs_two_jobs_at_once_with_their_thread_share(tmp_path):
    sweep = tmp_path / "sweep"
    one_process = [a for a in FAST_CLI if not a.startswith("trainer.devices")]
    result = run_cli(
        [
            "-m",
            "hydra/launcher=parallel",
            "perf.threads=1",
            "method=simclr,moco",
            *one_process,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_simclr", "1_moco"]
    for job in jobs:
        summary = json.loads((sweep / job / "metrics.json").read_text())
        assert summary["epochs"] == 1 and summary["global_steps"] == 2
        assert "threads: 1" in (sweep / job / "config.yaml").read_text()


def test_multirun_with_ddp_is_refused_with_a_clear_message(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "method=simclr", "trainer.strategy=ddp", *FAST_CLI, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "trainer.strategy=ddp_spawn" in result.stderr and "hydra/launcher=slurm" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("last.ckpt"))


@contextmanager
def hydra_mode(mode: str):
    """The Hydra singleton as a job of a run (``RUN``) or a sweep (``MULTIRUN``) sees it."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.mode={mode}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


SLURM_TASK = {
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "node[1-2]",
    # set here so that Lightning, which writes them into os.environ when missing, leaves no trace
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29555",
}


def ddp_cfg(strategy: str, devices: int = 2, nodes: int = 1) -> DictConfig:
    return make_cfg(
        [
            f"trainer.strategy={strategy}",
            f"trainer.devices={devices}",
            f"trainer.num_nodes={nodes}",
            "trainer.accelerator=cpu",
        ]
    )


def test_ddp_inside_a_multirun_needs_ranks_from_a_cluster_launcher(monkeypatch):
    for name in SLURM_TASK:
        monkeypatch.delenv(name, raising=False)
    with hydra_mode("MULTIRUN"):
        with pytest.raises(ConfigError, match="ddp_spawn"):
            build_strategy(ddp_cfg("ddp"))
        check_ddp_launch(ddp_cfg("ddp", devices=1, nodes=2))  # one process per node: Lightning starts none
        assert isinstance(build_strategy(ddp_cfg("ddp_spawn")), SpawnDDPStrategy)
        for name, value in SLURM_TASK.items():
            monkeypatch.setenv(name, value)
        assert build_strategy(ddp_cfg("ddp", nodes=2))._ddp_kwargs["broadcast_buffers"] is False
    monkeypatch.delenv("SLURM_NTASKS")
    with hydra_mode("RUN"):
        check_ddp_launch(ddp_cfg("ddp"))  # a single run: Lightning re-runs only this job


def test_under_slurm_lightning_does_not_requeue(monkeypatch):
    """submitit owns requeueing: the Trainer built as in train() uses SLURM's ranks with auto-requeue off."""
    for name in SLURM_TASK:
        monkeypatch.delenv(name, raising=False)
    assert build_plugins() == []
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    cfg = ddp_cfg("ddp", nodes=2)
    # the Trainer sets the process-global rank from SLURM's variables; restore it so later tests log as rank 0
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    monkeypatch.setattr(fabric_rank_zero_only, "rank", fabric_rank_zero_only.rank)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=2,
        strategy=build_strategy(cfg),
        plugins=build_plugins(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False and env.creates_processes_externally
    assert (env.world_size(), env.global_rank(), env.local_rank()) == (4, 1, 1)
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) == before  # no requeue handler of Lightning's
    finally:
        trainer._signal_connector.teardown()


# -- the SLURM launcher: dry run ----------------------------------------------------------------------------------
class _Submitted(Exception):
    """Raised in place of calling sbatch, carrying the script submitit wrote."""

    def __init__(self, script: str) -> None:
        super().__init__("dry run")
        self.script = script


def _capture(self, path: Path):
    raise _Submitted(Path(path).read_text())


def slurm_dry_run(overrides: list[str], sweep_dir: Path, jobs: list[list[str]]) -> tuple[DictConfig, str]:
    """The sbatch script the real hydra-submitit-launcher and submitit write for ``jobs`` (one override list per
    sweep job) with ``hydra/launcher=slurm`` and ``overrides``; sbatch itself is never called."""
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", "hydra.job.name=train", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        launcher = instantiate(cfg.hydra.launcher)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 2)))
            stack.enter_context(mock.patch.object(SlurmExecutor, "_make_submission_command", _capture))
            try:
                launcher.launch(jobs, initial_job_idx=0)
            except _Submitted as submitted:
                return cfg, submitted.script
        raise AssertionError("the launcher submitted nothing")
    finally:
        HydraConfig.instance().cfg = None


def sbatch_options(script: str) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH --") for line in script.splitlines() if line.startswith("#SBATCH --")]
    return dict(line.split("=", 1) if "=" in line else (line, "") for line in lines)


def test_slurm_layout_follows_the_trainer(tmp_path):
    jobs = [[f"method={m}"] for m in ("simclr", "memory_bank", "moco", "swav")]
    cfg, script = slurm_dry_run(
        ["trainer.num_nodes=2", "trainer.devices=4", "hydra.launcher.partition=gpu"], tmp_path, jobs
    )
    options = sbatch_options(script)
    assert options["nodes"] == "2" and options["ntasks-per-node"] == "4" and options["gpus-per-node"] == "4"
    assert options["array"] == "0-3%4"  # one array task per sweep job, all at once
    assert options["partition"] == "gpu" and options["cpus-per-task"] == "10" and options["mem-per-gpu"] == "60G"
    assert options["time"] == "1440" and options["signal"] == "USR2@300"  # submitit's requeue signal, 300 s early
    assert "srun" in script and "submitit.core._submit" in script
    assert cfg.hydra.launcher.max_num_timeout > 0


def test_imagenet_presets_submit_their_papers_layout(tmp_path):
    _, script = slurm_dry_run(["experiment=imagenet_simclr"], tmp_path, [[]])
    options = sbatch_options(script)
    assert (options["nodes"], options["ntasks-per-node"], options["gpus-per-node"]) == ("8", "8", "8")
    assert "array" not in options and "partition" not in options


# the papers' global batch and its split; base lr per 256 images, scaled by optim.scale_lr
PRESETS = {
    "imagenet_simclr": {"global": 4096, "nodes": 8, "devices": 8, "per_gpu": 64, "optim": "lars", "lr": 4.8},
    "imagenet_moco": {"global": 256, "nodes": 1, "devices": 8, "per_gpu": 32, "optim": "sgd", "lr": 0.03},
    "imagenet_swav": {"global": 4096, "nodes": 8, "devices": 8, "per_gpu": 64, "optim": "lars", "lr": 4.8},
    "imagenet_memory_bank": {"global": 256, "nodes": 1, "devices": 8, "per_gpu": 32, "optim": "sgd", "lr": 0.03},
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_imagenet_presets(name, monkeypatch):
    want = PRESETS[name]
    cfg = make_cfg([f"experiment={name}"], fast=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    world = world_size(cfg.trainer)
    validate(cfg, world_size=world)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.data.batch_size) == (
        want["nodes"],
        want["devices"],
        want["per_gpu"],
    )
    assert world * cfg.data.batch_size == want["global"]
    assert cfg.optim.name == want["optim"] and cfg.optim.scale_lr
    assert cfg.optim.lr * want["global"] / 256 == pytest.approx(want["lr"])
    assert cfg.data.name == "imagefolder" and cfg.backbone.name == "resnet50" and not cfg.backbone.small_images
    assert cfg.trainer.strategy == "ddp" and cfg.resume == "auto"
    m = cfg.method
    if name == "imagenet_swav":
        assert (m.num_views, m.num_small_views, m.num_prototypes, cfg.data.small_size) == (2, 6, 3000, 96)
    if name == "imagenet_moco":
        assert m.queue_size == 65536 and m.momentum == 0.999 and m.shuffle_bn and not cfg.backbone.sync_batchnorm
    if name == "imagenet_memory_bank":
        assert (m.loss, m.temperature, m.num_negatives, m.proj_layers) == ("nce", 0.07, 4096, 1)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


# -- the comparisons: every preset of conf/method, listed nowhere else ---------------------------------------------
def sweep_jobs(conf_dir: str, experiment: str) -> list[list[str]]:
    """The override list of each job of ``-m experiment=<experiment>``, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.get("params", {}).items()]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        return BasicSweeper.split_arguments(parser.parse_overrides(params), None)[0]


COMPARISONS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("compare_*.yaml"))


@pytest.mark.parametrize("experiment", COMPARISONS)
def test_comparisons_sweep_every_method_preset(experiment):
    presets = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
    assert presets == ["memory_bank", "moco", "simclr", "swav"]
    assert sweep_jobs(CONF_DIR, experiment) == [[f"method={m}"] for m in presets]


def test_a_new_method_preset_joins_every_comparison(tmp_path):
    """A fifth preset in conf/method (here a copy of SimCLR's under another name) is a job of every comparison and
    composes there without settings of its own (each benchmark's per-method file is optional)."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    preset = (conf / "method" / "simclr.yaml").read_text().replace("name: simclr", "name: toy")
    (conf / "method" / "toy.yaml").write_text(preset)
    for experiment in COMPARISONS:
        assert ["method=toy"] in sweep_jobs(str(conf), experiment), experiment
        with initialize_config_dir(str(conf), version_base="1.3"):
            toy = compose("config", overrides=[f"experiment={experiment}", "method=toy"])
            simclr = compose("config", overrides=[f"experiment={experiment}", "method=simclr"])
        assert toy.method.name == "toy" and toy.data == simclr.data and toy.trainer == simclr.trainer, experiment


def test_benchmark_settings_are_the_chosen_methods():
    """experiment/<base>/<method>.yaml applies to that method under the experiments that choose that base."""
    moco = make_cfg(["experiment=compare_cifar10_cpu", "method=moco"], fast=False)
    assert moco.method.symmetric  # experiment/cifar10_cpu/moco.yaml
    assert not make_cfg(["experiment=compare_digits", "method=moco"], fast=False).method.symmetric  # the preset
    swav = make_cfg(["experiment=compare_cifar10", "method=swav"], fast=False)
    assert (swav.method.num_prototypes, swav.method.num_small_views) == (512, 0)
    point = make_cfg(["experiment=negatives_sweep_cifar10", "+experiment/nsweep_cifar10=bank_64"], fast=False)
    bank = make_cfg(["experiment=compare_cifar10_cpu", "method=memory_bank"], fast=False)
    assert point.method.name == "memory_bank" and point.method.num_negatives == 64
    chosen = OmegaConf.load(Path(CONF_DIR) / "experiment" / "cifar10_cpu" / "memory_bank.yaml")
    assert (point.method.temperature, point.optim.lr) == (bank.method.temperature, bank.optim.lr)
    assert (bank.method.temperature, bank.optim.lr) == (chosen.method.temperature, chosen.optim.lr)


if __name__ == "__main__":
    import tempfile

    args = sys.argv[1:]
    # an experiment preset is one job; otherwise the four methods as one job array
    sweep = (
        [[]]
        if any(a.startswith("experiment=") for a in args)
        else [[f"method={m}"] for m in ("simclr", "memory_bank", "moco", "swav")]
    )
    with tempfile.TemporaryDirectory() as tmp:
        print(slurm_dry_run(args, Path(tmp) / "sweep", sweep)[1])
