"""An independent judge of generated digits: a classifier fitted only on scikit-learn's real handwritten digits.

Samples of a digits model are 32 px renderings of 8x8 scans (:class:`sdlight.data.datamodules.DigitsDataModule`).
The judge averages them back to 8x8 ink levels (0..16, the scans' scale) and classifies them with an RBF support
vector machine, the classic scikit-learn digits model. It is fitted on the real scans after the same 8 → N → 8
round trip the samples make, so that resizing alone costs it nothing; its accuracy on held-out real scans is
reported with every score, since a judge is only as good as that figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SCAN_SIZE = 8


def ink_features(images: Tensor) -> np.ndarray:
    """Images ``(B, C, H, W)`` in [-1, 1] (paper white, ink dark) → ``(B, 64)`` ink levels 0..16 on the 8x8 grid."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    gray = images.detach().float().cpu().mean(dim=1, keepdim=True)
    ink = ((1.0 - gray) / 2).clamp(0, 1)
    return (F.adaptive_avg_pool2d(ink, SCAN_SIZE) * 16).flatten(1).numpy()


def render_scans(scans: np.ndarray, image_size: int) -> Tensor:
    """8x8 scans (0..16, ink high; ``(B, 8, 8)`` or ``(B, 64)``) → ``(B, 3, N, N)`` RGB images in [-1, 1]: resized
    bilinearly, paper white (1) and ink dark, as the digits datamodule serves them."""
    x = torch.from_numpy(scans.astype(np.float32) / 16.0).reshape(-1, 1, SCAN_SIZE, SCAN_SIZE)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((1.0 - x.clamp(0, 1)) * 2 - 1).expand(-1, 3, -1, -1).contiguous()


@dataclass
class DigitJudge:
    """A fitted classifier and its accuracy on real scans it never saw."""

    classifier: object
    held_out_accuracy: float
    held_out_size: int

    def predict(self, images: Tensor) -> np.ndarray:
        """Predicted digit (0-9) of each image ``(B, C, H, W)`` in [-1, 1]."""
        return self.classifier.predict(ink_features(images))


def fit_digit_judge(image_size: int = 32, held_out: float = 0.25, seed: int = 0) -> DigitJudge:
    """Fits the judge on ``1 - held_out`` of the 1,797 real digits (stratified, seeded) and scores it on the rest."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    features = ink_features(render_scans(digits.data, image_size))
    x_fit, x_test, y_fit, y_test = train_test_split(features, digits.target, test_size=held_out,
                                                    stratify=digits.target, random_state=seed)
    # gamma / C: the values scikit-learn's own digits examples use on the 0..16 scale
    classifier = SVC(gamma=0.001, C=10.0).fit(x_fit, y_fit)
    accuracy = float((classifier.predict(x_test) == y_test).mean())
    return DigitJudge(classifier, accuracy, len(y_test))
