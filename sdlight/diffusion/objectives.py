"""Training objectives: what the network is trained to output from which noisy input, and how samplers read it.

An objective is the diffusion process of a model, validated once when it is built. For training it draws each
sample's noise level, noises the latents, calls the network and weights each sample's error; for sampling it gives
the samplers their grid of noise levels and turns the network into a denoiser; for export it names its diffusers
scheduler. The network is any ``network(x, t) -> output`` (conditioning and guidance closed over by the caller).
Every objective implements the same methods::

    levels = objective.draw_levels(n, draws, device)               # one noise level per sample
    losses = objective.losses(network, x0, levels, noise)          # (B,) weighted per-sample losses
    losses = objective.losses(..., element_weight=w)               # each the mean over the elements w marks
    grid   = objective.grid(steps, spacing=..., kind=...)          # where a sampler goes
    x0, eps = objective.denoiser(network)(x, sigma, t)             # the network read at a grid point

Grids are in noise-to-signal ratios ``sigma`` (k-diffusion's): ``x = signal · (x0 + sigma · eps)``, the grid's
``path`` giving ``signal`` and ``noise = signal · sigma`` of a sigma. Samplers need nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from abc import ABC, abstractmethod
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from sdlight.errors import UsageError

from .grids import Grid, VPPath, finite_terminal, make_sigmas, nearest_timestep, sigma_to_t
from .process import DIFFUSERS_PREDICTION_TYPES, canonical_prediction_type, q_sample, training_target
from .schedules import NoiseSchedule
from .weighting import WEIGHTINGS, diffusion_loss, loss_weight

Network = Callable[[Tensor, Tensor], Tensor]
Denoise = Callable[[Tensor, float, float], tuple[Tensor, Tensor]]
LOSS_TYPES = ("l2", "l1")


def setting_number(name: str, value: Any, low: float = 0.0, strict: bool = True, extra: str = "") -> float:
    """``model.objective.<name>`` as a float, or one line saying it must be a number above (or from) ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > low if strict else value >= low):
        raise UsageError(f"model.objective.{name} must be a number {'>' if strict else '>='} {low:g}{extra}, "
                         f"got {value!r}")
    return float(value)


def setting_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise UsageError(f"model.objective.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    return loss_type


class Objective(ABC):
    """The interface every objective implements (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def draw_levels(self, n: int, draws: Any, device: torch.device | str | None = None) -> Tensor:
        """One training noise level per sample, drawn through ``draws`` (:class:`~sdlight.diffusion.Draws`)."""

    @abstractmethod
    def noised(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """x at ``levels`` (the forward process)."""

    @abstractmethod
    def losses(self, network: Network, x0: Tensor, levels: Tensor, noise: Tensor,
               element_weight: Tensor | None = None) -> Tensor:
        """(B,) weighted per-sample losses of ``network`` on ``x0`` noised to ``levels`` with ``noise``; each the
        mean error over all of x0's elements, or over those ``element_weight`` (x0's shape, 1 / 0) marks, before
        the objective's per-sample weight (`diffusion_loss`)."""

    @abstractmethod
    def grid(self, steps: int, *, spacing: str = "leading", kind: str = "timesteps", round_times: bool = False,
             finite: bool = True) -> Grid:
        """The ``steps``-step grid of a sampler (``kind`` and ``spacing`` its options)."""

    @abstractmethod
    def denoiser(self, network: Network) -> Denoise:
        """``d(x, sigma, t) -> (x0, eps)``: the network read at a grid point."""

    @abstractmethod
    def level_at(self, sigma: float, batch: int, device: torch.device) -> Tensor:
        """The noise level of x at grid ``sigma``, as ``noised`` takes it (what sampler callbacks receive)."""

    @abstractmethod
    def bucket(self, levels: Tensor, buckets: int) -> Tensor:
        """Validation-loss bucket (0 .. buckets - 1) of each level, from clean to pure noise."""

    @abstractmethod
    def bucket_names(self, buckets: int) -> list[str]:
        """The logged names of those buckets."""

    @abstractmethod
    def scheduler_config(self, spacing: str = "leading") -> dict[str, Any]:
        """The diffusers scheduler config of this process (without the sampler's own keys)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Plain values that rebuild this objective (`objective_from_settings`): what exported files record."""

    def diffusers_scheduler(self, sampler: str | None) -> str | None:
        """The diffusers scheduler class of ``sampler`` on this process; None: the DDPM family's table."""
        return None

    def fit_latent_size(self, height: int, width: int) -> None:
        """Resolves resolution-dependent settings for latents of ``height`` x ``width`` (at build time)."""


class DDPM(Objective):
    """The DDPM family (Ho et al., 2020): a discrete variance-preserving ``schedule`` of T timesteps; the network
    predicts ``prediction_type`` (eps | v | x0, or diffusers' epsilon | v_prediction | sample) at an integer
    timestep; per-sample ``loss_type`` (l2 | l1) error weighted by ``weighting`` (simple | min_snr | snr, see
    :mod:`weighting`) with ``snr_gamma``. Training levels are timesteps drawn uniformly."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "eps", loss_type: str = "l2",
                 weighting: str = "simple", snr_gamma: float = 5.0):
        try:  # a mistake in a config: one line, naming the setting (UsageError is a ValueError)
            self.prediction_type = canonical_prediction_type(prediction_type)
        except ValueError as err:
            raise UsageError(f"model: {err}") from None
        if loss_type not in LOSS_TYPES:
            raise UsageError(f"model: unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
        if weighting not in WEIGHTINGS:
            raise UsageError(f"model: unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not snr_gamma > 0:
            raise UsageError(f"model: snr_gamma must be a number > 0, got {snr_gamma!r}")
        self.schedule, self.loss_type, self.weighting, self.snr_gamma = schedule, loss_type, weighting, snr_gamma
        self._here = schedule  # the tables on the device training runs on, moved once

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def _schedule_for(self, x: Tensor) -> NoiseSchedule:
        if self._here.betas.device != x.device:
            self._here = self.schedule.to(x.device)
        return self._here

    # ------------------------------------------------------------------------------------------- training
    def draw_levels(self, n: int, draws: Any, device: torch.device | str | None = None) -> Tensor:
        return draws.integers(self.num_timesteps, (n,), device)

    def noised(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        return q_sample(x0, levels, noise, self._schedule_for(x0))

    def losses(self, network: Network, x0: Tensor, levels: Tensor, noise: Tensor,
               element_weight: Tensor | None = None) -> Tensor:
        schedule = self._schedule_for(x0)
        out = network(q_sample(x0, levels, noise, schedule), levels)
        target = training_target(x0, noise, levels, schedule, self.prediction_type)
        weight = loss_weight(schedule.snr(levels), self.prediction_type, self.weighting, self.snr_gamma)
        return diffusion_loss(out.float(), target.float(), weight, self.loss_type, element_weight)

    def bucket(self, levels: Tensor, buckets: int) -> Tensor:
        return (levels * buckets // self.num_timesteps).clamp(max=buckets - 1)

    def bucket_names(self, buckets: int) -> list[str]:
        """``val/loss_tLLLL-HHHH`` (inclusive timestep bounds)."""
        bounds = [math.ceil(k * self.num_timesteps / buckets) for k in range(buckets + 1)]
        return [f"val/loss_t{bounds[k]:04d}-{bounds[k + 1] - 1:04d}" for k in range(buckets)]

    # ------------------------------------------------------------------------------------------- sampling
    def grid(self, steps: int, *, spacing: str = "leading", kind: str = "timesteps", round_times: bool = False,
             finite: bool = True) -> Grid:
        """``kind="timesteps"``: the sigmas of `make_timesteps` (diffusers' ``timestep_spacing``); ``"karras"`` and
        ``"exponential"``: those grids between the schedule's smallest and largest sigma, called at fractional
        timesteps (whole ones with ``round_times``, as diffusers' DPM-Solver and UniPC do). ``finite`` raises a
        zero terminal SNR to 2^-24, which sigma-space steps need (DDPM's and DDIM's posteriors do not)."""
        sigmas, times = make_sigmas(self.schedule, steps, spacing, kind, round_times, finite)
        schedule = finite_terminal(self.schedule) if finite else self.schedule
        return Grid(sigmas.tolist(), times.tolist(), VPPath, partial(_time_of, schedule))

    def denoiser(self, network: Network) -> Denoise:
        """The network called at training timestep ``t`` (a (B,) long tensor when whole, float between training
        timesteps, as diffusers' Heun and Euler do on Karras grids), its output converted with the grid's
        ``sigma`` (not the schedule's at a rounded t), as diffusers does."""
        kind = self.prediction_type

        def d(x: Tensor, sigma: float, t: float) -> tuple[Tensor, Tensor]:
            whole = float(t).is_integer()
            tt = torch.full((x.shape[0],), int(t) if whole else float(t), device=x.device,
                            dtype=torch.long if whole else torch.float32)
            out = network(x, tt).to(x.dtype)
            signal, noise = VPPath.scales(sigma)
            if kind == "eps":
                return (x - noise * out) / signal, out
            if kind == "v":
                return signal * x - noise * out, signal * out + noise * x
            return out, (x - signal * out) / noise

        return d

    def level_at(self, sigma: float, batch: int, device: torch.device) -> Tensor:
        """The training timestep whose sigma is nearest to ``sigma`` in log space; -1 for sigma = 0 (clean)."""
        return torch.full((batch,), nearest_timestep(sigma, self.schedule), dtype=torch.long, device=device)

    # --------------------------------------------------------------------------------------------- export
    def settings(self) -> dict[str, Any]:
        """The schedule is the model's own (its buffers, model/schedule): not recorded here."""
        return {"objective": self.name, "prediction_type": self.prediction_type, "loss_type": self.loss_type,
                "weighting": self.weighting, "snr_gamma": float(self.snr_gamma), "num_timesteps": self.num_timesteps}

    def scheduler_config(self, spacing: str = "leading") -> dict[str, Any]:
        """diffusers' names for the schedule (``beta_schedule`` when it is one of theirs, else the betas) and the
        prediction type."""
        betas = self.schedule.betas
        n, start, end = len(betas), float(betas[0]), float(betas[-1])
        config = {"num_train_timesteps": n, "beta_start": start, "beta_end": end, "beta_schedule": "linear",
                  "trained_betas": None, "prediction_type": DIFFUSERS_PREDICTION_TYPES[self.prediction_type],
                  "steps_offset": 1, "timestep_spacing": spacing}
        f64 = torch.float64
        named = {"linear": torch.linspace(start, end, n, dtype=f64),
                 "scaled_linear": torch.linspace(start**0.5, end**0.5, n, dtype=f64) ** 2}
        for schedule, candidate in named.items():
            if torch.allclose(candidate, betas, rtol=1e-6, atol=0):
                config["beta_schedule"] = schedule
                return config
        config["trained_betas"] = betas.tolist()  # cosine, sigmoid, zero terminal SNR: the exact table
        return config


def _time_of(schedule: NoiseSchedule, sigma: float) -> float:
    """The fractional training timestep of ``sigma`` (`sigma_to_t`)."""
    return float(sigma_to_t(torch.tensor([sigma], dtype=torch.float64), schedule)[0])


def objective_from_settings(settings: dict[str, Any], schedule: NoiseSchedule | None = None) -> Objective:
    """The objective that ``settings`` (`Objective.settings`) describe; DDPM's on ``schedule``."""
    from . import OBJECTIVES

    values = dict(settings)
    name = values.pop("objective", None)
    if name not in OBJECTIVES:
        raise UsageError(f"a recorded objective {name!r} is none of {', '.join(OBJECTIVES)}")
    if name != DDPM.name:
        return OBJECTIVES[name](**values)
    steps = values.pop("num_timesteps", None)
    if schedule is None or (steps is not None and schedule.num_timesteps != steps):
        raise UsageError(f"the weights were trained with DDPM on {steps} timesteps: give model/objective=ddpm and a "
                         "model/schedule of that length")
    return DDPM(schedule, **values)
