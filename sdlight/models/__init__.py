"""Models in plain torch, composed of the building blocks (`sdlight.nn`, `sdlight.conditioning`) and the
diffusion math (`sdlight.diffusion`): what the Lightning stages train and the sampling tools run."""

from .latent_diffusion import DiffusionWrapper, LatentDiffusionModel

__all__ = ["DiffusionWrapper", "LatentDiffusionModel"]
