"""LightningDataModule over ``load_splits``: a shuffled training loader and the evaluation loaders (the training
split's features with those of validation, or of test where ``data.test_fraction`` sets one aside).

With ``data.on_device=true`` the training split lives on the training device as one uint8 tensor and each epoch is
a permutation drawn there and batched indexing (:class:`DeviceBatches`): no DataLoader, no host-to-device copy per
step. For in-memory sets that fit in accelerator memory (CIFAR-size and smaller: 50,000 x 3 x 32 x 32 is 147 MB).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from contrastive.data.datasets import DataError, ImageTensorDataset, collate, load_splits

SPLITS = ("train", "validation", "test")  # the names every figure's split is given by (metrics.json, the report)


class DeviceBatches:
    """Training batches ``[images, labels, index]`` gathered on ``device`` from a copy of the whole split kept
    there. Each epoch draws one permutation on the device from a generator seeded by (``seed``, epoch), alike on
    every process (``epoch``: a callable giving the Trainer's epoch; without one, the passes made so far), and each
    of the ``world`` processes takes every ``world``-th sample of it, as a distributed sampler does; the last
    incomplete batch is dropped, as the training DataLoader does."""

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        device: torch.device,
        seed: int,
        epoch: Any = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.seed, self.epoch, self.rank, self.world = batch_size, seed, epoch, rank, world
        self.epochs_started = 0

    def __len__(self) -> int:
        return len(self.images) // self.world // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.images), generator=gen, device=self.device)

    def __iter__(self):
        epoch = self.epochs_started if self.epoch is None else int(self.epoch())
        self.epochs_started += 1
        mine = self.permutation(epoch)[self.rank :: self.world]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = mine[start : start + self.batch_size]
            yield [self.images[index], self.labels[index], index]


class ContrastiveDataModule(L.LightningDataModule):
    """Batches of ``(uint8 images, labels, indices)``; ``val_dataloader`` gives ``[train split, validation split]``
    (dataloader_idx 0 = the kNN bank's features, 1 = its queries): the per-epoch monitor never reads the test
    split, which only :meth:`eval_loaders` with ``split="test"`` serves."""

    def __init__(self, data_cfg: Any, seed: int = 0) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed  # the on-device path's shuffling
        self.device = torch.device("cpu")  # the on-device path's device when no Trainer runs it
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None  # data.test_fraction > 0 only
        # set by the method for data.crops=full: wraps the training set so its items are views cut at full
        # resolution (contrastive.data.crops); evaluation and the bank's start read the plain set
        self.train_views: Any = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: downloads happen here, not once per rank
        if self.cfg.download and self.train_set is None:
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = load_splits(self.cfg, with_test=True)
            self.check_on_device()  # before any training

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.batch_size),
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        self.setup()
        if self.cfg.get("on_device", False):
            return self.device_batches()
        train = self.train_set if self.train_views is None else self.train_views(self.train_set)
        return self.loader(train, train=True)

    def check_on_device(self) -> None:
        if not self.cfg.get("on_device", False):
            return
        if (
            not isinstance(self.train_set, ImageTensorDataset)
            or self.train_views is not None
            or (self.cfg.get("crops", "stored") != "stored")
        ):
            raise DataError(
                f"data.on_device=true needs an in-memory data set with stored crops; data={self.cfg.name} "
                f"(data.crops={self.cfg.get('crops')}) reads or crops its images one by one: set "
                "data.on_device=false"
            )

    def device_batches(self) -> DeviceBatches:
        self.check_on_device()
        trainer = self.trainer
        if trainer is None:
            return DeviceBatches(self.train_set, int(self.cfg.batch_size), self.device, self.seed)
        return DeviceBatches(
            self.train_set,
            int(self.cfg.batch_size),
            trainer.strategy.root_device,
            self.seed,
            epoch=lambda: trainer.current_epoch,
            rank=trainer.global_rank,
            world=trainer.world_size,
        )

    def eval_loaders(self, split: str = "validation") -> tuple[DataLoader, DataLoader]:
        """(train split, ``split``) in order, without dropping a batch; usable outside the Trainer. ``split``:
        validation, or test where the data has one."""
        self.setup()
        if split not in SPLITS[1:]:
            raise ValueError(f"split={split!r}: choose validation or test")
        held_out = self.val_set if split == "validation" else self.test_set
        if held_out is None:
            raise DataError(
                f"data={self.cfg.name} has no test split (data.test_fraction={self.cfg.get('test_fraction', 0)}): "
                "set data.test_fraction > 0, or evaluate on validation"
            )
        return self.loader(self.train_set, train=False), self.loader(held_out, train=False)

    def split_sizes(self) -> dict[str, int]:
        """Images per split, as metrics.json records them (the test split only where there is one)."""
        self.setup()
        sets = zip(SPLITS, (self.train_set, self.val_set, self.test_set))
        return {name: len(dataset) for name, dataset in sets if dataset is not None}

    def val_dataloader(self) -> list[DataLoader]:
        return list(self.eval_loaders())

    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.train_set)

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)

    @property
    def channels(self) -> int:
        return int(self.cfg.channels)
