"""Bad configs are rejected before any training, by a message that names the key and what is allowed.

Most cases call ``validate`` / ``validate_with_data`` / ``train`` in-process; a few run the CLI to check its exit code
and that it prints no traceback (Hydra's compose-time errors included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from contrastive.data.datasets import DataError
from contrastive.errors import ConfigError, ConfigWarning
from contrastive.launch import requested_devices
from contrastive.train import train
from contrastive.validate import validate, validate_with_data

# (overrides, processes, a regex the message must match: the key, the bad value and what is allowed)
REJECTED = [
    (["method.name=byol"], 1, r"method\.name='byol' is not known; choose one of memory_bank, moco, simclr, swav"),
    (["backbone.name=vgg11"], 1, r"backbone\.name='vgg11' is not known; choose one of small_cnn, resnet18"),
    (["backbone.pool_size=0"], 1, r"backbone\.pool_size=0 must be >= 1"),
    (["backbone.fc_dim=-1"], 1, r"backbone\.fc_dim=-1 must be >= 0"),
    (
        ["backbone=resnet18", "backbone.fc_dim=256"],
        1,
        r"backbone\.pool_size and backbone\.fc_dim apply to small_cnn only",
    ),
    (["perf.threads=0"], 1, r"perf\.threads=0 must be >= 1"),
    (["method=memory_bank", "method.bank_init=zeros"], 1, r"method\.bank_init='zeros'; choose one of random, encoder"),
    (["data.name=imagenet"], 1, r"data\.name='imagenet' is not known; choose one of digits, synthetic, mnist"),
    (["optim.name=adam"], 1, r"optim\.name='adam' is not known; choose one of sgd, adamw, lars"),
    (["optim.scheduler=poly"], 1, r"optim\.scheduler='poly' is not known; choose one of cosine, constant, step"),
    (["logger.name=mlflow"], 1, r"logger\.name='mlflow' is not known; choose one of csv, tensorboard, wandb, none"),
    (["trainer.precision=fp8"], 1, r"trainer\.precision='fp8' is not known; choose one of 32-true"),
    (["resume=always"], 1, r"resume='always': choose auto or null"),
    (["data.batch_size=0"], 1, r"data\.batch_size=0 must be > 0"),
    (["data.batch_size=-8"], 1, r"data\.batch_size=-8 must be > 0"),
    (["method=simclr", "data.batch_size=1"], 1, r"data\.batch_size=1 must be >= 2: .*in-batch negatives"),
    (["method=memory_bank", "data.batch_size=1"], 1, r"data\.batch_size=1 must be >= 2: batch norm"),
    (["trainer.max_epochs=0"], 1, r"trainer\.max_epochs=0 must be > 0"),
    (["trainer.max_epochs=-3"], 1, r"trainer\.max_epochs=-3 must be > 0"),
    (["optim.lr=0"], 1, r"optim\.lr=0\.0 must be > 0"),
    (["optim.lr=-0.1"], 1, r"optim\.lr=-0\.1 must be > 0"),
    (["method.temperature=0"], 1, r"method\.temperature=0\.0 must be > 0"),
    (["method=swav", "method.temperature=-0.1"], 1, r"method\.temperature=-0\.1 must be > 0"),
    (
        ["method=moco", "data.batch_size=32", "method.queue_size=100"],
        1,
        r"method\.queue_size=100 must be a positive multiple of the global batch \(32 x 1 processes = 32\)",
    ),
    # 96 is a multiple of the per-process batch, not of the global one
    (
        ["method=moco", "data.batch_size=32", "method.queue_size=96"],
        2,
        r"method\.queue_size=96 must be a positive multiple of the global batch \(32 x 2 processes = 64\)",
    ),
    (
        ["augment.large.size=32"],
        1,
        r"augment\.large\.size=32 is larger than data\.image_size=16; choose augment\.large\.size <= 16",
    ),
    (
        ["method=swav", "augment.small.size=16"],
        1,
        r"augment\.small\.size=16 must be smaller than augment\.large\.size=16 \(method\.num_small_views=2",
    ),
    (
        ["method=swav", "augment.small.size=24"],
        1,
        r"augment\.small\.size=24 must be smaller than augment\.large\.size=16",
    ),
    (["trainer.accelerator=abacus"], 1, r"trainer\.accelerator='abacus' is not known; choose one of auto, cpu, gpu"),
    (
        ["trainer.accelerator=cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}"],
        1,
        rf"trainer\.devices={(os.cpu_count() or 1) + 1} but this machine has {os.cpu_count() or 1} CPU cores",
    ),
    (["trainer.accelerator=cpu", "trainer.devices=0"], 1, r"trainer\.devices=0 must be >= 1, -1 \(all\) or auto"),
    (["trainer.devices=two"], 1, r"trainer\.devices='two': give a count, a list of indices, -1 or auto"),
    (["method.proj_layers=0"], 1, r"method\.proj_layers=0 must be >= 1"),
    (["backbone.width=0"], 1, r"backbone\.width=0 must be >= 1"),
    (["data.num_workers=-1"], 1, r"data\.num_workers=-1 must be >= 0"),
    (["eval.knn_k=0"], 1, r"eval\.knn_k=0 must be >= 1"),
    (["eval.shots=[1,0]"], 1, r"eval\.shots=\[1, 0\]: each must be >= 1"),
    (["optim.weight_decay=-1"], 1, r"optim\.weight_decay=-1\.0 must be >= 0"),
    (["+method.temprature=0.1"], 1, r"method\.temprature is not a key of method; did you mean method\.temperature"),
    (["+backbone.widht=8"], 1, r"backbone\.widht is not a key of backbone; did you mean backbone\.width"),
    # refused before work (they used to fail inside the run, exit 1 with a traceback)
    (["optim.lr=${optim.nope}"], 1, r"optim\.lr cannot be resolved: Interpolation key 'optim\.nope' not found$"),
    (["data.std=[0]"], 1, r"data\.std=\[0\.0\] must be > 0"),
    (
        ["data.mean=[0.5,0.5]", "data.std=[0.5]"],
        1,
        r"data\.mean=\[0\.5, 0\.5\] and std=\[0\.5\] need one value per channel \(1\)",
    ),
    (["augment.grayscale=-1"], 1, r"augment\.grayscale=-1\.0 is a probability and must be in \[0, 1\]"),
    (["augment.large.scale=[0.9,0.1]"], 1, r"augment\.large\.scale=\[0\.9, 0\.1\] must be \[low, high\] with 0 <"),
    (["augment.large.scale=[0,0]"], 1, r"augment\.large\.scale=\[0\.0, 0\.0\] must be \[low, high\] with 0 <"),
    (["augment.blur.sigma=[-1,2]"], 1, r"augment\.blur\.sigma=\[-1\.0, 2\.0\] must be \[low, high\] with 0 <"),
    (["trainer.max_steps=-5"], 1, r"trainer\.max_steps=-5 must be > 0, or -1"),
    (["seed=-1"], 1, r"seed=-1 must be in \[0, 4294967295\]"),
    (["method.momentum_schedule=linear", "method=moco"], 1, r"method\.momentum_schedule='linear'; choose one of"),
    (
        ["+augment.large.sise=8"],
        1,
        r"augment\.large\.sise is not a key of augment\.large; did you mean augment\.large\.size",
    ),
]


@pytest.mark.parametrize("overrides, processes, message", REJECTED, ids=[" ".join(c[0]) for c in REJECTED])
def test_rejected_with_a_message_naming_the_key(cfg_factory, overrides, processes, message):
    cfg = cfg_factory(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=processes)


@pytest.mark.parametrize(
    "overrides, processes",
    [
        (["method=moco", "data.batch_size=32", "method.queue_size=128"], 2),
        (["method=swav"], 1),
        (["trainer.accelerator=cpu", "trainer.devices=1"], 1),
        (["trainer.devices=auto"], 1),
        (["augment.large.size=12"], 1),
        (["backbone.pool_size=3", "backbone.fc_dim=64"], 1),
    ],
)
def test_accepted(cfg_factory, overrides, processes):
    validate(cfg_factory(*overrides), world_size=processes)


def test_more_gpus_than_the_machine_has(cfg_factory):
    count = torch.cuda.device_count()
    cfg = cfg_factory("trainer.accelerator=gpu", f"trainer.devices={count + 4}")
    expected = (
        r"trainer\.accelerator=gpu but no CUDA GPU is available here; use trainer\.accelerator=cpu"
        if count == 0
        else rf"trainer\.devices={count + 4} but this machine has {count} GPUs"
    )
    with pytest.raises(ConfigError, match=expected):
        validate(cfg)


@pytest.mark.parametrize(
    "devices, expected",
    [
        (2, 2),
        ("3", 3),
        (-1, None),
        ("auto", None),
        ("-1", None),
        ([0, 2], [0, 2]),
        ("0,1", [0, 1]),
    ],
)
def test_requested_devices_reads_every_lightning_form(devices, expected):
    assert requested_devices(devices) == expected


def test_more_bank_negatives_than_entries(cfg_factory):
    cfg = cfg_factory("method=memory_bank", "method.num_negatives=300")
    validate(cfg)
    message = r"method\.num_negatives=300 must be smaller than the bank \(300 training images\)"
    with pytest.raises(ConfigError, match=message):
        validate_with_data(cfg, num_train=300)
    validate_with_data(cfg, num_train=301)


def test_global_batch_larger_than_the_training_set(cfg_factory):
    cfg = cfg_factory("data.batch_size=64")
    with pytest.raises(ConfigError, match=r"global batch \(128\) is larger than the training set \(100 images\)"):
        validate_with_data(cfg, num_train=100, world_size=2)


def test_swav_prototypes_beyond_half_the_images_warn(cfg_factory):
    cfg = cfg_factory("method=swav", "method.num_prototypes=120")
    with pytest.warns(ConfigWarning, match=r"method\.num_prototypes=120 for 200 training images.*at most 100"):
        validate_with_data(cfg, num_train=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        validate_with_data(cfg, num_train=240)


# -- checkpoints --------------------------------------------------------------------------------------------------
def fake_checkpoint(path: Path, method: str) -> Path:
    torch.save({"hyper_parameters": {"cfg": {"method": {"name": method}}}, "state_dict": {}}, path)
    return path


def test_checkpoint_that_does_not_exist(cfg_factory, tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"ckpt_path='{missing}' does not exist"):
        validate(cfg_factory(f"ckpt_path={missing}"))


def test_checkpoint_of_another_method(cfg_factory, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "moco.ckpt", "moco")
    message = r"was trained with method\.name='moco', not 'simclr': resume it with method=moco"
    with pytest.raises(ConfigError, match=message):
        validate(cfg_factory("method=simclr", f"ckpt_path={ckpt}"))
    validate(cfg_factory("method=moco", f"ckpt_path={ckpt}"))


def test_truncated_checkpoint(cfg_factory, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "last.ckpt", "simclr")
    ckpt.write_bytes(ckpt.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"cannot be read as a checkpoint .*truncated, damaged or not a checkpoint"):
        validate(cfg_factory(f"ckpt_path={ckpt}"))


# -- in train(): nothing starts ------------------------------------------------------------------------------------
def test_train_rejects_before_writing_anything(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.queue_size=100"):
        train(cfg_factory("method=moco", "method.queue_size=100"))
    assert not any(tmp_path.iterdir())


def test_missing_data_root_is_named(cfg_factory, tmp_path):
    missing = tmp_path / "absent"
    message = r"data\.root=.*absent.* does not exist: set data\.root=.*or data\.download=true"
    with pytest.raises(DataError, match=message):
        train(cfg_factory("data=cifar10", f"data.root={missing}", "data.download=false"))
    assert not (tmp_path / "checkpoints").exists()


# -- compose time: Hydra's typed schemas -----------------------------------------------------------------------------
def test_unknown_key_and_wrong_type_fail_at_compose(cfg_factory):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_factory("data.batchsize=3")
    assert isinstance(err.value.__cause__, ConfigAttributeError) and "data.batchsize" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        cfg_factory("optim.lr=fast")
    assert isinstance(err.value.__cause__, ValidationError) and "optim.lr" in str(err.value.__cause__)


# -- the CLI ---------------------------------------------------------------------------------------------------------
def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [sys.executable, "-m", "contrastive.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}
    )


@pytest.mark.parametrize(
    "overrides, code, expected",
    [
        # Hydra's own errors exit like ours: 2 for a refused command line
        (["data.batchsize=3"], 2, ["Key 'batchsize' not in 'DataConfig'", "full_key: data.batchsize"]),
        (
            ["method=moco", "method.queue_size=1000"],
            2,
            ["error: method.queue_size=1000 must be a positive multiple of the global batch (128 x 1 processes = 128)"],
        ),
        # a value refused by the augmentation's own rule, before work: exit 2, not a traceback from inside the run
        (["augment.large.scale=[0.9,0.1]"], 2, ["error: augment.large.scale=[0.9, 0.1] must be [low, high]"]),
    ],
    ids=["unknown-key", "queue-size", "crop-scale"],
)
def test_cli_error_names_the_key_without_traceback(tmp_path, overrides, code, expected):
    result = run_cli(tmp_path, *overrides)
    assert result.returncode == code, result.stderr[-2000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
