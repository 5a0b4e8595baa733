"""Discrete-time noise schedules of the variance-preserving forward process.

Everything is kept in float64: alphas_cumprod near t = T is a product of a thousand numbers close to one,
and the SNR at both ends spans about eight decades, so float32 loses digits that the samplers then amplify.
`at` casts to the working dtype only at the point of use.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine", "quadratic", "sigmoid")

# Beta ranges used when a caller does not give one: DDPM's for the pixel-space schedules, Stable Diffusion's
# for scaled_linear. cosine has no range (it is defined through alpha_bar).
DEFAULT_BETA_RANGE = {
    "linear": (1e-4, 2e-2),
    "scaled_linear": (0.00085, 0.012),
    "cosine": (1e-4, 2e-2),
    "quadratic": (1e-4, 2e-2),
    "sigmoid": (1e-4, 2e-2),
}


def make_betas(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Betas (float64, shape (num_timesteps,)) of a named schedule.

    - linear: DDPM, ``linspace(beta_start, beta_end)``.
    - scaled_linear: Stable Diffusion (CompVis calls it "linear"), ``linspace(sqrt(start), sqrt(end)) ** 2``.
    - quadratic: the same functional form, named as in the DDPM literature and used with DDPM's beta range.
    - cosine: Nichol & Dhariwal (2021), ``alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)``, betas clipped at 0.999.
    - sigmoid: GeoDiff, ``sigmoid(linspace(-6, 6))`` scaled to ``[beta_start, beta_end]``.
    """
    n = num_timesteps
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=f64)
    if name in ("scaled_linear", "quadratic"):
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=f64) ** 2
    if name == "cosine":
        steps = torch.arange(n + 1, dtype=f64) / n
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        # the last beta is exactly 1 without the clip (alpha_bar(T) = 0), which the samplers cannot invert
        return betas.clamp(max=0.999)
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=f64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that its last value is 0 and its first is unchanged.

    Algorithm 1 of Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed": training
    then sees pure noise at t = T, as sampling does. Pair it with v-prediction (eps is unidentifiable at SNR 0).
    """
    betas = betas.to(torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def at(values: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
    """Gather ``values[t]`` per sample and shape it (B, 1, 1, ...) to broadcast against ``x``.

    The result has x's dtype and device; ``t`` is a (B,) integer tensor, a 0-d tensor or an int.
    """
    if not torch.is_tensor(t):
        t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    t = t.to(device=x.device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    # cast before moving: some backends (MPS) have no float64
    out = values.to(dtype=x.dtype).to(x.device)[t]
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


@dataclass(eq=False)
class NoiseSchedule:
    """A discrete VP noise schedule: ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``, t in [0, T).

    Build it from betas (any dtype; stored as float64) or with `NoiseSchedule.make`. The derived tables are
    computed once. ``sigmas`` are k-diffusion's noise levels ``sqrt((1 - alpha_bar) / alpha_bar)`` (the
    variance-exploding view of the same process).
    """

    betas: Tensor
    alphas_cumprod: Tensor = field(init=False)
    sqrt_alphas_cumprod: Tensor = field(init=False)
    sqrt_one_minus_alphas_cumprod: Tensor = field(init=False)
    sigmas: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.betas = torch.as_tensor(self.betas).to(torch.float64)
        if self.betas.ndim != 1:
            raise ValueError(f"betas must be 1-d, got shape {tuple(self.betas.shape)}")
        if (self.betas <= 0).any() or (self.betas > 1).any():
            raise ValueError("betas must lie in (0, 1]")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # inf at zero terminal SNR

    @classmethod
    def make(
        cls,
        name: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        cosine_s: float = 8e-3,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """A named schedule (see `make_betas`); a beta range left out takes that schedule's usual one."""
        default_start, default_end = DEFAULT_BETA_RANGE.get(name, (1e-4, 2e-2))
        betas = make_betas(
            name,
            num_timesteps,
            default_start if beta_start is None else beta_start,
            default_end if beta_end is None else beta_end,
            cosine_s,
        )
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    def snr(self, t: Tensor | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at integer timesteps ``t`` (same shape as t)."""
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        t = torch.as_tensor(t, dtype=torch.long)
        return snr.to(dtype).to(t.device)[t]

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same schedule with its tables on ``device`` (float64 kept), so `at` does not copy per call."""
        other = NoiseSchedule(self.betas)
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sigmas"):
            setattr(other, name, getattr(self, name).to(device))
        return other
