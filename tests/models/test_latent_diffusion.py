"""The plain-torch model: built from a config's parts without Lightning, its objective and channels checked once
when it is built, every random draw of a training step from its Draws, sampling importable without Lightning or
Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlight.diffusion import DDPM, Draws, NoiseSchedule
from sdlight.errors import UsageError
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.pipeline import Pipeline

from tests.stages.conftest import shapes_batch, tiny_conditioning, tiny_unet, tiny_vae

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ldm_class_v0.ckpt"


def parts(**kwargs):
    cond = tiny_conditioning("text")
    return dict(unet=tiny_unet(cond.context_dim), first_stage=tiny_vae(), conditioning=cond,
                schedule=NoiseSchedule.make("linear", 1000, 1e-4, 2e-2), image_size=16, scale_factor=0.5) | kwargs


def test_importing_the_pipeline_imports_neither_lightning_nor_hydra():
    code = ("import sys, sdlight.pipeline; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'omegaconf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_random_draw_of_a_training_step_comes_from_its_draws():
    model, batch = build_latent_diffusion(**parts()), shapes_batch(4)
    first = model.losses(batch, Draws(torch.Generator().manual_seed(0)), p_uncond=0.5)
    state = torch.random.get_rng_state()
    second = model.losses(batch, Draws(torch.Generator().manual_seed(0)), p_uncond=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator was not touched
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = model.losses(batch, Draws(torch.Generator().manual_seed(1)), p_uncond=0.5)
    assert not torch.equal(first[0], other[0])


def test_the_objective_is_checked_once_when_the_model_is_built():
    with pytest.raises(UsageError, match="unknown loss weighting 'min-snr'"):
        build_latent_diffusion(**parts(loss_weighting="min-snr"))
    with pytest.raises(UsageError, match="model.prediction_type=v but model.objective has eps"):
        build_latent_diffusion(**parts(objective=DDPM(NoiseSchedule.make("linear")), prediction_type="v"))
    model = build_latent_diffusion(**parts(objective=DDPM(NoiseSchedule.make("linear"), "v"), prediction_type=None))
    assert model.objective.prediction_type == "v"


def test_a_pixel_space_clamp_in_the_sampler_config_is_refused():
    from functools import partial

    from sdlight.diffusion.samplers import sample_ddim

    with pytest.raises(UsageError, match="model.sampler.clip_x0=1.0: clip_x0 bounds x0 for pixel-space models"):
        build_latent_diffusion(**parts(sampler=partial(sample_ddim, clip_x0=1.0)))


def test_the_backbone_takes_the_latent_and_concat_channels():
    from functools import partial

    from sdlight.conditioning.concat import InpaintingConcat
    from sdlight.nn.unet import UNetModel

    factory = partial(UNetModel, image_size=4, out_channels=4, model_channels=32, num_res_blocks=1,
                      attention_resolutions=[], channel_mult=[1], num_head_channels=16, legacy=False)
    model = build_latent_diffusion(**parts(unet=factory, concat=InpaintingConcat(4), conditioning=None))
    assert model.model.diffusion_model.config["in_channels"] == 4 + 5  # latents + mask + masked image latents
    with pytest.raises(UsageError, match=r"model.unet.in_channels=4, but the backbone takes the 4 latent "
                                         r"channels \+ 5 of model.concat: 9"):
        build_latent_diffusion(**parts(unet=partial(factory, in_channels=4), concat=InpaintingConcat(4),
                                       conditioning=None))


def test_the_backbone_reads_tokens_as_wide_as_the_encoders_give():
    """A wrong model.unet.context_dim (SD3's T5 widens the tokens to 4096) is one line when the model is built,
    not a shape error at the first step."""
    from sdlight.conditioning import LearnedTextEncoder
    from sdlight.nn.mmdit import MMDiT

    wide = LearnedTextEncoder(max_length=8, width=32, layers=1, heads=2, context_dim=48)
    with pytest.raises(UsageError, match=r"model.unet.context_dim=32, but the condition encoders give 48-wide "
                                         r"tokens \(model/conditioning\): set model.unet.context_dim=48"):
        build_latent_diffusion(**parts(conditioning=wide))
    mmdit = MMDiT(in_channels=4, out_channels=4, depth=1, num_heads=2, hidden=32, pos_embed_max_size=4,
                  context_dim=32, pooled_dim=None)
    with pytest.raises(UsageError, match="model.unet.context_dim=32, but the condition encoders give 48-wide"):
        build_latent_diffusion(**parts(unet=mmdit, conditioning=wide))
    build_latent_diffusion(**parts(unet=mmdit))  # 32 and 32


def test_the_pipeline_switches_between_ema_and_raw_weights_of_its_checkpoint():
    raw = Pipeline.from_checkpoint(FIXTURE, "cpu", use_ema=False)
    ema = Pipeline.from_checkpoint(FIXTURE, "cpu")
    def same(a: Pipeline, b: Pipeline) -> bool:
        sa, sb = a.model.state_dict(), b.model.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    assert not same(raw, ema)
    ema([3], steps=2, seed=0, use_ema=False)
    assert same(raw, ema)  # the raw weights, read again from the file
    ema([3], steps=2, seed=0)
    assert same(ema, Pipeline.from_checkpoint(FIXTURE, "cpu"))


def test_ddpm_settings_beside_another_objective_are_named_in_a_warning(caplog):
    from sdlight.diffusion import RectifiedFlow

    quiet = parts(schedule=None, objective=RectifiedFlow(), prediction_type=None, loss_type=None,
                  loss_weighting=None, snr_gamma=None)
    with caplog.at_level("WARNING", logger="sdlight"):
        build_latent_diffusion(**quiet)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sdlight"):
        model = build_latent_diffusion(**(quiet | {"loss_weighting": "min_snr"}))
    assert isinstance(model.objective, RectifiedFlow)
    assert [r.getMessage() for r in caplog.records] == [
        "model.loss_weighting=min_snr: setting(s) of the DDPM objective, not used by the rectified_flow objective "
        "(model.objective.* holds its settings)"]
