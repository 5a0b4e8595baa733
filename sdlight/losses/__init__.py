"""Training losses: LPIPS perceptual distance and the KL-autoencoder loss (plain torch)."""

from sdlight.losses.autoencoder import AutoencoderLoss, hinge_d_loss, vanilla_d_loss
from sdlight.losses.lpips import LPIPS

__all__ = ["LPIPS", "AutoencoderLoss", "hinge_d_loss", "vanilla_d_loss"]
