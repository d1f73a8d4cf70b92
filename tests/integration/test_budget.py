"""Equal-step sweeps: every point of experiment=negatives_sweep_steps (and of the study's Figure 3 on CIFAR-10) takes
the same number of optimiser steps, whatever its batch, and its schedule spans exactly those steps with the warm-up
still counted in epochs."""

from __future__ import annotations

import json

import pytest
from conftest import build, fit, make_cfg

from contrastive.train import train
from contrastive.validate import validate

POINTS = ["e2e_32", "e2e_128", "e2e_512", "bank_64", "bank_4096", "moco_64", "moco_4096"]


@pytest.mark.parametrize("point", POINTS)
def test_every_point_of_the_equal_step_sweep_schedules_the_same_steps(point):
    cfg = make_cfg(["experiment=negatives_sweep_steps", f"+experiment/nsweep={point}"], fast=False)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (1250, -1)
    equal_epochs = make_cfg(["experiment=negatives_sweep", f"+experiment/nsweep={point}"], fast=False)
    assert equal_epochs.trainer.max_epochs == 20 and equal_epochs.trainer.max_steps == -1


CIFAR_POINTS = [
    "e2e_16",
    "e2e_64",
    "e2e_256",
    "bank_1",
    "bank_64",
    "bank_512",
    "bank_4096",
    "moco_64",
    "moco_512",
    "moco_4096",
]


@pytest.mark.parametrize("point", CIFAR_POINTS)
def test_every_point_of_the_studys_figure_3_takes_500_steps_at_equal_steps(point):
    """`make study` trains e2e_16 and e2e_256 under experiment=negatives_sweep_cifar10_steps and takes the batch-64
    points from the equal-epoch sweep: both ways, 500 steps."""
    train_images = 8_000  # the CIFAR-10 split: 10,000 x (1 - data.val_fraction - data.test_fraction)
    epochs = make_cfg(["experiment=negatives_sweep_cifar10", f"+experiment/nsweep_cifar10={point}"], fast=False)
    assert round(10_000 * (1 - epochs.data.val_fraction - epochs.data.test_fraction)) == train_images
    validate(epochs)  # e.g. MoCo's queue a multiple of the batch
    steps_per_epoch = train_images // epochs.data.batch_size
    if point.startswith("e2e") and point != "e2e_64":
        steps = make_cfg(
            ["experiment=negatives_sweep_cifar10_steps", f"+experiment/nsweep_cifar10={point}"], fast=False
        )
        assert (steps.trainer.max_steps, steps.trainer.max_epochs) == (500, -1)
        assert steps.data.batch_size == epochs.data.batch_size != 64
    else:
        assert epochs.data.batch_size == 64 and epochs.trainer.max_steps == -1
        assert steps_per_epoch * epochs.trainer.max_epochs == 500


@pytest.mark.parametrize("batch", [16, 64])
def test_a_step_budget_trains_that_many_steps_with_the_warmup_in_epochs(tmp_path, batch):
    from lightning.pytorch.callbacks import Callback

    steps = 7
    overrides = [
        f"data.batch_size={batch}",
        "trainer.max_epochs=-1",
        f"trainer.max_steps={steps}",
        "optim.warmup_epochs=1",
        "eval.init=false",
        "eval.pixels=false",
        "eval.final=false",
    ]
    train(make_cfg(overrides, tmp_path=tmp_path))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["global_steps"] == steps
    if batch == 64:  # 3 steps an epoch: the budget ends 1 step into the third; the last whole epoch's figures stay
        assert summary["negatives_per_query"] == 2 * 64 - 2 and summary["linear_acc"] is not None

    class LearningRates(Callback):
        def __init__(self):
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer, *args):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model, dm = build(make_cfg(overrides))
    per_epoch = len(dm.train_dataloader())
    assert per_epoch == 205 // batch  # 205 of the 256 synthetic images train, last partial batch dropped
    record = LearningRates()
    fit(model, dm, [record], max_epochs=-1, max_steps=steps)
    lrs = record.lrs
    assert len(lrs) == steps
    # the warm-up lasts one real epoch (per_epoch steps), then the cosine decays to the end of the step budget
    # (the rate reaches its peak at the warm-up's last step, per_epoch - 1)
    rising = lrs[: min(per_epoch, steps)]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    if per_epoch < steps:
        assert lrs.index(max(lrs)) == per_epoch - 1 and lrs[-1] < max(lrs)


def test_the_progress_bar_counts_steps_under_a_step_budget():
    """Lightning's bar reads "Epoch 3/-2" when max_epochs is -1; ours names the step budget."""
    from types import SimpleNamespace

    from contrastive.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=500)
    assert bar._get_train_description(3).strip() == "Epoch 3 of a 500-step budget"
    bar._trainer = SimpleNamespace(max_epochs=4, max_steps=-1)
    assert bar._get_train_description(3).strip() == "Epoch 3/3"
