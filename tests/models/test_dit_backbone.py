"""DiT (PixArt-α's backbone) as sdlight's backbone: built from the config's parts with derived channels, trained and
sampled under DDPM (PixArt's objective, learned sigma included) and rectified flow, its configs composed, its
single-file weights under the reference's names (its diffusers export: tests/test_export_transformers.py)."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from sdlight.conditioning.concat import InpaintingConcat
from sdlight.diffusion import DDPM, Draws, NoiseSchedule, RectifiedFlow, sample_ddim, sample_euler
from sdlight.export import single_file
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.dit import DiT

from tests.conftest import compose_train
from tests.models.test_mmdit_backbone import assert_only_the_output_layer_learns_first
from tests.stages.conftest import CONTEXT_DIM, shapes_batch, tiny_conditioning, tiny_vae

# no in_channels: derived from the latents (and the concat stage), as `_partial_: true` configs do
FACTORY = partial(DiT, input_size=4, patch_size=2, out_channels=4, depth=2, hidden=32, num_heads=2,
                  context_dim=CONTEXT_DIM)


def dit_ldm(objective: str = "ddpm", **kwargs):
    if objective == "ddpm":
        process = dict(objective=DDPM(NoiseSchedule.make("linear")), sampler=partial(sample_ddim, steps=2))
    else:
        process = dict(objective=RectifiedFlow(), sampler=partial(sample_euler, steps=2))
    parts = dict(unet=FACTORY, first_stage=tiny_vae(), conditioning=tiny_conditioning("text"),
                 prediction_type=None, loss_type=None, loss_weighting=None, snr_gamma=None, image_size=16,
                 scale_factor=0.5)
    return build_latent_diffusion(**(parts | process | kwargs))


@pytest.mark.parametrize("objective, learn_sigma", [("ddpm", False), ("ddpm", True), ("rectified_flow", False)])
def test_trains_and_samples(objective, learn_sigma):
    torch.manual_seed(0)
    model = dit_ldm(objective, unet=partial(FACTORY, learn_sigma=learn_sigma))
    backbone = model.model.diffusion_model
    assert backbone.config["in_channels"] == 4 and model.size_multiple == 4 * 2  # VAE factor x patch size
    losses, _ = model.losses(shapes_batch(4), Draws(torch.Generator().manual_seed(0)), p_uncond=0.5)
    losses.mean().backward()
    assert torch.isfinite(losses).all()
    assert_only_the_output_layer_learns_first(backbone)  # PixArt's start: a zero output layer
    if learn_sigma:  # the variance half gets no gradient: sdlight's losses read the prediction half
        rows = backbone.final_layer.linear.weight.grad.unflatten(0, (2, 2, 8))
        assert rows[:, :, :4].abs().sum() > 0 and not rows[:, :, 4:].any()  # (p, p, channels, hidden)
    images = model.generate(["a red circle", "a blue square"], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    model.latent_shape_for(16, 24)  # non-square: PixArt-MS's stretched position table
    with pytest.raises(ValueError, match="multiples of 8"):
        model.latent_shape_for(16, 20)


def test_the_concat_channels_are_derived():
    model = dit_ldm(concat=InpaintingConcat(4), conditioning=None)
    assert model.model.diffusion_model.config["in_channels"] == 4 + 5
    assert model.model.diffusion_model.out_channels == 4


def test_single_file_keys_are_pixarts():
    model = dit_ldm()
    keys = set(single_file(model))
    assert {"model.diffusion_model.t_block.1.weight", "model.diffusion_model.y_embedder.y_proj.fc1.weight",
            "model.diffusion_model.blocks.1.cross_attn.kv_linear.weight", "model.diffusion_model.pos_embed",
            "model.diffusion_model.final_layer.scale_shift_table"} <= keys


def test_configs_compose(tmp_path):
    for objective in ("ddpm", "rectified_flow"):
        cfg = compose_train(["+experiment=quickstart_ldm", "model/unet=dit_tiny", f"model/objective={objective}"],
                            tmp_path)
        assert cfg.model.conditioning.context_dim == cfg.model.unet.context_dim
        assert isinstance(instantiate(cfg.model.unet), DiT)
    cfg = compose_train(["+experiment=quickstart_ldm", "model/unet=pixart_alpha_512"], tmp_path)
    with torch.device("meta"):
        pixart = instantiate(cfg.model.unet)
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.PixArtTransformer2DModel(sample_size=64, caption_channels=4096)  # PixArt-α 512's
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pixart) == count(theirs)  # PixArt-α's ~611M weights
