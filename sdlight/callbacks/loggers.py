"""Lightning's loggers with the fixes sdlight needs."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` minus the ``anonymous`` argument it always hands to ``wandb.init``: W&B
    deprecated the setting and warns at every run when it is passed at all, even as None."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
