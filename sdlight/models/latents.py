"""Latent diffusion from cached latents: the batch entries of a latent cache (``sdlight.encode``), the posterior they
describe, and the check that a cache was made by the very autoencoder (and text encoder) of the model.

A batch carries either ``image`` or the posterior's ``latent_mean`` / ``latent_std`` (and optionally a cached
cross-attention ``context``); :func:`posterior_of` turns either into the same distribution, so everything
after it (posterior sample, scale factor, noise, loss) is one code path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.conditioning import Conditioner, drop_mask
from sdlight.diffusion.draw import Draws
from sdlight.errors import UsageError
from sdlight.nn.distributions import DiagonalGaussianDistribution

LATENT_MEAN, LATENT_STD, CONTEXT, TEXT = "latent_mean", "latent_std", "context", "text"


def weights_sha256(module: nn.Module, extra: Mapping[str, Any] | None = None) -> str:
    """sha256 over the state dict (sorted keys: name, dtype, shape, bytes) and ``extra`` settings: equal exactly
    when two modules compute the same function (for a given architecture), whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    for key, value in sorted((extra or {}).items()):
        digest.update(f"{key}={value!r};".encode())
    return digest.hexdigest()


def text_encoder_sha256(encoder: nn.Module) -> str:
    """The weights plus the settings that change the context without changing weights (layer, length)."""
    return weights_sha256(encoder, {"class": type(encoder).__name__, "layer": getattr(encoder, "layer", None),
                                    "max_length": getattr(encoder, "max_length", None)})


def is_frozen(module: nn.Module) -> bool:
    """Has parameters and none of them trains (a pretrained text tower; not a learned encoder)."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def has_latents(batch: Mapping[str, Any]) -> bool:
    return LATENT_MEAN in batch


def batch_size_of(batch: Mapping[str, Any]) -> int:
    return len(batch[LATENT_MEAN] if has_latents(batch) else batch["image"])


def posterior_of(batch: Mapping[str, Any], first_stage: nn.Module, device: torch.device | None = None
                 ) -> DiagonalGaussianDistribution:
    """The autoencoder's posterior of the batch: encoded from ``image``, or rebuilt from the cached mean and std
    (in float32; its ``sample`` then draws the same noise as the encoded posterior's would)."""
    if not has_latents(batch):
        return first_stage.encode(batch["image"].to(device) if device is not None else batch["image"])
    mean, std = (batch[k].to(device=device, dtype=torch.float32) for k in (LATENT_MEAN, LATENT_STD))
    # logvar = 2 log std; the distribution clamps it to [-30, 20] as it does the encoder's
    return DiagonalGaussianDistribution(torch.cat([mean, 2.0 * torch.log(std)], dim=1))


def check_cache(manifest: Mapping[str, Any], first_stage: nn.Module, conditioner: Conditioner, has_concat: bool,
                first_stage_ckpt: str | None = None) -> bool:
    """Refuses a cache made by another autoencoder (or with another frozen text encoder's contexts), and models
    that need images; returns whether the cached contexts can replace the model's text encoder (its only one)."""
    made_by = manifest.get("first_stage", {})
    ours = weights_sha256(first_stage)
    if made_by.get("sha256") != ours:
        raise UsageError(
            f"data.root={manifest.get('root', '?')} holds latents of another autoencoder: the cache was made with "
            f"{made_by.get('ckpt', '?')} (sha256 {str(made_by.get('sha256'))[:16]}…) but model.first_stage is "
            f"{first_stage_ckpt or 'a different checkpoint'} (sha256 {ours[:16]}…). Encode the data again with "
            "this model's autoencoder (python -m sdlight.encode ckpt=...), or set model.first_stage.ckpt to the "
            "cache's one")
    if has_concat:
        raise UsageError("model.concat (inpainting / super-resolution) builds its inputs from images, which "
                         "data=latents does not hold: train such models on image data")
    cached = manifest.get("text_encoder")
    cond_stage = conditioner.single
    # the cache holds the contexts of the captions (its TEXT entry); a trained encoder reads the captions instead
    if not cached or cond_stage is None or not is_frozen(cond_stage) or cond_stage.input_key != TEXT:
        return False
    ours = text_encoder_sha256(cond_stage)
    if cached.get("sha256") != ours:
        raise UsageError(
            f"data.root={manifest.get('root', '?')} holds text contexts of another text encoder (sha256 "
            f"{str(cached.get('sha256'))[:16]}…, {cached.get('class')}) than model.conditioning (sha256 "
            f"{ours[:16]}…): encode again with this model's text encoder, or without encode.text")
    return True


class CachedContexts:
    """The cross-attention contexts of a batch from the cache, with conditioning dropout to the frozen encoder's
    null context (computed once: it is the same for every sample)."""

    def __init__(self) -> None:
        self.null: Tensor | None = None

    def __call__(self, encoder: nn.Module, batch: Mapping[str, Any], p_uncond: float | None,
                 draws: Draws | torch.Generator | None, device: torch.device) -> Tensor:
        """``p_uncond``: as in ``LatentDiffusionModel.losses`` (None drops nothing; the encoder's own rate first)."""
        context = batch[CONTEXT].to(device=device, dtype=torch.float32)
        rate = 0.0 if p_uncond is None else p_uncond if encoder.drop_rate is None else encoder.drop_rate
        if rate <= 0:
            return context
        if self.null is None or self.null.device != device:
            with torch.no_grad():
                self.null = encoder([""]).to(device=device, dtype=torch.float32)
        # the same draw as the encoder's drop() on captions: cached and encoded runs drop the same samples
        mask = drop_mask(len(context), rate, draws).to(device).view(-1, 1, 1)
        return torch.where(mask, self.null, context)
