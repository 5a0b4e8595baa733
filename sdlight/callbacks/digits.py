"""Are generated digits the digits asked for? Scored by a classifier fitted only on the real scans.

The judge (:func:`sdlight.data.digit_oracle.fit_digit_judge`) is an RBF SVM on 8x8 ink levels, fitted in a few
seconds on scikit-learn's bundled digits, with no pretrained network: this runs offline and in CI.
"""

from __future__ import annotations

import lightning as L
import torch

from sdlight.callbacks.sampling import SampleEvaluationCallback, condition_keys
from sdlight.data.digit_oracle import DigitJudge, fit_digit_judge

NUM_CLASSES = 10


class DigitAccuracyCallback(SampleEvaluationCallback):
    """Logs ``val/digits/accuracy`` (samples the judge reads as the digit they were conditioned on), the same per
    digit as ``val/digits/accuracy_<d>``, and the judge's own accuracy on held-out real scans,
    ``val/digits/judge_accuracy`` (the ceiling of the first figure).

    Samples come from the val items' ``condition_keys`` entries (label, text or attributes); the truth is their
    ``truth_key`` entry (the digit).
    """

    def __init__(self, every_n_steps: int | None = 500, num_samples: int = 200, batch_size: int = 50,
                 steps: int | None = 50, guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                 at_train_end: bool = True, truth_key: str = "label", judge: DigitJudge | None = None) -> None:
        super().__init__(every_n_steps, num_samples, batch_size, steps, guidance_scale, seed, use_ema, at_train_end)
        self.truth_key = truth_key
        self.judge = judge

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not condition_keys(pl_module):
            raise ValueError("DigitAccuracyCallback needs a conditional module (it has no condition_keys)")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        conditions = self.conditions(trainer, list(dict.fromkeys([self.truth_key, *condition_keys(pl_module)])))
        # per digit: (right, asked)
        counts = torch.zeros(NUM_CLASSES, 2, dtype=torch.float64, device=pl_module.device)
        for chunk, images in self.generate(trainer, pl_module, conditions, "Digits: sampling"):
            truth = torch.as_tensor(chunk[self.truth_key]).long().flatten().cpu()
            if truth.numel() != images.shape[0] or truth.min() < 0 or truth.max() >= NUM_CLASSES:
                raise ValueError(f"{self.truth_key!r} must hold one digit 0-9 per sample, got {truth.tolist()[:8]}")
            if self.judge is None:  # fitted at the samples' size, on the same 8 -> N -> 8 round trip
                self.judge = fit_digit_judge(image_size=images.shape[-1])
            right = torch.from_numpy(self.judge.predict(images)).long() == truth
            counts[:, 0] += torch.bincount(truth[right], minlength=NUM_CLASSES).to(counts)
            counts[:, 1] += torch.bincount(truth, minlength=NUM_CLASSES).to(counts)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        counts = counts.cpu()
        out = {"val/digits/accuracy": float(counts[:, 0].sum() / counts[:, 1].sum().clamp_min(1)),
               "val/digits/judge_accuracy": self.judge.held_out_accuracy if self.judge else float("nan")}
        out.update({f"val/digits/accuracy_{d}": float(counts[d, 0] / counts[d, 1])
                    for d in range(NUM_CLASSES) if counts[d, 1] > 0})
        return out
