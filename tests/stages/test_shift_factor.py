"""The latent shift (SD3, Flux: latents are ``scale · (z - shift)``): its estimate beside the scale factor (one
process and pooled over DDP ranks), encode / decode, old checkpoints, the latent cache, diffusers export and
``init_from`` imports, on a 16-channel autoencoder without quant convs (SD3's VAE design)."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlight.checkpoints import load_latent_diffusion
from sdlight.data.shapes import ShapesDataset
from sdlight.diffusion import NoiseSchedule
from sdlight.diffusion.draw import mixed_seed
from sdlight.diffusion.samplers import sample_ddim
from sdlight.export import single_file, write_diffusers
from sdlight.models import LatentDiffusionModel
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.pretrained import load_pretrained
from sdlight.stages.diffusion import SCALE_FACTOR_SEED, LatentDiffusion
from sdlight.train import train

from .conftest import (SIZE, save_stage1_checkpoint, shapes_batch, shapes_loader, tiny_conditioning, tiny_ldm,
                       tiny_trainer, tiny_unet)

TESTS = Path(__file__).resolve().parents[1]
VAE16 = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16, embed_dim=16,
             resolution=32, use_quant_conv=False, use_post_quant_conv=False)  # conf/model/autoencoder/kl_f4_16ch_tiny
SD3 = dict(scale_factor=1.5305, shift_factor=0.0609)


def vae16(seed: int = 0, offset: float = 0.5) -> AutoencoderKL:
    """A random 16-channel VAE whose posterior means sit ``offset`` off zero (the shift then has something to do)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE16).eval()
    with torch.no_grad():
        vae.encoder.conv_out.bias[:16] += offset  # the mean half of (mean, logvar)
    return vae


def ldm16(seed: int = 0, **kwargs) -> LatentDiffusionModel:
    torch.manual_seed(seed)
    return build_latent_diffusion(tiny_unet(32, seed, in_channels=16, out_channels=16), vae16(seed),
                                  NoiseSchedule.make("linear", 1000, 1e-4, 2e-2), tiny_conditioning("text", seed),
                                  sampler=partial(sample_ddim, steps=2), image_size=SIZE, **{**SD3, **kwargs}).eval()


# ----------------------------------------------------------------------------------------------- the estimate
def float64_mean_and_std(vae: AutoencoderKL, images: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and unbiased std of posterior samples in float64, each sample's noise keyed by (SCALE_FACTOR_SEED,
    step 0, its index), as the estimate draws it on any number of ranks."""
    vae64 = copy.deepcopy(vae).double().eval()
    zs = []
    with torch.no_grad():
        for i, x in enumerate(images):
            mean, logvar = vae64.encoder(x[None].double()).chunk(2, dim=1)  # no quant_conv
            g = torch.Generator().manual_seed(mixed_seed(SCALE_FACTOR_SEED, 0, i))
            eps = torch.randn(mean.shape[1:], generator=g, dtype=torch.float32).double()
            zs.append((mean[0] + torch.exp(0.5 * logvar[0].clamp(-30, 20)) * eps).flatten())
    z = torch.cat(zs)
    return z.mean().item(), z.std().item()


@pytest.mark.parametrize("trainer", ["cpu", "ddp_sim"])
def test_shift_and_scale_are_the_mean_and_1_over_std_of_the_keyed_draws(train_cfg, tmp_path, trainer):
    """quickstart_sd3 estimates both (null in its config) in one pass over every training sample; under DDP the
    sums are pooled over ranks, so the values are those of one process."""
    n, batch = 32, 8
    vae = vae16()
    ckpt = save_stage1_checkpoint(vae, tmp_path / "vae16.ckpt")
    cfg = train_cfg(["+experiment=quickstart_sd3", f"model.first_stage.ckpt={ckpt}", f"trainer={trainer}",
                     "trainer.max_steps=1", "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                     f"data.train_size={n}", f"data.batch_size={batch}", "model.scale_factor_batches=8",
                     "model.sample_every_n_steps=0", "logger=none", "callbacks=default",
                     "~callbacks.rich_progress_bar", "~callbacks.model_summary"])
    assert cfg.model.shift_factor is None and cfg.model.scale_factor is None
    train(cfg)
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    data = ShapesDataset("train", n, image_size=32)
    mean, std = float64_mean_and_std(vae, [data[i]["image"] for i in range(n)])
    assert float(sd["shift_factor"]) == pytest.approx(mean, rel=1e-5)
    assert float(sd["scale_factor"]) == pytest.approx(1.0 / std, rel=1e-5)
    assert abs(mean) > 0.1 * std  # off-centre latents: a shift of 0 would fail the first check
    if trainer == "ddp_sim":  # rank 0's share alone gives another mean
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        vae64 = copy.deepcopy(vae).double()
        with torch.no_grad():
            rank0 = torch.stack([vae64.encoder(data[i]["image"][None].double()).chunk(2, 1)[0] for i in perm[0::2]])
        assert abs(rank0.mean().item() - mean) > 1e-4 * abs(mean)


def stage16(seed: int = 0, **kwargs) -> LatentDiffusion:
    """The training module of ``ldm16``'s parts (kwargs: its options)."""
    defaults = dict(optimizer=partial(torch.optim.AdamW, lr=1e-3),
                    schedule=NoiseSchedule.make("linear", 1000, 1e-4, 2e-2), image_size=SIZE, sample_every_n_steps=0, scale_factor=None, shift_factor=0.0)
    return LatentDiffusion(unet=tiny_unet(32, seed, in_channels=16, out_channels=16), first_stage=vae16(seed),
                           conditioning=tiny_conditioning("text", seed), **{**defaults, **kwargs})


def test_a_given_shift_is_kept_and_the_scale_alone_estimated(tmp_path):
    module = stage16(shift_factor=0.25, scale_factor_batches=2)
    tiny_trainer(tmp_path, max_steps=1).fit(module, shapes_loader(8, 4))
    assert float(module.net.shift_factor) == 0.25 and float(module.net.scale_factor) != 1.0
    both = stage16(shift_factor=None, scale_factor_batches=2)
    tiny_trainer(tmp_path, max_steps=1).fit(both, shapes_loader(8, 4))
    assert float(both.net.shift_factor) != 0.25 and float(both.net.scale_factor) == pytest.approx(
        float(module.net.scale_factor), rel=1e-6)  # the std does not depend on the shift


# ------------------------------------------------------------------------------------------ encode / decode
def test_encode_and_decode_apply_the_shift_once():
    model = ldm16()
    x = shapes_batch()["image"]
    mode = model.first_stage_model.encode(x).mode()
    z = model.encode_images(x, sample=False)
    torch.testing.assert_close(z, SD3["scale_factor"] * (mode - SD3["shift_factor"]))
    torch.testing.assert_close(model.decode_latents(z), model.first_stage_model.decode(mode).clamp(-1, 1),
                               rtol=1e-5, atol=1e-5)
    unshifted = ldm16(shift_factor=0.0)
    assert not torch.allclose(unshifted.encode_images(x, sample=False), z, atol=1e-2)


def test_checkpoints_without_the_shift_load_with_shift_0(tmp_path):
    # a checkpoint of ours written before the shift existed (tests/fixtures: sdlight.train at commit 4cce674)
    fixture = TESTS / "fixtures" / "ldm_class_v0.ckpt"
    assert "shift_factor" not in torch.load(fixture, weights_only=True)["state_dict"]
    model, _ = load_latent_diffusion(fixture)
    assert float(model.shift_factor) == 0.0
    # the Lightning module's strict load (resume) of a state dict without it
    module = tiny_ldm()
    sd = {k: v for k, v in module.state_dict().items() if k != "shift_factor"}
    assert len(sd) == len(module.state_dict()) - 1
    module.net.shift_factor.fill_(0.3)
    module.load_state_dict(sd, strict=True)
    assert float(module.net.shift_factor) == 0.0


# -------------------------------------------------------------------------------------------- latent cache
def _latents_tests():
    spec = importlib.util.spec_from_file_location("latents_tests", TESTS / "data" / "test_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cached_posteriors_give_the_training_latents_of_images(tmp_path):
    """The cache holds the raw posterior (mean, std); the shift is applied by the model, once, on both paths."""
    _, cached, images = _latents_tests().cached_and_images(tmp_path, "float32")
    from_images = tiny_ldm(first_stage=_latents_tests().stages.tiny_vae(0), shift_factor=0.4)
    seen = {}
    for name, batch in (("images", images), ("cache", cached)):
        hook = from_images.net.model.diffusion_model.register_forward_pre_hook(
            lambda m, args: seen.__setitem__(name, args[0].clone()))  # returns None: the inputs unchanged
        from_images.net.losses(batch, torch.Generator().manual_seed(0))
        hook.remove()
    torch.testing.assert_close(seen["cache"], seen["images"], rtol=1e-5, atol=1e-5)
    posterior = from_images.net.first_stage_model.encode(images["image"])
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    want = 0.5 * (posterior.mean + posterior.std * eps - 0.4)
    torch.testing.assert_close(from_images.net.encode_images(cached, draws=torch.Generator().manual_seed(0)), want,
                               rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- exports and imports
def test_diffusers_vae_gives_our_latents_and_init_from_brings_the_shift(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = ldm16()
    written = write_diffusers(model, tmp_path / "d")
    assert "vae" in written
    config = json.loads((tmp_path / "d" / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == pytest.approx(
        (SD3["scale_factor"], SD3["shift_factor"]))
    assert config["use_quant_conv"] is False and config["use_post_quant_conv"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "d" / "vae", local_files_only=True).eval()
    x = shapes_batch()["image"]
    with torch.no_grad():
        theirs = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert (theirs - model.encode_images(x, sample=False)).abs().max() <= 1e-5

    save_file(single_file(model), str(tmp_path / "m.safetensors"))
    for source in (tmp_path / "d", tmp_path / "m.safetensors"):
        fresh = ldm16(seed=1, scale_factor=1.0, shift_factor=0.0)
        loaded = load_pretrained(source, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
        assert (loaded.scale_factor, loaded.shift_factor) == pytest.approx((SD3["scale_factor"], SD3["shift_factor"]))
        # model.init_from: the file's latent space (scale and shift) over the config's default shift of 0
        stage = stage16(seed=1, init_from=str(source))
        assert float(stage.net.shift_factor) == pytest.approx(SD3["shift_factor"])
        assert stage._scale_factor_ready and stage._shift_factor_ready
    # a model without a shift writes none: SD 1.x / 2.x files and configs stay as they were
    plain = ldm16(shift_factor=0.0)
    assert "shift_factor" not in single_file(plain)
    write_diffusers(plain, tmp_path / "plain")
    assert "shift_factor" not in json.loads((tmp_path / "plain" / "vae" / "config.json").read_text())
