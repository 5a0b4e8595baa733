"""EDM (Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

``x = x0 + sigma eps`` (variance exploding). The backbone F is preconditioned: the denoiser is
``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``,
``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``
and the time input ``c_noise = ln(sigma) / 4`` (Table 1). Training draws ``ln sigma ~ N(P_mean, P_std^2)`` and
weights the denoiser's error by ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, which is the plain
error of F against its target ``(x0 - c_skip x) / c_out``. Samplers walk Karras' sigma grid (rho = 7) from
``sigma_max`` to ``sigma_min``, then 0 — diffusers' ``EDMEulerScheduler``'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdlight.errors import UsageError

from .grids import GRIDS, Grid, VEPath, exponential_sigmas, karras_sigmas
from .objectives import Denoise, Network, Objective, setting_loss_type, setting_number
from .weighting import diffusion_loss


class EDM(Objective):
    """Karras et al.'s preconditioning, log-normal training density and loss weight (see the module docstring)."""

    name = "edm"
    prediction_type = "edm"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, loss_type: str = "l2"):
        self.sigma_data, self.p_std = setting_number("sigma_data", sigma_data), setting_number("p_std", p_std)
        self.sigma_min, self.sigma_max = setting_number("sigma_min", sigma_min), setting_number("sigma_max", sigma_max)
        self.rho, self.p_mean, self.loss_type = setting_number("rho", rho), float(p_mean), setting_loss_type(loss_type)
        if not sigma_min < sigma_max:
            raise UsageError(f"model.objective.sigma_min={sigma_min} must be below sigma_max={sigma_max}")

    def preconditioning(self, sigma: Tensor | float) -> tuple[Any, Any, Any, Any]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma``."""
        sd2 = self.sigma_data**2
        total = (sigma**2 + sd2) ** 0.5
        log_sigma = sigma.log() if isinstance(sigma, Tensor) else math.log(sigma)
        return sd2 / total**2, sigma * self.sigma_data / total, 1 / total, log_sigma / 4

    # ------------------------------------------------------------------------------------------- training
    def draw_levels(self, n: int, draws: Any, device: torch.device | str | None = None) -> Tensor:
        """(n,) sigmas, ln sigma ~ N(P_mean, P_std^2)."""
        return (self.p_mean + self.p_std * draws.normal((n,), device, torch.float32)).exp()

    def noised(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        return x0 + levels.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * noise

    def losses(self, network: Network, x0: Tensor, levels: Tensor, noise: Tensor,
               element_weight: Tensor | None = None) -> Tensor:
        sigma = levels.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        x = self.noised(x0, noise, levels)
        out = network(c_in * x, c_noise.flatten())
        return diffusion_loss(out.float(), ((x0 - c_skip * x) / c_out).float(), None, self.loss_type, element_weight)

    def bucket(self, levels: Tensor, buckets: int) -> Tensor:
        """By the quantile of ln sigma under the training density (equal shares of training)."""
        u = torch.special.ndtr((levels.float().log() - self.p_mean) / self.p_std)
        return (u * buckets).long().clamp(0, buckets - 1)

    def bucket_names(self, buckets: int) -> list[str]:
        """``val/loss_q0.00-0.25`` ... (quantiles of the training sigma density, low to high noise)."""
        return [f"val/loss_q{k / buckets:.2f}-{(k + 1) / buckets:.2f}" for k in range(buckets)]

    # ------------------------------------------------------------------------------------------- sampling
    def grid(self, steps: int, *, spacing: str = "leading", kind: str = "timesteps", round_times: bool = False,
             finite: bool = True) -> Grid:
        """Karras' grid from ``sigma_max`` to ``sigma_min`` (``kind`` ``timesteps`` or ``karras``), or log-uniform
        (``exponential``), then 0; the backbone's time input is c_noise. ``spacing`` and ``round_times`` do not
        apply (EDM has no discrete timesteps)."""
        if not 0 < steps:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if kind not in GRIDS:
            raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}")
        if kind == "exponential":
            sigmas = exponential_sigmas(self.sigma_min, self.sigma_max, steps)
        else:
            sigmas = karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho)
        sigmas = sigmas.float().double()  # float32 values, as diffusers' scheduler holds them
        return Grid(sigmas.tolist() + [0.0], [math.log(s) / 4 for s in sigmas.tolist()], VEPath,
                    lambda sigma: math.log(sigma) / 4)

    def denoiser(self, network: Network) -> Denoise:
        """D(x; sigma) and the noise it implies: the backbone called on c_in x at c_noise (its grid time)."""

        def d(x: Tensor, sigma: float, t: float) -> tuple[Tensor, Tensor]:
            c_skip, c_out, c_in, _ = self.preconditioning(sigma)
            tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
            x0 = c_skip * x + c_out * network(c_in * x, tt).to(x.dtype)
            return x0, (x - x0) / sigma

        return d

    def level_at(self, sigma: float, batch: int, device: torch.device) -> Tensor:
        """sigma itself (0 once x is the final sample; `noised` at 0 is x0)."""
        return torch.full((batch,), float(sigma), dtype=torch.float32, device=device)

    # --------------------------------------------------------------------------------------------- export
    def settings(self) -> dict[str, Any]:
        return {"objective": self.name, "sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "loss_type": self.loss_type}

    def scheduler_config(self, spacing: str = "leading") -> dict[str, Any]:
        """diffusers' ``EDMEulerScheduler`` config (its preconditioning is this one with ``prediction_type``
        epsilon)."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data,
                "sigma_schedule": "karras", "rho": self.rho, "prediction_type": "epsilon",
                "final_sigmas_type": "zero", "num_train_timesteps": 1000}

    def diffusers_scheduler(self, sampler: str | None) -> str:
        """The diffusers class of ``sampler`` on this objective (DPM-Solver++ has an EDM form, the rest Euler's)."""
        return "EDMDPMSolverMultistepScheduler" if sampler and sampler.startswith("dpmpp") else "EDMEulerScheduler"
