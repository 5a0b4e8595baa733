"""Frozen parts inside a trained module (a stage-1 VAE, a pretrained text tower): in eval mode on purpose."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn


def silence_eval_mode_warning(module: nn.Module, frozen_roots: Sequence[nn.Module]) -> None:
    """Lightning warns about every eval-mode module when training starts; silence exactly the count of the frozen
    parts' modules, so that any other module left in eval mode still warns."""
    frozen = {id(m) for root in frozen_roots for m in root.modules()}
    in_eval = [m for m in module.modules() if not m.training]
    if in_eval and all(id(m) in frozen for m in in_eval):
        warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start",
                                category=PossibleUserWarning)
