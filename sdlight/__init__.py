"""sdlight: train Stable-Diffusion-style latent diffusion models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
