"""Three splits, named everywhere: train / validation / test (data.test_fraction), the test split read only by the final
evaluation of a run that is not a tuning trial (issue 29)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg
from omegaconf import OmegaConf

from contrastive.config import DataConfig
from contrastive.data.datamodule import ContrastiveDataModule
from contrastive.data.datasets import DataError, load_splits, split_indices, split_three
from contrastive.errors import ConfigError
from contrastive.evaluate import final_split
from contrastive.validate import validate


def test_no_test_fraction_keeps_the_two_way_split_of_recorded_runs():
    train, val, test = split_three(1000, 0.2, 0.0, seed=3)
    old_train, old_val = split_indices(1000, 0.2, seed=3)
    assert torch.equal(train, old_train) and torch.equal(val, old_val) and len(test) == 0


def test_three_splits_are_disjoint_seeded_and_keep_the_training_set():
    train, val, test = split_three(10_000, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (8000, 1000, 1000)
    assert len(torch.cat([train, val, test]).unique()) == 10_000
    # the CIFAR-10 CPU benchmark's choice: its 8,000 training images stay those of the two-way 8,000 / 2,000 split,
    # whose 2,000 held-out images become test + validation
    old_train, old_val = split_indices(10_000, 0.2, seed=0)
    assert torch.equal(train, old_train) and torch.equal(torch.cat([val, test]).sort().values, old_val)
    again = split_three(10_000, 0.1, 0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, (train, val, test)))
    assert not torch.equal(split_three(10_000, 0.1, 0.1, seed=1)[2], test)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_an_in_memory_pool_splits_three_ways(name):
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"name": name, "val_fraction": 0.2, "test_fraction": 0.25, "size": 200, "image_size": 8},
    )
    train, val, test = load_splits(cfg, with_test=True)
    n = len(train) + len(val) + len(test)
    assert (len(val), len(test)) == (round(n * 0.2), round(n * 0.25))
    assert len(load_splits(cfg)) == 2  # without with_test: (train, validation), as before
    assert load_splits(OmegaConf.merge(cfg, {"test_fraction": 0.0}), with_test=True)[2] is None


def test_a_set_with_its_own_held_out_set_takes_validation_from_its_training_set():
    from contrastive.data import datasets

    pair = datasets._split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100) % 10, _cfg(0.5))
    cfg = _cfg(0.2, test=0.1)
    train, val = datasets._carve_validation(pair[0], cfg)
    assert (len(train), len(val)) == (40, 10)
    assert not set(train.images.flatten().tolist()) & set(val.images.flatten().tolist())


def _cfg(val: float, test: float = 0.0):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"val_fraction": val, "test_fraction": test})


def test_the_test_split_is_served_only_when_asked_and_only_where_it_exists():
    dm = ContrastiveDataModule(make_cfg(["data.size=100", "data.test_fraction=0.2"]).data)
    assert dm.split_sizes() == {"train": 60, "validation": 20, "test": 20}
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [60, 20]  # the per-epoch monitor: validation
    assert len(dm.eval_loaders("test")[1].dataset) == 20
    two = ContrastiveDataModule(make_cfg(["data.size=100"]).data)
    with pytest.raises(DataError, match=r"no test split \(data\.test_fraction=0\.0\)"):
        two.eval_loaders("test")


def test_the_final_evaluation_reads_test_in_final_runs_and_validation_in_tuning():
    assert final_split(make_cfg(["data.test_fraction=0.2"])) == "test"
    assert final_split(make_cfg([])) == "validation"  # two splits: the held-out one is validation
    assert final_split(make_cfg(["data.test_fraction=0.2", "tuning=true"])) == "validation"
    assert final_split(make_cfg(["data.test_fraction=0.2", "eval.split=validation"])) == "validation"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.test_fraction=0.2", "tuning=true", "eval.split=test"],
            r"eval\.split=test in a tuning trial \(tuning=true\): tuning selects on the validation split and never "
            r"reads the test split",
        ),
        (["eval.split=test"], r"eval\.split=test but data\.test_fraction=0\.0 sets no test split aside"),
        (["eval.split=train"], r"eval\.split='train'; choose one of auto, validation, test"),
        (["data.test_fraction=-0.1"], r"data\.test_fraction=-0\.1 must be in \[0, 1\)"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], r"data\.val_fraction=0\.5 \+ data\.test_fraction=0\.5"),
    ],
)
def test_refused_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(overrides))


def test_the_tuning_experiments_protect_the_test_split():
    for experiment in ("tune_cifar10_cpu", "tune_digits"):
        for method in ("simclr", "memory_bank", "moco", "swav"):
            cfg = make_cfg([f"experiment={experiment}", f"+tune={method}"], fast=False)
            assert cfg.tuning and cfg.method.name == method and final_split(cfg) == "validation"
            assert cfg.data.test_fraction > 0  # the test split exists, and is set aside
    for experiment in ("confirm_cifar10_cpu", "confirm_digits"):  # the confirmation stage's runs, the same
        cfg = make_cfg([f"experiment={experiment}", "method=swav"], fast=False)
        assert cfg.tuning and final_split(cfg) == "validation" and cfg.data.test_fraction > 0
    confirm = make_cfg(["experiment=confirm_cifar10_cpu", "method=moco"], fast=False)
    compared = make_cfg(["experiment=compare_cifar10_cpu", "method=moco"], fast=False)
    # the full budget and the benchmark's settings: only the evaluation's split and extras differ
    assert confirm.trainer.max_epochs == compared.trainer.max_epochs and confirm.method == compared.method
    assert confirm.data == compared.data and confirm.optim == compared.optim
    cpu = make_cfg(["experiment=tune_cifar10_cpu", "+tune=moco"], fast=False)
    assert cpu.method.symmetric  # a trial starts from the benchmark's settings for the method
    compare = make_cfg(["experiment=compare_cifar10_cpu"], fast=False)
    assert not compare.tuning and final_split(compare) == "test"
