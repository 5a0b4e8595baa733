"""Samplers over any denoiser: one short function each, in the spirit of k-diffusion's ``sampling.py``.

Every sampler has the same signature, so one Hydra node (``_partial_: true``) fits them all::

    sample_X(denoise, x, schedule, *, steps, prediction_type, spacing, strength, generator, callback, progress, ...)

- ``denoise(x_t, t)`` returns the model output (of ``prediction_type``) for a (B,) long tensor ``t`` of training
  timesteps. Conditioning and guidance are closed over by the caller (see `guidance.cfg_denoiser`).
- ``x`` is x_T noise when ``strength == 1``. With ``strength < 1`` (img2img / SDEdit) ``x`` is the clean x0: the
  last ``int(steps * strength)`` timesteps are kept and x0 is noised to the first of them, as diffusers does.
- ``callback(i, t, x)`` runs after step ``i`` with the new x, which lives at timestep ``t`` ((B,) long; -1 once
  x is the final sample); a returned tensor replaces x. `inpaint_callback` blends a known region this way.

The state is kept in float32 (or float64 when given) whatever the model's dtype; the result has x's dtype.
All samplers step to alpha_bar = 1 (no noise) at the end.
"""

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .process import q_sample, to_x0_eps
from .schedules import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], Tensor | None]
SPACINGS = ("leading", "trailing", "linspace")


def make_timesteps(steps: int, num_train_timesteps: int, spacing: str = "leading", steps_offset: int = 1) -> Tensor:
    """Descending (steps,) long tensor of training timesteps, as diffusers' ``timestep_spacing``.

    leading: ``arange(steps) * (T // steps) + steps_offset`` (Stable Diffusion uses offset 1);
    trailing: ``round(T - i * T / steps) - 1``, which starts at T - 1 (Lin et al., 2023, Table 2);
    linspace: ``round(linspace(0, T - 1, steps))``.
    """
    T = num_train_timesteps
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ratio = T // steps
        # the offset may not push the first timestep past T - 1 (steps == T with offset 1 would)
        offset = min(steps_offset, T - 1 - (steps - 1) * ratio)
        return (torch.arange(steps, dtype=torch.long) * ratio + offset).flip(0)
    if spacing == "trailing":
        return (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
    if spacing == "linspace":
        return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def _progress(items: Iterable, enabled: bool, total: int) -> Iterable:
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


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # draw on the generator's device (a CPU generator gives the same samples on any accelerator), then move
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _start(x: Tensor, schedule: NoiseSchedule, steps: int, spacing: str, strength: float, generator):
    """Timesteps to run (python ints, descending) and the starting x_t in the working dtype."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ts = make_timesteps(steps, schedule.num_timesteps, spacing).tolist()
    if strength < 1.0:
        keep = min(int(steps * strength), steps)  # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
        ts = ts[steps - keep :]
        if ts:
            noise = _randn(x, generator)
            x = q_sample(x, ts[0], noise, schedule)
    return ts, x


def _call(denoise: Denoiser, x: Tensor, t: int, schedule: NoiseSchedule, prediction_type: str):
    """(x0, eps) from the model at integer timestep t."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return to_x0_eps(denoise(x, tt).to(x.dtype), x, tt, schedule, prediction_type)


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _after_step(callback: Callback | None, i: int, t_next: int, x: Tensor) -> Tensor:
    if callback is None:
        return x
    out = callback(i, torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device), x)
    return x if out is None else out.to(x)


def _finite_terminal(schedule: NoiseSchedule) -> NoiseSchedule:
    """Schedule with alpha_bar(T) raised to 2**-24 when it is 0, so the sigma-space samplers see a finite sigma.

    The same fix as diffusers' Euler and DPM-Solver schedulers under ``rescale_betas_zero_snr``.
    """
    ab = schedule.alphas_cumprod
    if ab[-1] > 0:
        return schedule
    betas = schedule.betas.clone()
    betas[-1] = 1 - 2.0**-24 / ab[-2]
    return NoiseSchedule(betas)


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, *, steps: int = 50, prediction_type: str = "eps",
    spacing: str = "leading", strength: float = 1.0, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False, clip_x0: float | None = None,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat), variance "fixed_small" (Ho et al., 2020).

    With fewer steps than training timesteps the posterior is taken between consecutive kept timesteps.
    ``clip_x0`` clamps the predicted x0 to [-clip_x0, clip_x0] (pixel-space models).
    """
    dtype = x.dtype
    ts, x = _start(x, schedule, steps, spacing, strength, generator)
    for i in _progress(range(len(ts)), progress, len(ts)):
        t, t_next = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        x0, _ = _call(denoise, x, t, schedule, prediction_type)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        a, a_next = _alpha_bar(schedule, t), _alpha_bar(schedule, t_next)
        beta = 1 - a / a_next
        x = (math.sqrt(a_next) * beta / (1 - a)) * x0 + (math.sqrt(a / a_next) * (1 - a_next) / (1 - a)) * x
        if t_next >= 0:
            var = (1 - a_next) / (1 - a) * beta
            x = x + math.sqrt(var) * _randn(x, generator)
        x = _after_step(callback, i, t_next, x)
    return x.to(dtype)


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, *, steps: int = 50, prediction_type: str = "eps",
    spacing: str = "leading", strength: float = 1.0, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False, eta: float = 0.0, clip_x0: float | None = None,
) -> Tensor:
    """DDIM (Song et al., 2021): eta = 0 is the deterministic ODE sampler, eta = 1 matches DDPM's variance."""
    dtype = x.dtype
    ts, x = _start(x, schedule, steps, spacing, strength, generator)
    for i in _progress(range(len(ts)), progress, len(ts)):
        t, t_next = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        x0, eps = _call(denoise, x, t, schedule, prediction_type)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        a, a_next = _alpha_bar(schedule, t), _alpha_bar(schedule, t_next)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn(x, generator)
        x = _after_step(callback, i, t_next, x)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, *, steps: int = 50, prediction_type: str = "eps",
    spacing: str = "leading", strength: float = 1.0, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022): second-order multistep in log-SNR time on the data prediction.

    Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    lower_order_final=True)``: the first step is first order (DDIM) and the last one lands on x0_hat.
    """
    dtype = x.dtype
    schedule = _finite_terminal(schedule)
    ts, x = _start(x, schedule, steps, spacing, strength, generator)
    x0_prev, h_prev = None, None
    for i in _progress(range(len(ts)), progress, len(ts)):
        t, t_next = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        x0, _ = _call(denoise, x, t, schedule, prediction_type)
        if t_next < 0:
            x = x0  # sigma_next = 0: every order of the update reduces to the data prediction
        else:
            a, a_next = _alpha_bar(schedule, t), _alpha_bar(schedule, t_next)
            lam, lam_next = 0.5 * math.log(a / (1 - a)), 0.5 * math.log(a_next / (1 - a_next))
            h = lam_next - lam
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        x = _after_step(callback, i, t_next, x)
    return x.to(dtype)


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: Tensor, schedule: NoiseSchedule, *, steps: int = 50, prediction_type: str = "eps",
    spacing: str = "leading", strength: float = 1.0, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma space (Karras et al., 2022), as diffusers' EulerDiscrete.

    The step ``x_ve += (x_ve - x0_hat) / sigma * (sigma_next - sigma)`` acts on ``x_ve = x * sqrt(1 + sigma^2)``;
    it is applied here in the variance-preserving scale with float64 coefficients, which keeps float32 accurate
    where sigma is in the thousands (zero terminal SNR). On a schedule with finite terminal SNR it coincides with
    DDIM at eta = 0.
    """
    dtype = x.dtype
    schedule = _finite_terminal(schedule)
    ts, x = _start(x, schedule, steps, spacing, strength, generator)
    for i in _progress(range(len(ts)), progress, len(ts)):
        t, t_next = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        s = float(schedule.sigmas[t])
        s_next = 0.0 if t_next < 0 else float(schedule.sigmas[t_next])
        x0, _ = _call(denoise, x, t, schedule, prediction_type)
        r, c, c_next = s_next / s, math.sqrt(1 + s**2), math.sqrt(1 + s_next**2)
        x = (r * c / c_next) * x + ((1 - r) / c_next) * x0
        x = _after_step(callback, i, t_next, x)
    return x.to(dtype)


def inpaint_callback(
    known: Tensor, mask: Tensor, schedule: NoiseSchedule, noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Callback:
    """Callback that keeps the known region of ``known`` (clean x0) where ``mask == 0``.

    ``mask`` is 1 where new content is generated (diffusers' convention) and broadcasts against x. After each
    step the known region is replaced by ``known`` noised to the new x's timestep with one fixed ``noise``, and by
    ``known`` itself after the last step, as diffusers' inpainting pipelines do for non-inpainting UNets.
    """
    if noise is None:
        noise = _randn(known, generator)

    def blend(i: int, t: Tensor, x: Tensor) -> Tensor:
        k = known.to(x) if int(t[0]) < 0 else q_sample(known.to(x), t, noise.to(x), schedule)
        m = mask.to(x)
        return (1 - m) * k + m * x

    return blend


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
}


def sampler_name(sampler: Callable | None) -> str | None:
    """The user-facing name (``ddim``) of a sampler function or of a ``functools.partial`` of one."""
    func = getattr(sampler, "func", sampler)
    name = next((k for k, f in SAMPLERS.items() if f is func), None)
    return name or (getattr(func, "__name__", None) if func is not None else None)
