"""Per-timestep loss weights and the per-sample diffusion loss.

All three parametrisations measure the same error in different units. With ``snr = a / (1 - a)``:

    ||eps - eps_hat||^2 = snr * ||x0 - x0_hat||^2
    ||v - v_hat||^2     = (snr + 1) * ||x0 - x0_hat||^2
    ||x0 - x0_hat||^2   = 1 * ||x0 - x0_hat||^2

so a weighting scheme is best stated as a weight w(snr) on the x0 error, and divided by the factor of the
parametrisation in use. The kinds:

- ``simple``: weight 1 on the network's own error (DDPM's L_simple when predicting eps).
- ``min_snr``: w = min(snr, gamma) (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting"),
  which caps the weight of the nearly clean timesteps that dominate eps-prediction training.
- ``snr``: w = snr, the weighting that L_simple with eps-prediction puts on the x0 error, whatever the network
  predicts. The ELBO weights the x0 error by (SNR(t-1) - SNR(t)) / 2 (Kingma et al., 2021); ``snr`` keeps the
  SNR and drops that per-step difference, as L_simple does. It equals min_snr with gamma = inf.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .process import canonical_prediction_type

WEIGHTINGS = ("simple", "min_snr", "snr")


def loss_weight(snr: Tensor, prediction_type: str = "eps", kind: str = "simple", gamma: float = 5.0) -> Tensor:
    """Weight (same shape as ``snr``) that multiplies the per-sample loss of the network's own output."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}; expected one of {WEIGHTINGS}")
    if kind == "simple":
        return torch.ones_like(snr)
    w = snr.clamp(max=gamma) if kind == "min_snr" else snr
    pred = canonical_prediction_type(prediction_type)
    if pred == "eps":
        # w / snr -> 1 as snr -> 0 (both kinds), which keeps zero-terminal-SNR schedules finite
        return torch.where(snr > 0, w / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if pred == "v":
        return w / (snr + 1)
    return w


def diffusion_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None, loss_type: str = "l2",
                   element_weight: Tensor | None = None) -> Tensor:
    """Per-sample loss (B,): the mean over all non-batch dims of the l2/l1 error, times ``weight`` (B,). With
    ``element_weight`` (broadcast to the error; 1 on the elements that count, 0 elsewhere: a patch-masked step's
    kept patches) the mean is over the weighted elements of each sample."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # reduce in float32 even under mixed precision
    pred, target = pred.to(dtype), target.to(dtype)
    if loss_type == "l2":
        err = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        err = F.l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'l2' or 'l1'")
    if element_weight is None:
        loss = err.flatten(1).mean(dim=1)
    else:  # each sample's own count: a mean over its kept elements, whatever share of them it keeps
        element_weight = element_weight.to(dtype).expand_as(err).flatten(1)
        loss = (err.flatten(1) * element_weight).sum(dim=1) / element_weight.sum(dim=1)
    return loss if weight is None else loss * weight.to(loss)
