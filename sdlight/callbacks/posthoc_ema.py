"""Post-hoc EMA snapshots during training (EDM2): two power-function EMAs of the trainable parts, written every N
steps to ``<checkpoint dir>/posthoc_ema/``, from which ``python -m sdlight.posthoc_ema`` rebuilds the EMA of any
length after the run. Add it with ``'callbacks=[default,posthoc_ema]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdlight.checkpoints import ema_part_names
from sdlight.errors import UsageError
from sdlight.stages.posthoc_ema import SNAPSHOT_DIR, PowerEMA, save_snapshot

log = logging.getLogger("sdlight")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PostHocEMA(L.Callback):
    """Power-function EMAs of ``pl_module.trainable_parts`` for each of ``sigma_rels`` (EDM2's 0.05 and 0.10 by
    default), updated after every optimizer step, saved as ``sigma_rel_<s>_step_<n>.safetensors`` (CompVis key
    names, ``dtype``) every ``every_n_steps`` and at the end of training. The running EMAs travel in the
    checkpoint, so a resumed run continues them exactly."""

    def __init__(self, sigma_rels: tuple[float, ...] | list[float] = (0.05, 0.10), every_n_steps: int = 100,
                 dtype: str = "float32"):
        if every_n_steps < 1:
            raise UsageError(f"callbacks.posthoc_ema.every_n_steps must be >= 1, got {every_n_steps}")
        if dtype not in DTYPES:
            raise UsageError(f"callbacks.posthoc_ema.dtype={dtype!r}: one of {', '.join(DTYPES)}")
        try:
            self.ema = PowerEMA(list(sigma_rels))
        except ValueError as e:
            raise UsageError(f"callbacks.posthoc_ema.sigma_rels: {e}") from None
        self.every_n_steps, self.dtype = every_n_steps, DTYPES[dtype]
        self._tensors: dict[str, Tensor] | None = None
        self._trainer: L.Trainer | None = None
        self._pending: dict | None = None
        self._saved_step = -1

    @property
    def state_key(self) -> str:
        return "PostHocEMA"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(pl_module, "trainable_parts"):
            raise UsageError("callbacks.posthoc_ema applies to latent diffusion training (model=ldm), not to "
                             f"{type(pl_module).__name__}")

    def folder(self, trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        base = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(base) / SNAPSHOT_DIR

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = pl_module.trainable_parts.state_dict(keep_vars=True)  # the live tensors, updated in place
        names = ema_part_names(list(parts))
        self._tensors = {names[k]: v for k, v in parts.items()}
        self._trainer = trainer
        if self._pending is not None:
            try:
                self.ema.load_state_dict(self._pending)
            except ValueError as e:
                raise UsageError(str(e)) from None
            self.ema.averages = [{k: v.to(self._tensors[k].device) for k, v in a.items()} for a in self.ema.averages]
            self._saved_step, self._pending = self.ema.step, None
        log.info(f"post-hoc EMA: sigma_rel {', '.join(map(str, self.ema.sigma_rels))}, snapshots every "
                 f"{self.every_n_steps} steps in {self.folder(trainer)}")

    def _catch_up(self) -> None:
        """Updates the EMAs for the optimizer step just taken (once per step; before any checkpoint holds them)."""
        trainer = self._trainer
        if trainer is None or self._tensors is None or trainer.global_step <= self.ema.step:
            return
        step = trainer.global_step
        self.ema.update(self._tensors, step)
        if step % self.every_n_steps == 0:
            self._save(trainer, step)

    def _save(self, trainer: L.Trainer, step: int) -> None:
        if step != self._saved_step and trainer.is_global_zero:
            for sigma_rel, average in zip(self.ema.sigma_rels, self.ema.averages):
                save_snapshot(self.folder(trainer), sigma_rel, step, average, self.dtype)
        self._saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._catch_up()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up()
        if self.ema.averages:
            self._save(trainer, self.ema.step)  # the run's last step, where a rebuilt EMA usually ends

    def state_dict(self) -> dict[str, Any]:
        self._catch_up()  # a checkpoint callback that runs before this one's batch-end hook gets today's EMAs
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict
