import pytest
import torch

from sdlight.data.datamodules import DIGIT_WORDS, DigitsDataModule
from sdlight.errors import UsageError


def test_digits_splits_cover_the_real_dataset():
    dm = DigitsDataModule(batch_size=16, val_fraction=0.1, seed=0)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797  # scikit-learn's bundled digits
    assert len(dm.val_set) == 180
    train_imgs = {dm.train_set[i]["image"].numpy().tobytes() for i in range(len(dm.train_set))}
    assert sum(dm.val_set[i]["image"].numpy().tobytes() in train_imgs for i in range(len(dm.val_set))) < 5


def test_digits_batch_shape_and_captions():
    dm = DigitsDataModule(batch_size=16, image_size=32)
    batch = next(iter(dm.train_dataloader()))
    x = batch["image"]
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1])  # grey: the three channels agree
    for label, text in zip(batch["label"].tolist(), batch["text"]):
        assert text == f"a handwritten digit {DIGIT_WORDS[label]}"
    assert torch.equal(batch["attributes"][:, 0], batch["label"])
    # dark ink on a light page: the left and right borders are almost all page
    assert x[..., 0].mean() > 0.8 and x[..., -1].mean() > 0.8


def test_a_val_fraction_outside_zero_one_is_a_usage_error():
    with pytest.raises(UsageError, match=r"data.val_fraction=1.5: must be a number in \(0, 1\)"):
        DigitsDataModule(val_fraction=1.5)
