"""LightningDataModule over ``load_splits``: a shuffled training loader and the two evaluation loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from contrastive.data.datasets import collate, load_splits


class ContrastiveDataModule(L.LightningDataModule):
    """Batches of ``(uint8 images, labels, indices)``; ``val_dataloader`` gives ``[train split, val split]``
    (dataloader_idx 0 = the kNN bank's features, 1 = its queries)."""

    def __init__(self, data_cfg: Any) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: downloads happen here, not once per rank
        if self.cfg.download and self.train_set is None:
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = load_splits(self.cfg)

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(
            dataset, batch_size=int(self.cfg.batch_size), shuffle=train, drop_last=train, num_workers=workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.train_set, train=True)

    def eval_loaders(self) -> tuple[DataLoader, DataLoader]:
        """(train split, val split) in order, without dropping a batch; usable outside the Trainer."""
        self.setup()
        return self.loader(self.train_set, train=False), self.loader(self.val_set, train=False)

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
