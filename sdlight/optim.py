"""Learning-rate schedules as plain torch ``LambdaLR``s, stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """The factor of step ``n``: linear from ``1/warmup_steps`` to 1 over the warm-up, then half a cosine from 1 to
    ``final_factor`` at ``total_steps``, held there after. A run no longer than its warm-up (a ``fast_dev_run``, a
    smoke test) only warms up. A class rather than a closure, so it pickles."""

    def __init__(self, warmup_steps: int, total_steps: int, final_factor: float = 0.0):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
        self.warmup_steps, self.total_steps, self.final_factor = warmup_steps, total_steps, final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                  final_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``final_factor`` times the base LR (SGDR without restarts; the decay
    most diffusion trainers use for short runs). ``total_steps=None`` is filled in by the stage modules with the
    run's optimizer steps (``trainer.estimated_stepping_batches``)."""
    if total_steps is None:
        raise ValueError("warmup_cosine needs total_steps (the stage modules fill it in from the trainer)")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, final_factor))
