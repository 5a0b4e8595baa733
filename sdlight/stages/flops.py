"""Training FLOPs per batch for Lightning's ``ThroughputMonitor`` (FLOPs/s and MFU)."""

from __future__ import annotations

from typing import Any

from torch import nn


class TrainingFlops:
    """The watched network's forward FLOPs on its first call while its owner trains, counted by
    ``torch.utils.flop_counter``, times 3 for forward + backward (``value``; None until then). Only the trained
    network is watched: frozen parts (the VAE encoder, a pretrained text tower) and the GAN's discriminator are
    not counted. Hooks are bound methods, so the stage still pickles (``ddp_spawn``)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self._owner: nn.Module | None = None
        self._counter: Any = None
        self._handles: list[Any] = []

    def watch(self, module: nn.Module, owner: nn.Module) -> None:
        """Counts ``module``'s first forward while ``owner`` is in training mode."""
        self._owner = owner
        self._handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, module: nn.Module, args: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        if self.value is None and self._owner is not None and self._owner.training and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def _stop(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.value = 3 * self._counter.get_total_flops()
            self._counter = None
            for handle in self._handles:
                handle.remove()
