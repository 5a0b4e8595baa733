"""The denoiser wrapper: a discrete-time eps / v / x0 model seen as ``x0_hat(x, sigma)``.

Samplers over a sigma grid (see `grids`) call the model through this one conversion instead of each converting
the parametrisation itself, as k-diffusion's ``DiscreteEpsDDPMDenoiser`` does. ``x`` is in the
variance-preserving scale (``x = alpha x0 + sigma_vp eps`` with ``alpha = 1 / sqrt(1 + sigma^2)`` and
``sigma_vp = sigma alpha``), which is the scale the model was trained on and the one callbacks see; k-diffusion's
variance-exploding ``x / alpha`` is a factor away.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .process import canonical_prediction_type

Denoiser = Callable[[Tensor, Tensor], Tensor]
X0Denoiser = Callable[[Tensor, float, float], Tensor]


def x0_denoiser(denoise: Denoiser, prediction_type: str = "eps") -> X0Denoiser:
    """``d(x, sigma, t) -> x0_hat``: calls ``denoise(x, t)`` at training timestep ``t`` and converts its output.

    ``t`` is passed as a (B,) long tensor when it is whole and as float otherwise (Heun and Euler on a Karras grid
    call the model between training timesteps, as diffusers does; the sinusoidal embedding takes either). The
    conversion uses the grid's ``sigma``, not the schedule's sigma at a rounded ``t``, again as diffusers does.
    """
    kind = canonical_prediction_type(prediction_type)

    def d(x: Tensor, sigma: float, t: float) -> Tensor:
        whole = float(t).is_integer()
        tt = torch.full((x.shape[0],), int(t) if whole else float(t), device=x.device,
                        dtype=torch.long if whole else torch.float32)
        out = denoise(x, tt).to(x.dtype)
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        if kind == "eps":
            return (x - (sigma * alpha) * out) / alpha
        if kind == "v":
            return alpha * x - (sigma * alpha) * out
        return out

    return d
