"""Transformer backbones exported to diffusers: an MMDiT model (SD3) to transformer/ + vae/ (with its shift) +
scheduler/ that SD3Transformer2DModel, AutoencoderKL and FlowMatchEulerDiscreteScheduler load and that sample the
image sdlight samples; a DiT to PixArtTransformer2DModel; model.init_from takes each folder back bit for bit. Tiny
random-weight networks built here."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from sdlight.checkpoints import CheckpointError
from sdlight.convert import ConversionError
from sdlight.convert_transformer import mmdit_rules, to_diffusers
from sdlight.diffusion import RectifiedFlow, sample_euler
from sdlight.export import compvis_weights, write_diffusers
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.dit import DiT
from sdlight.nn.mmdit import MMDiT
from sdlight.pretrained import load_pretrained, recorded_objective

from tests.nn.test_mmdit import randomize_, relative_error
from tests.stages.conftest import CONTEXT_DIM, tiny_conditioning, tiny_ldm, tiny_vae

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

LOAD = {"local_files_only": True, "low_cpu_mem_usage": False}
MMDIT = dict(patch_size=2, out_channels=4, depth=3, num_heads=2, hidden=32, pos_embed_max_size=8,
             context_dim=CONTEXT_DIM, pooled_dim=16)
DIT = dict(input_size=4, patch_size=2, out_channels=4, depth=2, hidden=32, num_heads=2, context_dim=CONTEXT_DIM)


def transformer_ldm(backbone, seed: int = 0, **options):
    """A random LDM (16 px, f=4 VAE with a shift) whose backbone is ``backbone`` (MMDiT or DiT) with ``options``,
    trained on rectified flow."""
    torch.manual_seed(seed)
    factory = partial(backbone, **(MMDIT if backbone is MMDiT else DIT) | options)
    model = build_latent_diffusion(factory, tiny_vae(seed), conditioning=tiny_conditioning("text", seed),
                                   objective=RectifiedFlow(shift=3.0), prediction_type=None, loss_type=None,
                                   loss_weighting=None, snr_gamma=None, image_size=16, scale_factor=0.5,
                                   shift_factor=0.125, sampler=partial(sample_euler, steps=4))
    randomize_(model.model.diffusion_model, seed)
    return model.eval()


@pytest.mark.parametrize("options", [{}, {"qk_norm": "rms", "dual_attention_layers": [0, 1]}])
def test_mmdit_rules_are_diffusers_single_file_conversion(options):
    """Our rules give what diffusers' own SD3 converter gives, key for key and tensor for tensor."""
    model = randomize_(MMDiT(in_channels=4, **MMDIT | options))
    sd = model.state_dict()
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sd.items()})
    ours = to_diffusers(sd, mmdit_rules(sd))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def sample_with_diffusers(folder, model, prompt: str, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The exported transformer, scheduler and VAE in diffusers' own Euler loop (no guidance), decoded as SD3's
    pipeline decodes: z / scaling_factor + shift_factor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", **LOAD)
        vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", **LOAD)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        context = model.cond_stage_model(model.condition_values([prompt]))["context"]
        pooled = torch.zeros(1, transformer.config.pooled_projection_dim)  # ours: a tokens-only conditioning
        scheduler.set_timesteps(steps)
        z = x_T.clone()
        for t in scheduler.timesteps:
            v = transformer(z, encoder_hidden_states=context, pooled_projections=pooled, timestep=t.expand(1),
                            return_dict=False)[0]
            z = scheduler.step(v, t, z).prev_sample
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z).sample.clamp(-1, 1)  # as sdlight's decoding: images in [-1, 1]


@pytest.mark.parametrize("options", [{}, {"pooled_dim": None, "qk_norm": "rms"}])
def test_sd3_parts_sample_sdlights_image_and_come_back_bit_for_bit(tmp_path, options):
    model = transformer_ldm(MMDiT, **options)
    written = write_diffusers(model, tmp_path / "out")
    assert written == ["transformer", "vae", "scheduler", "sdlight_conditioning.safetensors"]
    folder = tmp_path / "out"
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    prompt = "a red circle"
    with torch.no_grad():
        ours = model.generate([prompt], steps=4, guidance_scale=1.0, x_T=x_T)
    theirs = sample_with_diffusers(folder, model, prompt, x_T, 4)
    assert theirs.abs().max() > 0.05 and relative_error(ours, theirs) <= 1e-5
    assert recorded_objective(folder)["objective"] == "rectified_flow"
    fresh = transformer_ldm(MMDiT, seed=1, **options)
    loaded = load_pretrained(folder, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert (loaded.scale_factor, loaded.shift_factor) == (0.5, 0.125)
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:3]


def test_a_dit_exports_to_pixart_and_comes_back_bit_for_bit(tmp_path):
    model = transformer_ldm(DiT)
    write_diffusers(model, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer", **LOAD)
    backbone = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 4, 6, generator=gen), torch.randn(2, 5, CONTEXT_DIM, generator=gen)
    t = torch.tensor([120.0, 870.0])
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs={"resolution": None,
                          "aspect_ratio": None}, return_dict=False)[0]
        assert expected.abs().max() > 0.05
        assert relative_error(backbone(x, t, context=context), expected) <= 1e-5
    fresh = transformer_ldm(DiT, seed=1)
    load_pretrained(tmp_path / "out", fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("backbone", [MMDiT, DiT])
def test_a_patch_mixer_is_refused_before_anything_is_written(tmp_path, backbone):
    model = transformer_ldm(backbone, mask_ratio=0.5, mixer_depth=1)
    with pytest.raises(ConversionError, match="mixer_depth=1: .* has no patch mixer"):
        write_diffusers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_for_another_backbone_is_one_line(tmp_path):
    write_diffusers(transformer_ldm(DiT), tmp_path / "dit")
    other = transformer_ldm(MMDiT)
    needle = "its transformer/ holds a PixArtTransformer2DModel; model.unet is a MMDiT"
    with pytest.raises(CheckpointError, match=needle) as info:
        load_pretrained(tmp_path / "dit", other.model.diffusion_model, other.first_stage_model,
                        other.cond_stage_model)
    assert "\n" not in str(info.value)
    unet = tiny_ldm("text").net  # a UNet model and a transformer folder
    with pytest.raises(CheckpointError, match="its transformer/ holds a PixArtTransformer2DModel; model.unet is a "
                       "UNetModel"):
        load_pretrained(tmp_path / "dit", unet.model.diffusion_model, unet.first_stage_model, unet.cond_stage_model)
