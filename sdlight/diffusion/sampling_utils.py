"""What every sampler shares: the callable types, noise drawing, the progress bar and the callback hook."""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .draw import draw

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], Tensor | None]


def progress_bar(items: Iterable, enabled: bool, total: int) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm

        return tqdm(items, total=total)
    except ImportError:
        pass
    try:
        from rich.progress import track

        return track(items, total=total)
    except ImportError:
        return items


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn where the generator lives (see `draw`)."""
    return draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)


def after_step(callback: Callback | None, i: int, t_next: int, x: Tensor) -> Tensor:
    """Runs ``callback(i, t, x)`` with t as a (B,) long tensor; a returned tensor replaces x."""
    if callback is None:
        return x
    out = callback(i, torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device), x)
    return x if out is None else out.to(x)
