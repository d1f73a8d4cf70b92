"""``data.on_device=true``: the training split kept on the device, each epoch a permutation drawn there and batched
indexing, no DataLoader (``contrastive.data.datamodule.DeviceBatches``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg
from lightning.pytorch.callbacks import Callback

from contrastive.data.datamodule import DeviceBatches
from contrastive.data.datasets import DataError, ImageTensorDataset
from contrastive.train import train


def dataset(n: int = 50) -> ImageTensorDataset:
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageTensorDataset(images, torch.arange(n) % 7)


def epoch_batches(batches: DeviceBatches) -> list[list[torch.Tensor]]:
    return list(batches)


def watch_trainer(monkeypatch, watch) -> None:
    """Every Trainer the run builds gets ``watch`` among its callbacks."""
    import lightning

    real_trainer = lightning.Trainer
    monkeypatch.setattr(
        lightning, "Trainer", lambda *a, callbacks=(), **k: real_trainer(*a, callbacks=[*callbacks, watch], **k)
    )


def test_an_epoch_is_a_permutation_in_full_batches_of_the_stored_images():
    data = dataset(50)
    epoch = [0]
    batches = DeviceBatches(data, 8, torch.device("cpu"), seed=3, epoch=lambda: epoch[0])
    assert len(batches) == 6  # 50 // 8: the last incomplete batch is dropped
    first = epoch_batches(batches)
    assert len(first) == 6 and all(len(index) == 8 for _, _, index in first)
    index = torch.cat([i for _, _, i in first])
    assert len(set(index.tolist())) == 48  # no sample twice in an epoch
    for images, labels, i in first:
        assert torch.equal(images, data.images[i]) and torch.equal(labels, data.labels[i])
        assert images.dtype == torch.uint8 and i.dtype == torch.int64
    again = torch.cat([i for _, _, i in epoch_batches(batches)])
    assert torch.equal(again, index)  # same seed and epoch: the same order (a resumed epoch replays it)
    epoch[0] = 1
    assert not torch.equal(torch.cat([i for _, _, i in epoch_batches(batches)]), index)  # a new order each epoch
    other_seed = DeviceBatches(data, 8, torch.device("cpu"), seed=4)
    assert not torch.equal(torch.cat([i for _, _, i in epoch_batches(other_seed)]), index)
    # without a Trainer's epoch, each pass is the next epoch
    alone = DeviceBatches(data, 8, torch.device("cpu"), seed=3)
    passes = [torch.cat([i for _, _, i in epoch_batches(alone)]) for _ in range(2)]
    assert torch.equal(passes[0], index) and not torch.equal(passes[1], index)


def test_processes_take_disjoint_equal_shards_of_one_shared_permutation():
    data = dataset(50)
    shards = [DeviceBatches(data, 4, torch.device("cpu"), seed=1, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in shards] == [6, 6]  # 25 samples each: 6 full batches of 4
    taken = [torch.cat([i for _, _, i in epoch_batches(s)]) for s in shards]
    assert not set(taken[0].tolist()) & set(taken[1].tolist())
    perm = shards[0].permutation(0)
    assert torch.equal(taken[0], perm[0::2][:24]) and torch.equal(taken[1], perm[1::2][:24])


def test_a_set_that_is_not_in_memory_is_refused_before_training(tmp_path, monkeypatch):
    import contrastive.data.datamodule as datamodule

    real = datamodule.load_splits
    # as a lazily decoded folder would be: a data set that is not one uint8 tensor
    monkeypatch.setattr(
        datamodule,
        "load_splits",
        lambda cfg, **kw: tuple(d if d is None else torch.utils.data.Subset(d, range(len(d))) for d in real(cfg, **kw)),
    )
    fitted = []
    monkeypatch.setattr("lightning.Trainer.fit", lambda *a, **k: fitted.append(1))
    with pytest.raises(DataError, match="data.on_device=true .* set data.on_device=false"):
        train(make_cfg(["data.on_device=true", "eval.init=false", "eval.pixels=false"], tmp_path=tmp_path))
    assert not fitted


class BatchWatch(Callback):
    def __init__(self) -> None:
        self.loaders: list[object] = []
        self.devices: list[torch.device] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.loaders.append(trainer.train_dataloader)
        self.devices.append(batch[0].device)


@pytest.mark.parametrize("on_device", [True, False])
def test_training_reads_its_batches_from_the_device_copy(tmp_path, monkeypatch, on_device):
    """The path is used by ``train``: the Trainer's training loader is a ``DeviceBatches`` (no DataLoader), every
    epoch iterated it once, and the batches are on the model's device."""

    watch = BatchWatch()
    made = []
    real_init = DeviceBatches.__init__

    def spying_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DeviceBatches, "__init__", spying_init)
    watch_trainer(monkeypatch, watch)
    cfg = make_cfg(
        [
            "data.size=128",
            "data.batch_size=16",
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=1",
            "eval.final=false",
            "eval.init=false",
            "eval.pixels=false",
            f"data.on_device={on_device}",
        ],
        tmp_path=tmp_path,
    )
    metrics = train(cfg)
    assert metrics["global_steps"] == 2 * (102 // 16)  # 102 training images, full batches, two epochs
    loaders = {type(loader).__name__ for loader in watch.loaders}
    assert loaders == ({"DeviceBatches"} if on_device else {"DataLoader"})
    if on_device:
        assert len(made) == 1 and made[0].epochs_started == 2
        assert made[0].seed == cfg.seed
    assert set(watch.devices) == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_split_and_the_batches_live_there(tmp_path, monkeypatch):
    watch = BatchWatch()

    watch_trainer(monkeypatch, watch)
    cfg = make_cfg(
        [
            "data.size=128",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "trainer.accelerator=gpu",
            "eval.final=false",
            "eval.init=false",
            "eval.pixels=false",
            "data.on_device=true",
        ],
        tmp_path=tmp_path,
    )
    train(cfg)
    assert watch.loaders and all(loader.images.device.type == "cuda" for loader in watch.loaders)
    assert {d.type for d in watch.devices} == {"cuda"}
