"""The interface every condition encoder implements.

An encoder reads one entry of the batch (``batch[encoder.input_key]``) and turns it into an embedding that goes
to the UNet by its ``route`` (see :class:`sdlight.conditioning.Conditioner`): the cross-attention context
``(B, L, D)``, a vector ``(B, D)`` for the UNet's ``y``, or channels ``(B, C, h, w)``. Classifier-free guidance
needs an *explicit* null condition that goes through the same network (empty caption, null class row, null
attribute rows), so each encoder says what its null value is (``null_like``) and how to swap it in at random
during training (``drop``, with probability ``drop_rate``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.diffusion.draw import Draws, as_draws


ROUTES = ("crossattn", "vector", "concat")


class ConditionEncoder(nn.Module, ABC):
    """Maps ``batch[input_key]`` to an embedding for its ``route``, or ``None`` when unconditional.

    ``input_key`` and ``route`` have per-class defaults that the keyword options override; ``drop_rate`` None
    means the training module's default rate (``p_uncond``), 0 that the condition is never dropped, so both
    guidance branches see it (as SD-XL's size conditioning).
    """

    input_key: str | None = None  # the batch entry read; None reads nothing
    route: str = "crossattn"
    drop_rate: float | None = None
    context_dim: int | None = None
    default: Any = None  # one sample's value where a batch or a request has none (None: it must be given)

    def __init__(self, *, input_key: str | None = None, drop_rate: float | None = None,
                 route: str | None = None) -> None:
        super().__init__()
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if drop_rate is not None and not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1] or None, got {drop_rate}")
        # instance values only where given: the class defaults stay readable on the class
        for name, value in (("input_key", input_key), ("drop_rate", drop_rate), ("route", route)):
            if value is not None:
                setattr(self, name, value)

    @property
    def routes(self) -> tuple[str, ...]:
        """Where the outputs go: ``(route,)``; an encoder with several outputs (SD-XL's text towers: tokens and a
        pooled vector) names each, and its ``forward`` returns ``{route: tensor}``."""
        return (self.route,)

    def describe(self) -> str:
        """What this encoder reads, in words (for messages)."""
        return str(self.input_key)

    def check(self, values: Sequence[Any]) -> None:
        """Raises a one-line ``ValueError`` when plain values (lists, not tensors) are not of the kind and range
        this encoder reads; the message starts with the offending value."""

    def prepare(self, values: Any, device: torch.device | str | None = None) -> Any:
        """``values`` as ``forward`` reads them: here a tensor on ``device`` (lists of numbers are accepted)."""
        return torch.as_tensor(values, device=device)

    @abstractmethod
    def forward(self, values: Any) -> Tensor | dict[str, Tensor] | None:
        """Encode ``values`` (one batch entry) for its route (``{route: tensor}`` for several `routes`)."""

    @abstractmethod
    def null_like(self, values: Any) -> Any:
        """The null condition with the same type and shape as ``values``."""

    def drop(self, values: Any, p: float, draws: Draws | torch.Generator | None = None) -> Any:
        """Replace each sample's value by the null one with probability ``p`` (classifier-free guidance training).

        Works for tensors (the first dimension is the batch) and for sequences of strings. ``p == 0`` returns
        ``values`` itself and draws no random numbers, so switching dropout off leaves every RNG stream untouched.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        if values is None or p == 0.0:
            return values
        dropped = drop_mask(len(values), p, draws)
        null = self.null_like(values)
        if isinstance(values, Tensor):
            dropped = dropped.to(values.device).view(-1, *([1] * (values.ndim - 1)))
            return torch.where(dropped, null, values)
        return [n if d else v for v, n, d in zip(values, null, dropped.tolist())]


def drop_mask(n: int, p: float, draws: Draws | torch.Generator | None = None) -> Tensor:
    """Boolean ``(n,)`` mask, each entry True with probability ``p``; drawn on the generator's device."""
    # rand is in [0, 1): p = 1 drops everything, p = 0 nothing
    return as_draws(draws).uniform((n,)) < p


def as_text_list(values: str | Sequence[str]) -> list[str]:
    """Accept one caption or a batch of them; the batch collate gives lists, tuples also occur."""
    if isinstance(values, str):
        return [values]
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected captions as strings, got {[type(v).__name__ for v in values][:4]}")
    return list(values)
