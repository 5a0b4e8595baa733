"""The EMA of the latent diffusion stage: the warm-up decay, and putting its weights in the live modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from sdlight.stages.sharding import local, reshard


class WarmupEMA:
    """EMA update with decay min(decay, (1 + n) / (10 + n)) after n updates: a plain 0.9999 EMA would sit at the
    initial weights for thousands of steps, which short runs never leave. (The first update, n = 0, copies.)

    A class rather than a closure, so the module pickles (``ddp_spawn`` sends it to its processes).
    """

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # sharded (trainer=fsdp): each rank averages its own shard; whole buffers come in the same lists
        ema, current = local(ema), local(current)
        # AveragedModel groups tensors by dtype: integer buffers (attribute ids) arrive alone and are copied
        if not ema[0].is_floating_point():
            torch._foreach_copy_(ema, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(ema, current, 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))


class WeightSwap:
    """Other weights (the EMA's) held in ``live`` modules: ``begin`` copies them in and keeps the live ones, ``end``
    puts those back. One copy in and out for a whole validation epoch, or per call with :meth:`swapped`;
    :meth:`live` gives the live weights back inside a held block."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.backup: list[Tensor] | None = None
        self.live_modules: list[nn.Module] = []

    @property
    def active(self) -> bool:
        return self.backup is not None

    def begin(self, live: Iterable[nn.Module], other: Iterable[nn.Module]) -> None:
        live = list(live)
        reshard(live)  # sharded modules: the shards are what the next forward gathers
        self.live_modules = live
        self.tensors = [p for m in live for p in (*m.parameters(), *m.buffers())]
        self.backup = [p.detach().clone() for p in self.tensors]
        for p, q in zip(self.tensors, [q for m in other for q in (*m.parameters(), *m.buffers())]):
            p.data.copy_(q.data)

    def end(self) -> None:
        reshard(self.live_modules)
        if self.backup is not None:
            for p, b in zip(self.tensors, self.backup):
                p.data.copy_(b)
        self.tensors, self.backup, self.live_modules = [], None, []

    @contextlib.contextmanager
    def swapped(self, live: Iterable[nn.Module], other: Iterable[nn.Module]) -> Iterator[None]:
        """``other``'s weights in ``live`` for the block (nothing to do when already held)."""
        if self.active:
            yield
            return
        self.begin(live, other)
        try:
            yield
        finally:
            self.end()

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """The live weights back for the block (e.g. ``generate(use_ema=False)`` during validation)."""
        reshard(self.live_modules)
        held = [p.detach().clone() for p in self.tensors]
        for p, b in zip(self.tensors, self.backup or []):
            p.data.copy_(b)
        try:
            yield
        finally:
            reshard(self.live_modules)
            for p, h in zip(self.tensors, held):
                p.data.copy_(h)
