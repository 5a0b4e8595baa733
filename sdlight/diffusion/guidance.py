"""Classifier-free guidance (Ho & Salimans, 2022) as a denoiser wrapper for the samplers.

A negative prompt is just a different ``uncond``; the null condition (empty text, null class) is whatever the
conditioning module produced for dropped captions during training.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Cond = Mapping[str, Tensor | None]
ModelFn = Callable[[Tensor, Tensor, Cond], Tensor]


def rescale_guidance(guided: Tensor, cond_out: Tensor, rescale: float) -> Tensor:
    """Guidance rescale phi of Lin et al. (2023), Sec. 3.4, as diffusers' ``rescale_noise_cfg``.

    Matches the per-sample standard deviation of the guided output to the conditional one, then mixes:
    ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``. It counters the over-exposure of large
    guidance scales, most of all with zero-terminal-SNR schedules.
    """
    if rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _batch_conds(uncond: Cond, cond: Cond, batch: int) -> dict[str, Tensor | None]:
    """Each entry of uncond and cond stacked as [uncond; cond]; a batch-1 entry is broadcast to the batch."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Tensor | None] = {}
    for key in cond:
        u, c = uncond[key], cond[key]
        if u is None or c is None:
            if (u is None) != (c is None):
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or both be None")
            out[key] = None
            continue
        u = u.expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u
        c = c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 else c
        out[key] = torch.cat([u, c.to(u.dtype)])
    return out


def cfg_denoiser(
    model_fn: ModelFn, cond: Cond, uncond: Cond | None, scale: float, rescale: float = 0.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise(x, t) = uncond_out + scale * (cond_out - uncond_out)``, optionally guidance-rescaled.

    ``model_fn(x, t, cond)`` takes a dict of conditioning tensors (e.g. ``{"context": (B, L, D), "y": (B,),
    "concat": (B, C, H, W)}``; values may be None). Both branches run in one forward pass of batch 2B. With
    ``scale == 1`` (or no ``uncond``) only the conditional pass runs.
    """

    batched: dict[int, dict[str, Tensor | None]] = {}  # built once per batch size: the same tensors every step

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0 or uncond is None:
            return model_fn(x, t, cond)
        conds = batched.get(x.shape[0])
        if conds is None:
            conds = batched[x.shape[0]] = _batch_conds(uncond, cond, x.shape[0])
        out_uncond, out_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), conds).chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, rescale)

    return denoise
