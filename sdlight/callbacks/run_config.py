"""Stores the run's resolved config (a plain dict) in every checkpoint, so checkpoints describe themselves."""

from __future__ import annotations

from typing import Any

import lightning as L


class RunConfigInCheckpoint(L.Callback):
    """Adds ``checkpoint["sdlight"] = {"config": <resolved config>, "version": ...}`` on save.

    The sample, evaluate and export entry points rebuild models from it; the config is plain Python containers
    (no OmegaConf objects) so checkpoints load with ``torch.load(weights_only=True)``.
    """

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from sdlight import __version__

        checkpoint["sdlight"] = {"config": self.config, "version": __version__}
