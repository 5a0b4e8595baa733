"""Training progress as plain log lines where no terminal shows rich's bar (SLURM logs, ``nohup``, CI).

Rich's live display prints nothing when stdout is not a terminal, so a cluster user tailing a log would see no
sign of life for hours; this callback logs ``step, epoch, losses, images/s, ETA`` every ``every_n_steps`` batches
or ``every_n_seconds``, whichever comes first, on rank 0. In a terminal it stays silent (the bar is there).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger("sdlight")


def _images(batch: Any) -> int:
    """The batch's number of samples: the length of its first tensor (0 when it has none)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    return next((int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.ndim > 0), 0)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgressLog(L.Callback):
    """Logs a progress line every ``every_n_steps`` training batches or ``every_n_seconds`` when stdout is not a
    terminal (``always``: in terminals too).

    Example: ``step 1200/5000 (24 %) epoch 3 | train/loss 0.0412 | 118.3 img/s | ETA 0:09:21``
    """

    def __init__(self, every_n_steps: int = 50, every_n_seconds: float = 60.0, always: bool = False):
        self.every_n_steps, self.every_n_seconds, self.always = every_n_steps, every_n_seconds, always
        self.enabled = False
        self._start = self._last = 0.0
        self._images = 0
        self._start_fraction = 0.0
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.enabled = trainer.is_global_zero and (self.always or not sys.stdout.isatty())
        self._start = self._last = time.monotonic()
        self._images, self._batches = 0, 0
        self._start_fraction = self.fraction(trainer)

    @staticmethod
    def fraction(trainer: L.Trainer) -> float:
        """How much of the run is done: by steps (``max_steps``) or by batches (``max_epochs``), the larger."""
        done = []
        if trainer.max_steps and trainer.max_steps > 0:
            done.append(trainer.global_step / trainer.max_steps)
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(per_epoch) and per_epoch > 0:
            batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
            done.append(batches / (trainer.max_epochs * per_epoch))
        return min(1.0, max(done, default=0.0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        self._images += _images(batch)
        self._batches += 1
        now = time.monotonic()
        if (self.every_n_steps and self._batches % self.every_n_steps == 0) or \
                (self.every_n_seconds and now - self._last >= self.every_n_seconds):
            self._last = now
            log.info(self.line(trainer, now))

    def line(self, trainer: L.Trainer, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        fraction = self.fraction(trainer)
        rate = (fraction - self._start_fraction) / elapsed
        eta = (1.0 - fraction) / rate if rate > 0 else float("inf")
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        parts = [f"step {trainer.global_step}{total} ({100 * fraction:.0f} %) epoch {trainer.current_epoch}"]
        losses = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if k.startswith("train/")}
        if losses:
            parts.append(" ".join(f"{k} {v:.4g}" for k, v in losses.items()))
        parts += [f"{self._images / elapsed:.1f} img/s", f"ETA {_duration(eta)}"]
        return " | ".join(parts)
