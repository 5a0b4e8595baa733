"""Random draws made where the generator lives, then moved: the one home of this rule.

A CPU ``torch.Generator`` cannot fill a CUDA tensor, and drawing on the CPU makes a seed give the same numbers
on any device (samples reproduce across machines); a CUDA generator draws on its own device.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def draw(fn: Callable[..., Tensor], *args, generator: torch.Generator | None = None,
         device: torch.device | str | None = None, **kwargs) -> Tensor:
    """``fn(*args, generator=generator, **kwargs)`` (``torch.randn``, ``rand``, ``randint`` ...) made on the
    generator's device (else on ``device``), then moved to ``device`` when one is given."""
    where = generator.device if generator is not None else device
    out = fn(*args, generator=generator, device=where, **kwargs)
    return out if device is None else out.to(device)


class Draws:
    """The random numbers of a training step, from one place: ``generator`` (the global RNG when None), each draw
    made where the generator lives and moved to ``device``.

    Every random choice of a training sample (its posterior sample, noise level, noise, condition dropout,
    inpainting mask, low-resolution noise) is drawn through these methods, with the batch as the first dimension,
    so that the way a step's randomness is keyed can change in this one class.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def normal(self, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        return draw(torch.randn, shape, generator=self.generator, device=device, **({"dtype": dtype} if dtype else {}))

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        return draw(torch.rand, shape, generator=self.generator, device=device)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        return draw(torch.randint, 0, high, shape, generator=self.generator, device=device)


def as_draws(source: "Draws | torch.Generator | None") -> Draws:
    """``source`` as :class:`Draws`: a generator (or None, the global RNG) is wrapped."""
    return source if isinstance(source, Draws) else Draws(source)
