"""Samplers over any denoiser: one short function each, in the spirit of k-diffusion's ``sampling.py``.

Every sampler has the same signature, so one Hydra node (``_partial_: true``) fits them all::

    sample_X(denoise, x, process, *, steps, prediction_type, spacing, [grid,] strength, generator, callback,
             progress, ...)

and the same start (`sampling_utils.prepare`): ``process`` is the model's objective (`objectives`; a bare
``NoiseSchedule`` is read as DDPM with ``prediction_type``), which gives the grid of noise levels and turns
``denoise`` into ``(x0, eps)`` at a grid point. DDPM and DDIM run on the objective's timestep grid; the others
(`grid_samplers`) on any of its grids.

- ``denoise(x_t, t)`` returns the network's output for a (B,) tensor ``t`` of its time input. Conditioning and
  guidance are closed over by the caller (see `guidance.cfg_denoiser`).
- ``x`` is x_T noise when ``strength == 1``. With ``strength < 1`` (img2img / SDEdit) ``x`` is the clean x0: the
  last ``int(steps * strength)`` grid points are kept and x0 is noised to the first of them, as diffusers does.
- ``callback(i, level, x)`` runs after step ``i`` with the new x, which lives at noise level ``level`` (as the
  objective's ``noised`` takes it; DDPM: a (B,) long timestep, -1 once x is the final sample); a returned tensor
  replaces x. `inpaint_callback` blends a known region this way.

The state is kept in float32 (or float64 when given) whatever the model's dtype; the result has x's dtype.
All samplers step to the clean end (sigma = 0) at the end.
"""

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from sdlight.errors import UsageError

from .grid_samplers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler, sample_heun, sample_unipc
from .grids import SPACINGS, make_timesteps
from .objectives import DDPM, Objective
from .sampling_utils import Callback, Denoiser, prepare, progress_bar, randn_like, step_done
from .schedules import NoiseSchedule

__all__ = ["SPACINGS", "make_timesteps", "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "sample_euler",
           "sample_heun", "sample_dpmpp_2m_sde", "sample_unipc", "inpaint_callback", "SAMPLERS", "sampler_name", "sampler_options",
           "Callback", "Denoiser"]


def _check_clip_x0(clip_x0: float | None) -> None:
    # `True` is a number to Python (a bound of 1) but a switch to whoever wrote it: refused, not taken as 1
    if clip_x0 is not None and (isinstance(clip_x0, bool) or not isinstance(clip_x0, (int, float)) or not clip_x0 > 0):
        raise ValueError(f"clip_x0 is the bound of the predicted x0 (a number > 0, 1 for pixels in [-1, 1]), "
                         f"got {clip_x0!r}")


def _alpha_bar(sigma: float) -> float:
    """alpha_bar = 1 / (1 + sigma^2) of a variance-preserving grid sigma (0 at sigma = inf: zero terminal SNR)."""
    return 0.0 if math.isinf(sigma) else 1.0 / (1.0 + sigma**2)


@torch.no_grad()
def _alpha_bar_steps(update: Callable[..., Tensor], denoise: Denoiser, x: Tensor, process: Objective | NoiseSchedule,
                     prediction_type: str | None, steps: int, spacing: str, strength: float,
                     generator: torch.Generator | None, callback: Callback | None, progress: bool,
                     clip_x0: float | None) -> Tensor:
    """DDPM's and DDIM's loop: the objective's timestep grid (a zero terminal SNR taken as it is), x0 clamped to
    ±``clip_x0`` when asked, and ``update(x, x0, eps, alpha_bar, alpha_bar_next)`` from one grid point to the next."""
    _check_clip_x0(clip_x0)
    dtype = x.dtype
    grid, den, x, objective = prepare(denoise, x, process, prediction_type=prediction_type, steps=steps,
                                      spacing=spacing, grid="timesteps", strength=strength, generator=generator,
                                      finite=False)
    for i in progress_bar(range(len(grid)), progress, len(grid)):
        s, s_next = grid.sigmas[i], grid.sigmas[i + 1]
        x0, eps = den(x, s, grid.times[i])
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = step_done(callback, i, s_next, objective, update(x, x0, eps, _alpha_bar(s), _alpha_bar(s_next)))
    return x.to(dtype)


def _check_ddpm_objective(process: Objective | NoiseSchedule, name: str) -> None:
    """DDPM's and DDIM's updates are written on a discrete alpha-bar schedule: other objectives are refused."""
    if isinstance(process, Objective) and not isinstance(process, DDPM):
        raise UsageError(f"sampler={name} needs the DDPM objective; this model's objective is {process.name}: "
                         "use sampler=euler, heun, dpmpp_2m or unipc")


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser, x: Tensor, process: Objective | NoiseSchedule, *, steps: int = 50,
    prediction_type: str | None = None, spacing: str = "leading", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    clip_x0: float | None = None,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat), variance "fixed_small" (Ho et al., 2020).

    With fewer steps than training timesteps the posterior is taken between consecutive kept timesteps.
    ``clip_x0`` clamps the predicted x0 to [-clip_x0, clip_x0]: for pixel-space models only, since latents are not
    bounded by ±1.
    """
    _check_ddpm_objective(process, "ddpm")

    def update(x: Tensor, x0: Tensor, eps: Tensor, a: float, a_next: float) -> Tensor:
        beta = 1 - a / a_next
        x = (math.sqrt(a_next) * beta / (1 - a)) * x0 + (math.sqrt(a / a_next) * (1 - a_next) / (1 - a)) * x
        if a_next < 1:  # noise on every step but the last
            x = x + math.sqrt((1 - a_next) / (1 - a) * beta) * randn_like(x, generator)
        return x

    return _alpha_bar_steps(update, denoise, x, process, prediction_type, steps, spacing, strength, generator,
                            callback, progress, clip_x0)


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser, x: Tensor, process: Objective | NoiseSchedule, *, steps: int = 50,
    prediction_type: str | None = None, spacing: str = "leading", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    eta: float = 0.0, clip_x0: float | None = None,
) -> Tensor:
    """DDIM (Song et al., 2021): eta = 0 is the deterministic ODE sampler, eta = 1 matches DDPM's variance.
    ``clip_x0`` as in `sample_ddpm`."""
    _check_ddpm_objective(process, "ddim")

    def update(x: Tensor, x0: Tensor, eps: Tensor, a: float, a_next: float) -> Tensor:
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        return x + sigma * randn_like(x, generator) if sigma > 0 else x

    return _alpha_bar_steps(update, denoise, x, process, prediction_type, steps, spacing, strength, generator,
                            callback, progress, clip_x0)


def inpaint_callback(
    known: Tensor, mask: Tensor, process: Objective | NoiseSchedule, noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Callback:
    """Callback that keeps the known region of ``known`` (clean x0) where ``mask == 0``.

    ``mask`` is 1 where new content is generated (diffusers' convention) and broadcasts against x. After each
    step the known region is replaced by ``known`` noised to the new x's level with one fixed ``noise``, and by
    ``known`` itself after the last step, as diffusers' inpainting pipelines do for non-inpainting UNets.
    """
    objective = process if isinstance(process, Objective) else DDPM(process)
    if noise is None:
        noise = randn_like(known, generator)

    def blend(i: int, level: Tensor, x: Tensor) -> Tensor:
        k = known.to(x) if int(level[0]) < 0 else objective.noised(known.to(x), noise.to(x), level)
        m = mask.to(x)
        return (1 - m) * k + m * x

    return blend


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    # the pairing most Stable Diffusion users know by name; the same function with grid="karras"
    "dpmpp_2m_karras": partial(sample_dpmpp_2m, grid="karras"),
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_karras": partial(sample_dpmpp_2m_sde, grid="karras"),
    "euler": sample_euler,
    "heun": sample_heun,
    "unipc": sample_unipc,
}
# what the caller supplies (the model's parametrisation, the seed, the hooks) or names with its own option
# (steps, img2img strength): everything else a sampler takes is one of its user-facing options
_NOT_OPTIONS = {"prediction_type", "generator", "callback", "progress", "steps", "strength"}


def _parts(sampler: Callable) -> tuple[Callable, dict]:
    """(function, keywords) of a sampler function or a (nested) ``functools.partial`` of one."""
    keywords: dict = {}
    while isinstance(sampler, partial):
        keywords = {**sampler.keywords, **keywords}
        sampler = sampler.func
    return sampler, keywords


def sampler_options(sampler: Callable) -> tuple[str, ...]:
    """The options a sampler takes (``eta``, ``spacing``, ``grid``, ``s_churn`` ...), in signature order: its
    keyword-only parameters less those every sampler is given by its caller."""
    func, _ = _parts(sampler)
    params = inspect.signature(func).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _NOT_OPTIONS)


def sampler_name(sampler: Callable | None) -> str | None:
    """The user-facing name (``ddim``) of a sampler function or of a ``functools.partial`` of one.

    A partial carrying the keywords of a registered variant gets that variant's name (a configured
    ``sample_dpmpp_2m`` with ``grid: karras`` is ``dpmpp_2m_karras``).
    """
    if sampler is None:
        return None
    func, keywords = _parts(sampler)
    best, best_size = None, -1
    for name, registered in SAMPLERS.items():
        f, kw = _parts(registered)
        if f is func and all(keywords.get(k) == v for k, v in kw.items()) and len(kw) > best_size:
            best, best_size = name, len(kw)
    return best or getattr(func, "__name__", None)
