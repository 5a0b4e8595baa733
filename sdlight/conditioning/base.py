"""The interface every condition encoder implements.

An encoder reads one entry of the batch (``batch[encoder.batch_key]``) and turns it into the cross-attention
context ``(B, L, D)`` of the UNet. Classifier-free guidance needs an *explicit* null condition that goes through
the same network (empty caption, null class row, null attribute rows), so each encoder says what its null value
is (``null_like``) and how to swap it in at random during training (``drop``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.diffusion.draw import draw


class ConditionEncoder(nn.Module, ABC):
    """Maps ``batch[batch_key]`` to a context tensor ``(B, L, context_dim)``, or ``None`` when unconditional."""

    batch_key: str | None = None  # "text" | "label" | "attributes" | None
    context_dim: int | None = None

    @abstractmethod
    def forward(self, values: Any) -> Tensor | None:
        """Encode ``values`` (one batch entry) into the context ``(B, L, D)``."""

    @abstractmethod
    def null_like(self, values: Any) -> Any:
        """The null condition with the same type and shape as ``values``."""

    def drop(self, values: Any, p: float, generator: torch.Generator | None = None) -> Any:
        """Replace each sample's value by the null one with probability ``p`` (classifier-free guidance training).

        Works for tensors (the first dimension is the batch) and for sequences of strings. ``p == 0`` returns
        ``values`` itself and draws no random numbers, so switching dropout off leaves every RNG stream untouched.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        if values is None or p == 0.0:
            return values
        dropped = drop_mask(len(values), p, generator)
        null = self.null_like(values)
        if isinstance(values, Tensor):
            dropped = dropped.to(values.device).view(-1, *([1] * (values.ndim - 1)))
            return torch.where(dropped, null, values)
        return [n if d else v for v, n, d in zip(values, null, dropped.tolist())]


def drop_mask(n: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Boolean ``(n,)`` mask, each entry True with probability ``p``; drawn on the generator's device."""
    # rand is in [0, 1): p = 1 drops everything, p = 0 nothing
    return draw(torch.rand, n, generator=generator) < p


def as_text_list(values: str | Sequence[str]) -> list[str]:
    """Accept one caption or a batch of them; the batch collate gives lists, tuples also occur."""
    if isinstance(values, str):
        return [values]
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected captions as strings, got {[type(v).__name__ for v in values][:4]}")
    return list(values)
