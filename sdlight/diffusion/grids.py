"""Noise-level grids for the samplers: which sigmas a sampler visits, and the training timestep of each sigma.

A grid is a descending float64 tensor of ``steps + 1`` noise levels ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``
(k-diffusion's convention) ending in 0, plus the (possibly fractional) training timestep of each of the first
``steps`` of them, which is what a discrete-time model is called with.

- ``grid="timesteps"``: the sigmas of `make_timesteps` (diffusers' ``timestep_spacing``; ``spacing`` applies);
- ``grid="karras"``: Karras et al. (2022), eq. 5, with rho = 7 between the schedule's sigma(0) and sigma(T - 1),
  as diffusers' ``use_karras_sigmas=True`` (for Heun and Euler with ``timestep_spacing="linspace"``, and always for
  the DPM-Solver schedulers);
- ``grid="exponential"``: log-uniform between the same two ends (``use_exponential_sigmas=True``).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schedules import NoiseSchedule

GRIDS = ("timesteps", "karras", "exponential")
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


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """(steps,) descending sigmas, uniform in sigma^(1/rho) (Karras et al., 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """(steps,) descending sigmas, uniform in log sigma."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def sigma_to_t(sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Fractional training timesteps of ``sigma``, linear in log sigma between neighbours (diffusers' ``_sigma_to_t``).

    A zero-terminal-SNR schedule is read through `finite_terminal`; sigma = 0 maps to 0.
    """
    log_sigmas = finite_terminal(schedule).sigmas.double().log().cpu()
    log_sigma = sigma.double().cpu().clamp(min=1e-10).log()
    low = (log_sigma[None] >= log_sigmas[:, None]).long().cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def finite_terminal(schedule: NoiseSchedule) -> NoiseSchedule:
    """Schedule with alpha_bar(T) raised to 2**-24 when it is 0, so the sigma-space samplers see a finite sigma.

    The same fix as diffusers' Euler and DPM-Solver schedulers under ``rescale_betas_zero_snr``.
    """
    ab = schedule.alphas_cumprod
    if ab[-1] > 0:
        return schedule
    betas = schedule.betas.clone()
    betas[-1] = 1 - 2.0**-24 / ab[-2]
    return NoiseSchedule(betas)


def make_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str = "leading", grid: str = "timesteps", round_t: bool = False,
    finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """(sigmas (steps + 1,) ending in 0, timesteps (steps,)), both float64 on the CPU.

    ``round_t`` rounds the timesteps of a sigma grid to whole training timesteps, as diffusers' DPM-Solver and
    UniPC schedulers do (Heun and Euler call the model at the fractional ones); the sigmas stay as the grid made them.
    ``finite`` reads a zero-terminal-SNR schedule through `finite_terminal` (sigma-space steps need a finite top
    sigma; DDPM's and DDIM's posteriors take alpha_bar = 0 as it is).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    schedule = finite_terminal(schedule) if finite else schedule
    sigmas_all = schedule.sigmas.double().cpu()
    T = schedule.num_timesteps
    if grid == "timesteps":
        ts = make_timesteps(steps, T, spacing)
        return torch.cat([sigmas_all[ts], sigmas_all.new_zeros(1)]), ts.double()
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if grid == "karras":
        sigmas = karras_sigmas(float(sigmas_all[0]), float(sigmas_all[-1]), steps)
    elif grid == "exponential":
        sigmas = exponential_sigmas(float(sigmas_all[0]), float(sigmas_all[-1]), steps)
    else:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    ts = sigma_to_t(sigmas, schedule)
    return torch.cat([sigmas, sigmas.new_zeros(1)]), ts.round() if round_t else ts


def nearest_timestep(sigma: float, schedule: NoiseSchedule) -> int:
    """The training timestep whose sigma is nearest to ``sigma`` in log space; -1 for sigma = 0 (clean data).

    This is what a sigma-grid sampler hands to ``callback`` (e.g. `inpaint_callback`, which noises the known
    region to that timestep), so a Karras grid's in-between sigmas are blended at the closest training level.
    """
    if sigma <= 0:
        return -1
    return int(sigma_to_t(torch.tensor([sigma], dtype=torch.float64), schedule).round().item())


class VPPath:
    """The variance-preserving path: ``x = (x0 + sigma eps) / sqrt(1 + sigma^2)``.

    Every path also names the variables its probability-flow ODE is written in for Euler and Heun (`ode`): a
    state ``y = x · scale`` and a time ``u`` in which ``y = x0 + u · dy/du`` along a straight line; here k-diffusion's
    ``y = x / signal = x0 + sigma eps``, ``u = sigma``.
    """

    @staticmethod
    def scales(sigma: float) -> tuple[float, float]:
        """(signal, noise): x = signal · x0 + noise · eps; (0, 1) at sigma = inf (zero terminal SNR)."""
        if math.isinf(sigma):
            return 0.0, 1.0
        signal = 1.0 / math.sqrt(1.0 + sigma**2)
        return signal, sigma * signal

    @staticmethod
    def ode(sigma: float) -> tuple[float, float, float]:
        """(scale, u, 1 / scale): the ODE state is ``y = x · scale`` at time ``u``; ``x = y · (1 / scale)``."""
        return math.sqrt(1.0 + sigma**2), sigma, VPPath.scales(sigma)[0]

    @staticmethod
    def sigma_at(u: float) -> float:
        return u

    @staticmethod
    def start_noise(sigma: float) -> float:
        """The scale of the standard normal a sampler starts from at ``sigma`` (diffusers' ``init_noise_sigma``
        in this path's units): 1, pure noise being x at the top of the schedule."""
        return 1.0


class FlowPath:
    """The rectified-flow path (Liu et al., 2022; SD3): ``x = (1 - t) x0 + t eps``, ``t = sigma / (1 + sigma)``.

    Its ODE is written on ``x`` itself at time ``t`` (``x = x0 + t (eps - x0)``), as diffusers' flow-matching
    schedulers step it."""

    @staticmethod
    def t_of(sigma: float) -> float:
        return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)

    @staticmethod
    def scales(sigma: float) -> tuple[float, float]:
        t = FlowPath.t_of(sigma)
        return 1.0 - t, t

    @staticmethod
    def ode(sigma: float) -> tuple[float, float, float]:
        return 1.0, FlowPath.t_of(sigma), 1.0

    @staticmethod
    def sigma_at(u: float) -> float:
        return math.inf if u >= 1 else u / (1.0 - u)

    @staticmethod
    def start_noise(sigma: float) -> float:
        return 1.0


class VEPath:
    """The variance-exploding path of EDM (Karras et al., 2022): ``x = x0 + sigma eps``; its ODE on x at time
    sigma."""

    @staticmethod
    def scales(sigma: float) -> tuple[float, float]:
        return 1.0, sigma

    @staticmethod
    def ode(sigma: float) -> tuple[float, float, float]:
        return 1.0, sigma, 1.0

    @staticmethod
    def sigma_at(u: float) -> float:
        return u

    @staticmethod
    def start_noise(sigma: float) -> float:
        return sigma


@dataclass(frozen=True)
class Grid:
    """The noise levels a sampler visits: ``sigmas`` (steps + 1, descending, ending in 0), the network's time input
    at each of the first ``steps`` (``times``), the path's scales, and the time of an in-between sigma."""

    sigmas: list[float]
    times: list[float]
    path: Any
    time_of: Callable[[float], float]

    def __len__(self) -> int:
        return len(self.times)

    def tail(self, keep: int) -> "Grid":
        """The last ``keep`` steps (img2img keeps the low-noise end of the grid)."""
        start = len(self.times) - keep
        return Grid(self.sigmas[start:], self.times[start:], self.path, self.time_of)
