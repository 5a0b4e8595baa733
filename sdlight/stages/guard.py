"""The non-finite guard both stages share: a batch whose loss is not finite on any rank is skipped, counted and
logged; too many in a row stop the run with one line. Skipped steps change no weight and no EMA."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger("sdlight")


def all_finite(module: L.LightningModule, *values: Tensor) -> bool:
    """True when every value is finite on every rank (ranks must agree, or DDP's all-reduce would hang)."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().float()
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce(finite, reduce_op="min")
    return bool(finite > 0)


class NonFiniteGuard:
    """Counts the batches skipped for non-finite losses (``skips``, kept in checkpoints by the stages) and raises
    ``FloatingPointError`` after ``max_in_a_row`` of them in a row."""

    def __init__(self, max_in_a_row: int = 20):
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skips, self.in_a_row = 0, 0

    def check(self, module: L.LightningModule, *losses: Tensor, where: str = "",
              details: Callable[[], str] = lambda: "") -> bool:
        """Whether the step may go on: True for finite losses (on every rank); else counts the skip, warns, and
        raises once there were too many in a row (naming ``where`` and ``details()``)."""
        if all_finite(module, *losses):
            self.in_a_row = 0
            return True
        self.skips += 1
        self.in_a_row += 1
        if module.global_rank == 0:  # every rank skips it (the check is all-reduced); one says so
            log.warning(f"Non-finite loss at {where} ({self.in_a_row} in a row): step skipped")
        if self.in_a_row >= self.max_in_a_row:
            extra = details()
            raise FloatingPointError(f"{self.in_a_row} non-finite losses in a row (max_nonfinite_steps="
                                     f"{self.max_in_a_row}) at {where}{': ' + extra if extra else ''}. Lower the "
                                     "learning rate or check the data.")
        return False
