"""Loss spikes: after N non-finite steps in a row, roll the weights back to the last checkpoint and go on.

The stages skip a batch whose loss is not finite and raise after ``max_nonfinite_steps`` in a row; a long run
would rather go back to its last good weights. Only the weights, EMA and optimizer states come back: the data and
the random streams keep going forward, so the rolled-back run does not replay the batches that diverged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from sdlight.checkpoints import newest_checkpoint, read_checkpoint

log = logging.getLogger("sdlight")


class NonFiniteRollback(L.Callback):
    """Restores the newest readable checkpoint's weights and optimizer states after ``after_nonfinite`` non-finite
    steps in a row (None: never; it must be below the model's ``max_nonfinite_steps``, which stops the run), at
    most ``max_rollbacks`` times."""

    def __init__(self, after_nonfinite: int | None = None, max_rollbacks: int = 3):
        self.after_nonfinite, self.max_rollbacks = after_nonfinite, max_rollbacks
        self.rollbacks = 0
        self.last_finite_step: int | None = None  # checkpoints saved after it hold the weights that diverged

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        limit = getattr(getattr(pl_module, "guard", None), "max_in_a_row", None)
        if self.after_nonfinite and limit is not None and self.after_nonfinite >= limit:
            log.warning(f"callbacks.rollback.after_nonfinite={self.after_nonfinite} is not below the model's "
                        f"max_nonfinite_steps={limit}: the run stops before it could roll back")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        guard = getattr(pl_module, "guard", None)
        in_a_row = guard.in_a_row if guard is not None else 0
        if in_a_row == 0:
            self.last_finite_step = trainer.global_step
        if not self.after_nonfinite or in_a_row < self.after_nonfinite or self.rollbacks >= self.max_rollbacks:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir, "checkpoints")
        # the skipped steps still count as steps, and a checkpoint saved among them may hold diverged weights
        path, _ = newest_checkpoint(folder, max_step=self.last_finite_step)
        if path is None:
            if trainer.is_global_zero:
                log.warning(f"{in_a_row} non-finite steps in a row but no checkpoint in {folder} from before them "
                            "to roll back to")
            return
        ckpt = read_checkpoint(path)
        restore = getattr(trainer.strategy, "restore_weights", None)
        if restore is not None:  # sharded parameters (trainer=fsdp): each rank takes its shards of the whole tensors
            restore(ckpt)
        else:
            pl_module.load_state_dict(ckpt["state_dict"])
            for optimizer, state in zip(trainer.optimizers, ckpt.get("optimizer_states", [])):
                optimizer.load_state_dict(state)
        guard.in_a_row = 0
        self.rollbacks += 1
        if trainer.is_global_zero:
            log.warning(f"{in_a_row} non-finite steps in a row at step {trainer.global_step}: weights and optimizer "
                        f"rolled back to {path} (step {ckpt.get('global_step')}), data goes on "
                        f"(rollback {self.rollbacks} of at most {self.max_rollbacks})")
