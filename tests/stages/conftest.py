"""Fixtures of the stage tests: a fake stage-1 checkpoint and tiny latent diffusion models."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sdlight.conditioning import AttributeEmbedder, ClassEmbedder, LearnedTextEncoder, NoConditioning
from sdlight.data.shapes import NUM_CLASSES, ShapesDataset, attribute_vocab_sizes
from sdlight.diffusion import NoiseSchedule
from sdlight.diffusion.samplers import sample_ddim
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.unet import UNetModel
from sdlight.stages.diffusion import LatentDiffusion

SIZE = 16  # pixels; the f=4 autoencoder gives 4x4x4 latents
CONTEXT_DIM = 32
VAE = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4,
           resolution=32)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE)


def save_stage1_checkpoint(ae: AutoencoderKL, path: Path) -> Path:
    """A checkpoint shaped like one of stage 1: weights plus the architecture in its hyperparameters."""
    torch.save({"state_dict": ae.state_dict(), "hyper_parameters": {"autoencoder_config": ae.config}}, path)
    return path


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory) -> Path:
    """A random-weight stage-1 checkpoint of the quickstart VAE's architecture (32 px → 8x8x4)."""
    return save_stage1_checkpoint(tiny_vae(), tmp_path_factory.mktemp("stage1") / "vae.ckpt")


def tiny_unet(context_dim: int | None = CONTEXT_DIM, seed: int = 0, **kwargs) -> UNetModel:
    """A small UNet whose zero-initialised layers (output convs, transformer proj_out) are made random: at
    initialisation the context would otherwise have no effect at all, and conditioning tests could not fail."""
    torch.manual_seed(seed)
    config = dict(image_size=SIZE // 4, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=[1, 2], channel_mult=[1, 2], num_head_channels=16,
                  use_spatial_transformer=context_dim is not None, use_linear_in_transformer=True,
                  transformer_depth=1, context_dim=context_dim, legacy=False)
    unet = UNetModel(**{**config, **kwargs})
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return unet


def tiny_conditioning(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "text":
        return LearnedTextEncoder(max_length=16, width=32, layers=1, heads=2, context_dim=CONTEXT_DIM)
    if kind == "class":
        return ClassEmbedder(NUM_CLASSES, CONTEXT_DIM)
    if kind == "attributes":
        return AttributeEmbedder(attribute_vocab_sizes(1), CONTEXT_DIM)
    if kind == "none":
        return NoConditioning()
    raise ValueError(kind)


def tiny_ldm(conditioning: str | torch.nn.Module = "text", first_stage: torch.nn.Module | None = None,
             seed: int = 0, lr: float = 1e-3, **kwargs) -> LatentDiffusion:
    """A LatentDiffusion on SIZE px with a random tiny VAE, UNet and condition encoder; kwargs go to the module."""
    cond = tiny_conditioning(conditioning, seed) if isinstance(conditioning, str) else conditioning
    unet = tiny_unet(cond.context_dim, seed)
    defaults = dict(schedule=NoiseSchedule.make("linear", 1000, 1e-4, 2e-2),
                    optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
                    sampler=partial(sample_ddim, steps=3), image_size=SIZE, scale_factor=0.5,
                    sample_every_n_steps=0, ema_decay=0.99, p_uncond=0.0)
    return LatentDiffusion(unet=unet, conditioning=cond, first_stage=first_stage or tiny_vae(seed),
                           **{**defaults, **kwargs})


def shapes_loader(n: int = 8, batch_size: int = 4, split: str = "train", shuffle: bool = False) -> DataLoader:
    """Seeded shapes at SIZE px with every condition entry (text, label, attributes)."""
    return DataLoader(ShapesDataset(split, n, image_size=SIZE), batch_size=batch_size, shuffle=shuffle)


def shapes_batch(n: int = 4, split: str = "train") -> dict:
    return next(iter(shapes_loader(n, n, split)))


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=str(tmp_path))
    return L.Trainer(**{**defaults, **kwargs})
