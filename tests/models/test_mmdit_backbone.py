"""MMDiT as sdlight's backbone: built from the config's parts with derived channels, trained and sampled under
rectified flow with a conditioning that gives tokens only (y=None), its configs composed (its diffusers export:
tests/test_export_transformers.py)."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from sdlight.conditioning.concat import InpaintingConcat
from sdlight.diffusion import Draws, RectifiedFlow, sample_euler
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.mmdit import MMDiT

from tests.conftest import compose_train
from tests.stages.conftest import CONTEXT_DIM, shapes_batch, tiny_conditioning, tiny_vae

# no in_channels: derived from the latents (and the concat stage), as `_partial_: true` configs do
FACTORY = partial(MMDiT, patch_size=2, out_channels=4, depth=2, num_heads=2, hidden=32, pos_embed_max_size=8,
                  context_dim=CONTEXT_DIM, pooled_dim=16)


def mmdit_ldm(**kwargs):
    parts = dict(unet=FACTORY, first_stage=tiny_vae(), conditioning=tiny_conditioning("text"),
                 objective=RectifiedFlow(), prediction_type=None, loss_type=None, loss_weighting=None,
                 snr_gamma=None, image_size=16, scale_factor=0.5, sampler=partial(sample_euler, steps=2))
    return build_latent_diffusion(**(parts | kwargs))


def assert_only_the_output_layer_learns_first(backbone) -> None:
    """After one backward from a freshly built backbone whose output layer is zero (adaLN-zero, PixArt), only that
    layer has gradients (also used by test_dit_backbone.py)."""
    grads = {k: p.grad.abs().sum().item() for k, p in backbone.named_parameters()}
    assert grads.pop("final_layer.linear.weight") > 0 and grads.pop("final_layer.linear.bias") > 0
    assert not any(grads.values())


def test_trains_and_samples_with_text_tokens_only():
    torch.manual_seed(0)
    model = mmdit_ldm()
    backbone = model.model.diffusion_model
    assert backbone.config["in_channels"] == 4 and model.size_multiple == 4 * 2  # VAE factor x patch size
    losses, _ = model.losses(shapes_batch(4), Draws(torch.Generator().manual_seed(0)), p_uncond=0.5)
    losses.mean().backward()
    assert torch.isfinite(losses).all()
    assert_only_the_output_layer_learns_first(backbone)  # adaLN-zero: a zero prediction at the start
    images = model.generate(["a red circle", "a blue square"], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    model.latent_shape_for(16, 24)  # non-square: the centre crop of the position table
    with pytest.raises(ValueError, match="multiples of 8"):
        model.latent_shape_for(16, 20)


def test_the_concat_channels_are_derived():
    model = mmdit_ldm(concat=InpaintingConcat(4), conditioning=None)
    assert model.model.diffusion_model.config["in_channels"] == 4 + 5
    assert model.model.diffusion_model.out_channels == 4


def test_configs_compose(tmp_path):
    cfg = compose_train(["+experiment=quickstart_ldm", "model/unet=mmdit_tiny", "model/objective=rectified_flow"],
                        tmp_path)
    assert cfg.model.conditioning.context_dim == cfg.model.unet.context_dim
    assert isinstance(instantiate(cfg.model.unet), MMDiT)
    cfg = compose_train(["+experiment=quickstart_ldm", "model/unet=mmdit_sd3_medium"], tmp_path)
    with torch.device("meta"):
        medium = instantiate(cfg.model.unet)
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.SD3Transformer2DModel(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                 pos_embed_max_size=192)
    count = lambda m: sum(v.numel() for v in m.state_dict().values())  # noqa: E731
    assert count(medium) == count(theirs)  # SD3 medium's ~2B weights and its position table
