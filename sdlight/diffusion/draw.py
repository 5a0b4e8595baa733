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
