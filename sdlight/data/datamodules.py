"""The embedded datasets as LightningDataModules: ``data=shapes`` and ``data=digits`` (no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from sdlight.data.base import ImageDataModule, check_count
from sdlight.data.digit_oracle import render_scans
from sdlight.data.shapes import NUM_CLASSES, ShapesDataset, attribute_vocab_sizes
from sdlight.errors import UsageError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ShapesDataModule(ImageDataModule):
    """Seeded procedural shapes with captions, class labels (shape × colour) and attribute sets."""

    num_classes = NUM_CLASSES

    def __init__(self, train_size: int = 20000, val_size: int = 512, max_shapes: int = 1, seed: int = 0, **kwargs):
        super().__init__(train_size=train_size, val_size=val_size, **kwargs)
        check_count("train_size", train_size, 1)  # generated: a number is needed
        check_count("val_size", val_size, 0)
        self.max_shapes, self.seed = max_shapes, seed

    @property
    def attribute_vocab_sizes(self) -> list[int]:
        return attribute_vocab_sizes(self.max_shapes)

    def build(self, split: str) -> Dataset:
        length = self.train_size if split == "train" else self.val_size
        return ShapesDataset(split, length, self.image_size, self.max_shapes, self.seed)


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images), resized, as RGB in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.images[index], "text": f"a handwritten digit {DIGIT_WORDS[label]}",
                "label": label, "attributes": torch.tensor([label])}


class DigitsDataModule(ImageDataModule):
    """Handwritten digits with class labels and captions; a seeded random val split."""

    num_classes = 10
    attribute_vocab_sizes = [10]

    def __init__(self, val_fraction: float = 0.1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise UsageError(f"data.val_fraction={val_fraction}: must be a number in (0, 1)")
        self.val_fraction, self.seed = val_fraction, seed

    def build(self, split: str) -> Dataset:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        digits = load_digits()
        x = render_scans(digits.images, self.image_size)
        y = torch.from_numpy(digits.target.astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(y) * self.val_fraction))
        idx = order[:n_val] if split == "val" else order[n_val:]
        return DigitsDataset(x[idx], y[idx])
