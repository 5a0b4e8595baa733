"""Rectified flow (Liu et al., 2022; Esser et al., 2024, "Scaling Rectified Flow Transformers" — SD3, Flux).

``x_t = (1 - t) x0 + t eps`` for t in [0, 1]; the network predicts the velocity ``v = eps - x0`` and is called
with ``t · num_train_timesteps`` as its time input (SD3's convention, so a UNet's sinusoidal embedding sees the
range it sees under DDPM). Training draws t from a density (SD3, section 3.1):

- ``uniform``: t ~ U(0, 1);
- ``logit_normal``: t = sigmoid(n), n ~ N(loc, scale) (SD3's best, ``lognorm(0, 1)``);
- ``mode``: t = 1 - u - mode_scale (cos²(pi u / 2) - 1 + u), u ~ U(0, 1) (mode sampling with heavy tails);
- ``cosmap``: t = 1 - 1 / (tan(pi u / 2) + 1);

then shifts it towards noise, ``t' = s t / (1 + (s - 1) t)``: a fixed ``shift``, or ``shift="auto"`` from the
number of latent tokens (2x2 patches) as Flux does, ``s = exp(mu)`` with mu linear in the token count between
``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``. The loss is the error of the velocity, unweighted
(the density is the weighting), or weighted per sample by SD3's ``weighting`` (``sigma_sqrt``: t^-2, ``cosmap``:
2 / (pi (1 - 2t + 2t^2)); diffusers' ``compute_loss_weighting_for_sd3``). Samplers see the noise-to-signal ratio ``sigma = t / (1 - t)`` on `FlowPath`; the
``timesteps`` grid is diffusers' ``FlowMatchEulerDiscreteScheduler``'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdlight.errors import UsageError

from .grids import GRIDS, FlowPath, Grid, exponential_sigmas, karras_sigmas
from .objectives import Denoise, Network, Objective, setting_loss_type, setting_number
from .weighting import diffusion_loss

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "cosmap")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flow_loss_weight(t: Tensor, weighting: str) -> Tensor | None:
    """SD3's per-sample loss weights of the velocity error at times ``t`` (None: unweighted)."""
    if weighting == "sigma_sqrt":
        return t.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t.float() + 2 * t.float() ** 2))
    return None


def shift_times(t: Tensor | float, shift: float) -> Tensor | float:
    """``s t / (1 + (s - 1) t)``: more of [0, 1] spent near noise for s > 1 (SD3, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def shift_for_tokens(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
                     max_seq_len: int = 4096) -> float:
    """Flux's resolution-dependent shift: ``exp(mu)``, mu linear in the latent token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (tokens - base_seq_len))


class RectifiedFlow(Objective):
    """Rectified flow with SD3's timestep densities and shift (see the module docstring)."""

    name = "rectified_flow"
    prediction_type = "flow"

    def __init__(self, timestep_sampling: str = "logit_normal", loc: float = 0.0, scale: float = 1.0,
                 mode_scale: float = 1.29, shift: float | str = 1.0, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_seq_len: int = 256, max_seq_len: int = 4096, patch_size: int = 2,
                 num_train_timesteps: int = 1000, loss_type: str = "l2", weighting: str = "none"):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise UsageError(f"model.objective.timestep_sampling={timestep_sampling!r}; expected one of "
                             f"{TIMESTEP_SAMPLING}")
        if weighting not in LOSS_WEIGHTINGS:
            raise UsageError(f"model.objective.weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        self.weighting = weighting
        if shift != "auto":
            setting_number("shift", shift, extra=" (or auto)")
        self.timestep_sampling, self.loss_type = timestep_sampling, setting_loss_type(loss_type)
        self.loc, self.scale = float(loc), setting_number("scale", scale)
        self.mode_scale = setting_number("mode_scale", mode_scale, strict=False)
        self.num_train_timesteps = int(setting_number("num_train_timesteps", num_train_timesteps))
        self.shift_setting = shift if shift == "auto" else float(shift)
        self.auto = dict(base_shift=float(base_shift), max_shift=float(max_shift), base_seq_len=int(base_seq_len),
                         max_seq_len=int(max_seq_len))
        self.patch_size = int(setting_number("patch_size", patch_size))
        self.shift = 1.0 if shift == "auto" else float(shift)  # "auto": set by `fit_latent_size`

    def fit_latent_size(self, height: int, width: int) -> None:
        """Resolves ``shift="auto"`` for latents of ``height`` x ``width`` (called when the model is built)."""
        if self.shift_setting == "auto":
            tokens = (height // self.patch_size) * (width // self.patch_size)
            self.shift = shift_for_tokens(tokens, **self.auto)

    # ------------------------------------------------------------------------------------------- training
    def draw_levels(self, n: int, draws: Any, device: torch.device | str | None = None) -> Tensor:
        """(n,) float32 times in (0, 1): the density's draw, then the shift."""
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.loc + self.scale * draws.normal((n,), device, torch.float32))
        else:
            u = draws.uniform((n,), device)
            if self.timestep_sampling == "uniform":
                t = u
            elif self.timestep_sampling == "mode":
                t = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
            else:  # cosmap
                t = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
        return shift_times(t, self.shift)

    def noised(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        t = levels.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    def losses(self, network: Network, x0: Tensor, levels: Tensor, noise: Tensor,
               element_weight: Tensor | None = None) -> Tensor:
        out = network(self.noised(x0, noise, levels), levels * self.num_train_timesteps)
        return diffusion_loss(out.float(), (noise - x0).float(), flow_loss_weight(levels, self.weighting),
                              self.loss_type, element_weight)

    def bucket(self, levels: Tensor, buckets: int) -> Tensor:
        return (levels * buckets).long().clamp(0, buckets - 1)

    def bucket_names(self, buckets: int) -> list[str]:
        """``val/loss_t0.00-0.25`` ... (t from clean to noise)."""
        return [f"val/loss_t{k / buckets:.2f}-{(k + 1) / buckets:.2f}" for k in range(buckets)]

    # ------------------------------------------------------------------------------------------- sampling
    def grid(self, steps: int, *, spacing: str = "leading", kind: str = "timesteps", round_times: bool = False,
             finite: bool = True) -> Grid:
        """``kind="timesteps"``: diffusers' flow-matching grid (``FlowMatchEulerDiscreteScheduler``), t linear from
        1 to the shifted 1 / T, then shifted (the lower end twice under a fixed shift, as diffusers does); with
        ``round_times`` (the multistep solvers) the grid of diffusers' multistep schedulers with
        ``use_flow_sigmas``: the shifted ``1 - linspace(1, 1 / T, steps + 1)`` without its last point, so that it
        starts below t = 1 (their log-SNR steps need a finite start), whole time inputs (truncated, as there).
        ``"karras"`` / ``"exponential"``: those grids of sigma = t / (1 - t) between the same ends. ``spacing``
        does not apply."""
        if not 0 < steps:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if kind not in GRIDS:
            raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}")
        T = self.num_train_timesteps
        if round_times:
            ts = shift_times(1 - torch.linspace(1.0, 1.0 / T, steps + 1, dtype=torch.float64), self.shift)
            ts = ts.flip(0)[:-1]
        else:
            # diffusers' static shift also shifts the grid's lower end, its dynamic (Flux) one does not
            t_min = 1.0 / T if self.shift_setting == "auto" else shift_times(1.0 / T, self.shift)
            ts = shift_times(torch.linspace(1.0, t_min, steps, dtype=torch.float64), self.shift)
        if kind != "timesteps":  # between sigma(t_max) and sigma(t_min), both finite
            hi, lo = float(ts[0]), float(ts[-1])
            hi = min(hi, 1 - 1e-4)  # sigma(1) is infinite: start at t = 0.9999 (as diffusers' Karras flow grid)
            make = karras_sigmas if kind == "karras" else exponential_sigmas
            sigmas = make(lo / (1 - lo), hi / (1 - hi), steps)
            ts = sigmas / (1 + sigmas)
        sigmas = [FlowPath.sigma_at(float(t)) for t in ts] + [0.0]
        times = [float(t) * T for t in ts]
        if round_times:
            times = [float(math.floor(t)) for t in times]
        return Grid(sigmas, times, FlowPath, lambda sigma: FlowPath.t_of(sigma) * T)

    def denoiser(self, network: Network) -> Denoise:
        """The network called at its grid time (t · T), read as velocity: x0 = x - t v, eps = x + (1 - t) v."""

        def d(x: Tensor, sigma: float, t: float) -> tuple[Tensor, Tensor]:
            tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
            v = network(x, tt).to(x.dtype)
            s = FlowPath.t_of(sigma)
            return x - s * v, x + (1 - s) * v

        return d

    def level_at(self, sigma: float, batch: int, device: torch.device) -> Tensor:
        """t of ``sigma`` (0 once x is the final sample)."""
        return torch.full((batch,), FlowPath.t_of(sigma), dtype=torch.float32, device=device)

    # --------------------------------------------------------------------------------------------- export
    def settings(self) -> dict[str, Any]:
        return {"objective": self.name, "timestep_sampling": self.timestep_sampling, "loc": self.loc,
                "scale": self.scale, "mode_scale": self.mode_scale, "shift": self.shift_setting, **self.auto,
                "patch_size": self.patch_size, "num_train_timesteps": self.num_train_timesteps,
                "loss_type": self.loss_type, "weighting": self.weighting}

    def scheduler_config(self, spacing: str = "leading") -> dict[str, Any]:
        """diffusers' flow-matching scheduler config: the same grid, step for step (``shift="auto"``: its dynamic
        shifting, which a pipeline resolves from the image size as Flux's does)."""
        if self.shift_setting == "auto":
            a = self.auto
            return {"num_train_timesteps": self.num_train_timesteps, "shift": 1.0, "use_dynamic_shifting": True,
                    "base_shift": a["base_shift"], "max_shift": a["max_shift"],
                    "base_image_seq_len": a["base_seq_len"], "max_image_seq_len": a["max_seq_len"]}
        return {"num_train_timesteps": self.num_train_timesteps, "shift": self.shift, "use_dynamic_shifting": False}

    def diffusers_scheduler(self, sampler: str | None) -> str:
        """The diffusers class of ``sampler`` on this objective."""
        return "FlowMatchHeunDiscreteScheduler" if sampler == "heun" else "FlowMatchEulerDiscreteScheduler"
