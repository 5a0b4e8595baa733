"""Samplers over any of the objective's sigma grids (``grid``: timesteps | karras | exponential): each one short
function with the signature and the start of `samplers`::

    sample_X(denoise, x, process, *, steps, prediction_type, spacing, grid, strength, generator, callback,
             progress, ...options)

The steps are written on k-diffusion's ``x / signal = x0 + sigma eps`` and applied in the objective's own scale
(``x = signal x0 + noise eps``; variance-preserving for DDPM), which keeps float32 accurate where sigma is in the
thousands (zero terminal SNR). ``callback(i, level, x)`` sees x after step i at the objective's level nearest to
its sigma (DDPM: on a ``timesteps`` grid exactly the timestep x lives at; on a Karras or exponential grid the
training timestep whose sigma is nearest in log space; -1 once x is the final sample).
"""

import math
from typing import Any

import torch
from torch import Tensor

from .objectives import Objective
from .sampling_utils import Callback, Denoiser, prepare, progress_bar, randn_like, step_done
from .schedules import NoiseSchedule

Process = Objective | NoiseSchedule


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: Tensor, process: Process, *, steps: int = 50, prediction_type: str | None = None,
    spacing: str = "leading", grid: str = "timesteps", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma space (Karras et al., 2022), as diffusers' EulerDiscrete.

    The step ``x_ve += (x_ve - x0_hat) / sigma * (sigma_next - sigma)`` acts on ``x_ve = x * sqrt(1 + sigma^2)``;
    it is applied here in the variance-preserving scale, which keeps float32 accurate where sigma is in the
    thousands (zero terminal SNR). On the ``timesteps`` grid of a schedule with finite terminal SNR it coincides
    with DDIM at eta = 0.
    """
    dtype = x.dtype
    g, den, x, objective = prepare(denoise, x, process, prediction_type=prediction_type, steps=steps, spacing=spacing,
                                 grid=grid, strength=strength, generator=generator)
    for i in progress_bar(range(len(g)), progress, len(g)):
        s, s_next = g.sigmas[i], g.sigmas[i + 1]
        x0, _ = den(x, s, g.times[i])
        (c, u, _), (c_next, u_next, _) = g.path.ode(s), g.path.ode(s_next)
        r = u_next / u
        x = (r * c / c_next) * x + ((1 - r) / c_next) * x0
        x = step_done(callback, i, s_next, objective, x)
    return x.to(dtype)


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, x: Tensor, process: Process, *, steps: int = 25, prediction_type: str | None = None,
    spacing: str = "leading", grid: str = "timesteps", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al., 2022, Algorithm 2).

    Two model calls per step (one on the last step, which is Euler onto sigma = 0), so ``steps=25`` costs about
    what 50 Euler steps do. With ``s_churn = 0`` it matches diffusers' ``HeunDiscreteScheduler``; ``s_churn > 0``
    adds Algorithm 2's noise: sigma is raised by ``gamma = min(s_churn / steps, sqrt(2) - 1)`` where
    ``s_tmin <= sigma <= s_tmax``, with fresh noise scaled by ``s_noise``.
    """
    dtype = x.dtype
    g, den, x, objective = prepare(denoise, x, process, prediction_type=prediction_type, steps=steps, spacing=spacing,
                                 grid=grid, strength=strength, generator=generator)
    n, ode = len(g), g.path.ode

    def x0_at(y: Tensor, sigma: float, t: float) -> Tensor:
        return den(y * ode(sigma)[2], sigma, t)[0]

    for i in progress_bar(range(n), progress, n):
        s, s_next, t = g.sigmas[i], g.sigmas[i + 1], g.times[i]
        (scale, u, _), (_, u_next, back_next) = ode(s), ode(s_next)
        y = x * scale  # the path's ODE state: y = x0 + u * slope (k-diffusion's x / signal for DDPM)
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        if gamma > 0:
            u_hat = u * (1 + gamma)
            y = y + randn_like(x, generator) * (s_noise * math.sqrt(u_hat**2 - u**2))
            u, s = u_hat, g.path.sigma_at(u_hat)
            t = g.time_of(s)
        slope = (y - x0_at(y, s, t)) / u
        y_next = y + slope * (u_next - u)
        if s_next > 0:  # the trapezoid: average the slopes at both ends
            slope_next = (y_next - x0_at(y_next, s_next, g.times[i + 1])) / u_next
            y_next = y + (slope + slope_next) / 2 * (u_next - u)
        x = step_done(callback, i, s_next, objective, y_next * back_next)
    return x.to(dtype)


def _dpmpp(denoise: Denoiser, x: Tensor, process: Process, steps: int, prediction_type: str | None, spacing: str,
           grid: str, strength: float, generator: torch.Generator | None, callback: Callback | None,
           progress: bool, eta: float) -> Tensor:
    """DPM-Solver++(2M) in log-SNR time on the data prediction; ``eta = 1`` is its SDE variant, 0 the ODE one."""
    dtype = x.dtype
    g, den, x, objective = prepare(denoise, x, process, prediction_type=prediction_type, steps=steps, spacing=spacing,
                                 grid=grid, strength=strength, generator=generator, round_times=True)
    x0_prev, h_prev = None, None
    for i in progress_bar(range(len(g)), progress, len(g)):
        s, s_next = g.sigmas[i], g.sigmas[i + 1]
        x0, _ = den(x, s, g.times[i])
        if s_next == 0:
            x = x0  # sigma_next = 0: every order of the update reduces to the data prediction
        else:
            (a, sv), (a_next, sv_next) = g.path.scales(s), g.path.scales(s_next)
            h = math.log(s / s_next)  # lambda = log(alpha / sigma_vp) = -log sigma
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            if eta == 0:
                x = (sv_next / sv) * x - a_next * math.expm1(-h) * d
            else:
                hh = eta * h  # the share of the step taken by the SDE (Lu et al., 2022, eq. 21 with eta = 1)
                x = ((sv_next / sv) * math.exp(-hh)) * x - a_next * math.expm1(-h - hh) * d
                x = x + (sv_next * math.sqrt(-math.expm1(-2 * hh))) * randn_like(x, generator)
            x0_prev, h_prev = x0, h
        x = step_done(callback, i, s_next, objective, x)
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, process: Process, *, steps: int = 50, prediction_type: str | None = None,
    spacing: str = "leading", grid: str = "timesteps", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022): second-order multistep in log-SNR time on the data prediction.

    Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    lower_order_final=True)`` (``use_karras_sigmas=True`` with ``grid="karras"``): the first step is first order
    (DDIM) and the last one lands on x0_hat.
    """
    return _dpmpp(denoise, x, process, steps, prediction_type, spacing, grid, strength, generator, callback,
                  progress, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: Tensor, process: Process, *, steps: int = 50, prediction_type: str | None = None,
    spacing: str = "leading", grid: str = "timesteps", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    eta: float = 1.0,
) -> Tensor:
    """Stochastic DPM-Solver++(2M): the SDE solver of Lu et al. (2022), fresh noise at every step.

    With ``eta = 1`` it matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
    solver_order=2)`` (the "DPM++ 2M SDE (Karras)" of web UIs with ``grid="karras"``); ``eta`` scales the part
    of each step taken as an SDE (0 is `sample_dpmpp_2m`).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _dpmpp(denoise, x, process, steps, prediction_type, spacing, grid, strength, generator, callback,
                  progress, eta=eta)


def _unipc_update(path: Any, x: Tensor, s: float, s_next: float, x0: Tensor, older: tuple[Tensor, float] | None,
                  x0_next: Tensor | None = None) -> Tensor:
    """One UniPC update from grid sigma ``s`` (sample ``x``, data prediction ``x0``) to ``s_next``, B(h) = e^h - 1.

    Predictor (``x0_next`` None): with ``older = (x0 at sigma_older, sigma_older)`` second order (rho = 1/2),
    else first order (DDIM). Corrector (``x0_next`` the model's data prediction at ``s_next``): the same step
    again, with the new node's difference weighted by the solution of the order conditions (Zhao et al., 2023).
    """
    (a_next, sv_next), (_, sv) = path.scales(s_next), path.scales(s)
    h = math.log(s / s_next)  # lambda = -log sigma
    h_phi_1 = math.expm1(-h)
    x_new = (sv_next / sv) * x - a_next * h_phi_1 * x0
    b_h = h_phi_1  # "bh2"
    d1, rk = None, None
    if older is not None:
        x0_older, s_older = older
        rk = math.log(s / s_older) / h  # (lambda_older - lambda) / h
        d1 = (x0_older - x0) / rk
    if x0_next is None:
        return x_new if d1 is None else x_new - a_next * b_h * 0.5 * d1
    d1_next = x0_next - x0
    if d1 is None:
        return x_new - a_next * b_h * 0.5 * d1_next
    # order conditions sum_k rho_k rk^(i-1) = b_i, i = 1, 2, with rk = 1 for the new node
    phi_k1 = h_phi_1 / -h - 1
    b1, b2 = phi_k1 / b_h, (phi_k1 / -h - 0.5) * 2 / b_h
    rho_older = (b1 - b2) / (1 - rk)
    rho_next = b1 - rho_older
    return x_new - a_next * b_h * (rho_older * d1 + rho_next * d1_next)


@torch.no_grad()
def sample_unipc(
    denoise: Denoiser, x: Tensor, process: Process, *, steps: int = 20, prediction_type: str | None = None,
    spacing: str = "leading", grid: str = "timesteps", strength: float = 1.0,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
) -> Tensor:
    """UniPC (Zhao et al., 2023), 2nd order, on the data prediction: each model call first corrects the last
    step (UniC, no extra call) and then predicts the next (UniP). Matches diffusers' ``UniPCMultistepScheduler``
    (``solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True``); good images in 10-20 steps.
    """
    dtype = x.dtype
    g, den, x, objective = prepare(denoise, x, process, prediction_type=prediction_type, steps=steps, spacing=spacing,
                                 grid=grid, strength=strength, generator=generator, round_times=True)
    n = len(g)
    last = None  # (x before the previous predictor step, its sigma, its x0, the node before it or None)
    for i in progress_bar(range(n), progress, n):
        s, s_next = g.sigmas[i], g.sigmas[i + 1]
        x0, _ = den(x, s, g.times[i])
        if last is not None:
            x = _unipc_update(g.path, last[0], last[1], s, last[2], last[3], x0_next=x0)
        order = min(2, n - i, i + 1)  # first order to start (one node) and to end (onto sigma = 0)
        older = (last[2], last[1]) if order == 2 and last is not None else None
        last = (x, s, x0, older)  # the corrector of this step, at the next call, has the predictor's order
        x = x0 if s_next == 0 else _unipc_update(g.path, x, s, s_next, x0, older)
        x = step_done(callback, i, s_next, objective, x)
    return x.to(dtype)
