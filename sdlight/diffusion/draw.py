"""Random draws made where the generator lives, then moved: the one home of this rule.

A CPU ``torch.Generator`` cannot fill a CUDA tensor, and drawing on the CPU makes a seed give the same numbers
on any device (samples reproduce across machines); a CUDA generator draws on its own device. A training step's
draws can also be keyed by sample (`KeyedDraws`): then they do not depend on which process, or how many, ran it.
"""

from collections.abc import Callable, Sequence

import numpy as np
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
    inpainting mask, low-resolution noise, the image tokens a patch-masked backbone keeps) is drawn through these
    methods, with the batch as the first dimension, so that the way a step's randomness is keyed can change in this
    one class.
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


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed from integer ``keys`` (numpy's SeedSequence mixes them, so neighbouring keys differ)."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class KeyedDraws(Draws):
    """The draws of a training step keyed by (``seed``, ``step``, each row's global sample ``indices``): row i of
    every draw comes from a CPU generator of its own, seeded by those keys, the rows' successive draws continuing
    one stream per row. A sample gets the same numbers whichever rank holds it and however many there are (and on
    a resumed run), which a per-rank generator cannot give. Every draw has the batch as its first dimension."""

    def __init__(self, seed: int, step: int, indices: Sequence[int] | Tensor):
        super().__init__(None)
        rows = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        self.rows = [torch.Generator().manual_seed(mixed_seed(seed, step, i)) for i in rows]

    def _rows(self, fn: Callable[..., Tensor], shape: tuple[int, ...], device: torch.device | str | None,
              *args, **kwargs) -> Tensor:
        if not shape or shape[0] != len(self.rows):
            raise ValueError(f"a keyed draw of shape {tuple(shape)} for a batch of {len(self.rows)} samples: draws "
                             "must have the batch as their first dimension")
        out = torch.stack([fn(*args, tuple(shape[1:]), generator=g, **kwargs) for g in self.rows])
        return out if device is None else out.to(device)

    def normal(self, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        return self._rows(torch.randn, shape, device, **({"dtype": dtype} if dtype else {}))

    def uniform(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        return self._rows(torch.rand, shape, device)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        return self._rows(torch.randint, shape, device, 0, high)


def as_draws(source: "Draws | torch.Generator | None") -> Draws:
    """``source`` as :class:`Draws`: a generator (or None, the global RNG) is wrapped."""
    return source if isinstance(source, Draws) else Draws(source)
