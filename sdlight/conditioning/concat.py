"""Conditioning concatenated to the UNet's input channels: inpainting masks and low-resolution images.

Stable Diffusion's inpainting models see ``[z_t, mask, z(masked image)]`` (9 channels for a 4-channel VAE); its
upscaler sees ``[z_t, low-res image]``. These modules build those extra channels from a batch; the UNet's
``in_channels`` must be ``latent_channels + channels``. Unlike captions they are never dropped for guidance:
both branches of classifier-free guidance see the same image evidence, as in SD's pipelines.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlight.diffusion.draw import Draws, as_draws

Encode = Callable[[Tensor], Tensor]  # images in [-1, 1] -> scaled latents


def random_masks(batch: int, size: int, draws: Draws | torch.Generator | None = None, p_full: float = 0.25,
                 min_frac: float = 0.1, max_frac: float = 0.6, device: torch.device | str | None = None) -> Tensor:
    """(B, 1, size, size) masks, 1 = to generate: a random box covering ``min_frac``..``max_frac`` of each side,
    or (with probability ``p_full``) the whole image, so the model also learns plain text-to-image."""
    u = as_draws(draws).uniform((batch, 5), device="cpu")
    masks = torch.zeros(batch, 1, size, size)
    for i, (full, fh, fw, y, x) in enumerate(u.tolist()):
        if full < p_full:
            masks[i] = 1
            continue
        h = max(1, round(size * (min_frac + (max_frac - min_frac) * fh)))
        w = max(1, round(size * (min_frac + (max_frac - min_frac) * fw)))
        top, left = int(y * (size - h + 1)), int(x * (size - w + 1))
        masks[i, :, top:top + h, left:left + w] = 1
    return masks.to(device) if device is not None else masks


class InpaintingConcat(nn.Module):
    """``[mask at latent size, z(image with the masked region blanked)]``: 1 + latent_channels channels."""

    batch_key = "mask"

    def __init__(self, latent_channels: int = 4, p_full: float = 0.25, min_frac: float = 0.1, max_frac: float = 0.6):
        super().__init__()
        self.channels = 1 + latent_channels
        self.p_full, self.min_frac, self.max_frac = p_full, min_frac, max_frac

    def training_inputs(self, batch: dict, draws: Draws | torch.Generator | None = None) -> dict[str, Tensor]:
        """The batch's own ``mask`` if it has one, else random boxes (the usual way to train inpainting)."""
        image = batch["image"]
        mask = batch.get("mask")
        if mask is None:
            mask = random_masks(image.shape[0], image.shape[-1], draws, self.p_full, self.min_frac,
                                self.max_frac, device=image.device)
        return {"image": image, "mask": mask.to(image)}

    def forward(self, image: Tensor, mask: Tensor, encode: Encode, draws: Draws | torch.Generator | None = None
                ) -> Tensor:
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size")
        masked = image * (mask < 0.5)  # the region to generate becomes 0 (mid grey), as SD's inpainting models
        z = encode(masked)
        return torch.cat([F.interpolate(mask, size=z.shape[-2:], mode="nearest"), z], dim=1)


class LowResConcat(nn.Module):
    """A low-resolution image, rearranged losslessly to the latent grid (pixel-unshuffle) — 3·r² channels for a
    low-res image r times the latent size — with optional Gaussian noise augmentation of strength
    ``noise_level`` (SD's upscaler trains and samples with a noisy low-res input for robustness)."""

    batch_key = "lowres"

    def __init__(self, image_size: int = 32, lowres_size: int = 16, downsample_factor: int = 4,
                 noise_level: float = 0.0):
        super().__init__()
        latent = image_size // downsample_factor
        if lowres_size % latent:
            raise ValueError(f"lowres_size {lowres_size} must be a multiple of the latent size {latent}")
        self.lowres_size, self.ratio, self.noise_level = lowres_size, lowres_size // latent, noise_level
        self.channels = 3 * self.ratio**2

    def degrade(self, image: Tensor) -> Tensor:
        """The low-res input made from a full-res image: area downsampling (an ideal box filter)."""
        return F.interpolate(image, size=(self.lowres_size, self.lowres_size), mode="area")

    def training_inputs(self, batch: dict, draws: Draws | torch.Generator | None = None) -> dict[str, Tensor]:
        lowres = batch.get("lowres")
        return {"lowres": self.degrade(batch["image"]) if lowres is None else lowres}

    def forward(self, lowres: Tensor, encode: Encode | None = None, draws: Draws | torch.Generator | None = None
                ) -> Tensor:
        if lowres.shape[-1] != self.lowres_size or lowres.shape[-2] != self.lowres_size:
            lowres = F.interpolate(lowres, size=(self.lowres_size, self.lowres_size), mode="bicubic",
                                   align_corners=False)
        if self.noise_level > 0:
            noise = as_draws(draws).normal(lowres.shape, device=lowres.device).to(lowres)
            lowres = lowres + self.noise_level * noise
        return F.pixel_unshuffle(lowres, self.ratio)
