"""The LightningDataModule shared by the embedded datasets: loaders, workers, and the one batch shape."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset


class ImageDataModule(L.LightningDataModule):
    """Wraps a train and a val dataset whose items are ``{image, text, label, attributes}`` dicts.

    Subclasses implement ``build(split) -> Dataset``; everything about loading lives here.
    """

    def __init__(self, batch_size: int = 32, num_workers: int = 0, image_size: int = 32,
                 pin_memory: bool = False, persistent_workers: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train" or "val"); each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} must define build(split)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build("train"), self.build("val")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                          drop_last=shuffle and len(dataset) >= self.batch_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
