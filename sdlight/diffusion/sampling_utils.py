"""What every sampler shares: the callable types, noise drawing, the progress bar, the start (objective, grid,
denoiser, img2img) and the callback hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .draw import draw
from .grids import Grid
from .process import canonical_prediction_type
from .schedules import NoiseSchedule

if TYPE_CHECKING:
    from .objectives import Denoise, Objective

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


def prepare(denoise: Denoiser, x: Tensor, process: "Objective | NoiseSchedule", *, prediction_type: str | None,
            steps: int, spacing: str, grid: str, strength: float, generator: torch.Generator | None,
            round_times: bool = False, finite: bool = True) -> tuple[Grid, Denoise, Tensor, "Objective"]:
    """What every sampler does first: the objective (a bare ``NoiseSchedule`` is read as DDPM with
    ``prediction_type``), its grid, its denoiser over ``denoise``, and x in the working dtype (float32 at least).

    ``x`` is a standard normal draw, scaled to the grid's first noise level where the path needs it (EDM's
    sigma_max). With ``strength < 1`` (img2img / SDEdit) ``x`` is the clean x0: the last ``int(steps * strength)``
    grid points are kept and x0 is noised to the first of them, as diffusers' img2img pipelines do.
    """
    from .objectives import DDPM, Objective

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if isinstance(process, Objective):
        objective = process
        if prediction_type is not None and canonical_prediction_type(prediction_type) != getattr(
                objective, "prediction_type", None):
            raise ValueError(f"prediction_type={prediction_type} given for an objective that predicts "
                             f"{getattr(objective, 'prediction_type', 'no DDPM parametrisation')}")
    else:
        objective = DDPM(process, prediction_type or "eps")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    points = objective.grid(steps, spacing=spacing, kind=grid, round_times=round_times, finite=finite)
    start = points.path.start_noise(points.sigmas[0])
    if strength == 1.0 and start != 1.0:  # a variance-exploding start: sigma_max times the standard normal
        x = x * start
    if strength < 1.0:
        keep = min(int(steps * strength), steps)  # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
        points = points.tail(keep)
        if len(points):
            signal, noise = points.path.scales(points.sigmas[0])
            x = signal * x + noise * randn_like(x, generator)
    return points, objective.denoiser(denoise), x, objective


def step_done(callback: Callback | None, i: int, sigma_next: float, objective: "Objective", x: Tensor) -> Tensor:
    """Runs ``callback(i, level, x)`` after step ``i``, ``level`` being x's noise level as the objective's
    ``noised`` takes it (DDPM: the nearest training timestep, -1 once x is the final sample); a returned tensor
    replaces x."""
    if callback is None:
        return x
    out = callback(i, objective.level_at(sigma_next, x.shape[0], x.device), x)
    return x if out is None else out.to(x)
