"""The digits judge and DigitAccuracyCallback: the judge reads real scans right (held out), the callback scores
renderings of the asked digit near 1 and renderings of another digit near 0, per digit."""

import lightning as L
import numpy as np
import pytest
import torch

from sdlight.callbacks.digits import DigitAccuracyCallback
from sdlight.data.datamodules import DigitsDataModule
from sdlight.data.digit_oracle import fit_digit_judge, ink_features, render_scans


@pytest.fixture(scope="module")
def judge():
    return fit_digit_judge(image_size=32)


def test_judge_reads_held_out_real_digits(judge):
    assert judge.held_out_size == 450 and judge.held_out_accuracy >= 0.97


def test_ink_features_invert_the_rendering():
    scans = np.random.default_rng(0).integers(0, 17, size=(3, 64)).astype(np.float64)
    # a rendering at the scan's own size is the identity on ink levels
    assert np.allclose(ink_features(render_scans(scans, 8)), scans, atol=1e-5)
    blank = torch.ones(2, 3, 32, 32)  # white paper: no ink
    assert np.all(ink_features(blank) == 0)


class DigitRenderingTestModule(L.LightningModule):
    """Test double of a class-conditional model: draws a real scan of digit ``(label + shift) % 10``."""

    def __init__(self, shift=0):
        super().__init__()
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.scans = {d: digits.data[digits.target == d][-5:] for d in range(10)}
        self.condition_keys, self.shift = ["label"], shift
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 2)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        picks = [self.scans[(int(y) + self.shift) % 10][i % 5] for i, y in enumerate(conditions["label"])]
        return render_scans(np.stack(picks), 32)


def scores(module, judge, num_samples=60):
    data = DigitsDataModule(image_size=32, batch_size=16)
    callback = DigitAccuracyCallback(every_n_steps=None, num_samples=num_samples, batch_size=25, judge=judge)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/digits/")}


def test_the_asked_digit_scores_near_one_another_digit_zero(judge):
    right = scores(DigitRenderingTestModule(), judge)
    assert right["val/digits/accuracy"] >= 0.95
    assert right["val/digits/judge_accuracy"] == pytest.approx(judge.held_out_accuracy)  # logged as float32
    assert len([k for k in right if "accuracy_" in k]) >= 8  # per digit, for the digits among the 60 val items
    wrong = scores(DigitRenderingTestModule(shift=3), judge)
    assert wrong["val/digits/accuracy"] <= 0.05
    assert all(wrong[k] <= 0.2 for k in wrong if "accuracy_" in k)
