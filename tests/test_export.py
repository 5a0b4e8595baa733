"""sdlight.export and model.init_from: export → diffusers loads it → same outputs; export → init_from → same
weights; the one checkpoint reader refuses files that need full unpickling. Random weights throughout."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlight import convert
from sdlight.checkpoints import CheckpointError, ema_swapped, read_checkpoint
from sdlight.pretrained import load_pretrained
from sdlight.conditioning.text import OpenCLIPTextEncoder
from sdlight.diffusion import NoiseSchedule
from sdlight.diffusion.samplers import sample_ddim
from sdlight.export import compvis_weights, scheduler_config, single_file, write_diffusers
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.unet import UNetModel
from sdlight.pipeline import Pipeline
from sdlight.models.latent_diffusion import LatentDiffusionModel, build_latent_diffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from test_convert import randomize_, rel_err, tiny_text_tower  # noqa: E402
LOAD = {"local_files_only": True, "low_cpu_mem_usage": False}


def tiny_clip_ldm(layer: str = "last", prediction_type: str = "eps", seed: int = 0) -> LatentDiffusionModel:
    """A random LDM at tiny size with an open_clip text tower of CLIP's vocabulary (SD 1.x: QuickGELU, last layer;
    SD 2.x: GELU, penultimate layer, v-prediction)."""
    tower = tiny_text_tower(3, quick_gelu=layer == "last", seed=seed)
    torch.manual_seed(seed)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                     channel_mult=[1, 2], attention_resolutions=[1, 2], num_head_channels=16,
                     use_spatial_transformer=True, use_linear_in_transformer=layer != "last", context_dim=32,
                     legacy=False)
    vae = AutoencoderKL(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4,
                        resolution=32)
    model = build_latent_diffusion(unet, vae, NoiseSchedule.make("scaled_linear"),
                                   OpenCLIPTextEncoder("ViT-L-14", layer=layer, model=tower),
                                   sampler=functools.partial(sample_ddim, steps=5, spacing="leading"),
                                   prediction_type=prediction_type, scale_factor=0.7, image_size=32)
    for part in (unet, vae):
        randomize_(part, seed)
    return model.eval()


@pytest.fixture(params=["last", "penultimate"])
def exported(request, tmp_path):
    model = tiny_clip_ldm(request.param, "eps" if request.param == "last" else "v")
    written = write_diffusers(model, tmp_path / "diffusers")
    assert "text_encoder" in written and (tmp_path / "diffusers" / "model_index.json").is_file()
    return model, tmp_path / "diffusers"


def test_diffusers_pipeline_gives_sdlights_image(exported):
    model, folder = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, **LOAD)
    prompt = "a red circle on a white background"
    # the tokenizer and the text encoder: ids and contexts
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours_ids, _ = model.cond_stage_model.single.tokenizer([prompt, ""])
    assert torch.equal(ids, ours_ids)
    with torch.no_grad():
        assert rel_err(pipe.text_encoder(ids)[0], model.cond_stage_model.single([prompt, ""])) <= 1e-4
    # the whole sampling loop: DDIM, 5 steps, guidance 3, seed 0 (CPU noise in both)
    theirs = pipe(prompt, height=32, width=32, num_inference_steps=5, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    result = Pipeline(model, "cpu")([prompt], 1, steps=5, guidance_scale=3.0, sampler="ddim", seed=0)
    ours = torch.from_numpy(__import__("numpy").asarray(result.images[0])).permute(2, 0, 1).float() / 255
    assert (ours - theirs[0]).abs().max() <= 1.5 / 255  # uint8 rounding of the same image
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    exact = (model.generate([prompt], steps=5, guidance_scale=3.0, sampler=sample_ddim, x_T=x_T) + 1) / 2
    assert rel_err(exact, theirs) <= 1e-4


def test_single_file_loads_in_diffusers(exported, tmp_path):
    model, folder = exported
    path = tmp_path / "model.safetensors"
    save_file(single_file(model), str(path))
    keys = load_file(str(path)).keys()
    text_prefix = "cond_stage_model.transformer.text_model." if model.cond_stage_model.single.layer == "last" \
        else "cond_stage_model.model.transformer."
    assert any(k.startswith(text_prefix) for k in keys)
    assert not any(k.startswith(("model_ema", "loss", "optimizer")) for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), **LOAD)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, **LOAD)
    for name in ("unet", "vae", "text_encoder"):
        theirs, expected = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert theirs.keys() == expected.keys()
        assert all(torch.equal(theirs[k], expected[k]) for k in expected), name


@pytest.mark.parametrize("source", ["diffusers", "single_file"])
def test_init_from_round_trips(exported, tmp_path, source):
    model, folder = exported
    if source == "single_file":
        folder = tmp_path / "model.safetensors"
        save_file(single_file(model), str(folder))
    fresh = tiny_clip_ldm(model.cond_stage_model.single.layer, seed=1)
    loaded = load_pretrained(folder, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert "text encoder" in loaded.lines[-1]
    assert loaded.scale_factor == pytest.approx(float(model.scale_factor))  # diffusers' scaling_factor too
    want, got = compvis_weights(model), compvis_weights(fresh)
    # what CLIPTextModel does not hold (the contrastive projection, SD 2's unused last block) stays as it was
    unused = {"diffusers": ("text_projection", "logit_scale", "resblocks.2."),
              "single_file": ("text_projection", "logit_scale") if model.cond_stage_model.single.layer == "last" else ()}[source]
    same = [k for k in want if not (k.startswith("cond_stage_model.") and any(u in k for u in unused))]
    assert len(same) > 0.9 * len(want)
    assert all(torch.equal(want[k], got[k]) for k in same), [k for k in same if not torch.equal(want[k], got[k])][:3]


def test_scheduler_config_names_or_lists_the_betas():
    model = tiny_clip_ldm()
    config = scheduler_config(model)
    assert config["beta_schedule"] == "scaled_linear" and config["trained_betas"] is None
    assert config["_class_name"] == "DDIMScheduler" and config["timestep_spacing"] == "leading"
    model.objective.schedule = NoiseSchedule.make("cosine")
    config = scheduler_config(model)
    assert len(config["trained_betas"]) == 1000
    scheduler = diffusers.DDIMScheduler.from_config(config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), model.objective.schedule.alphas_cumprod, rtol=1e-4, atol=0)  # diffusers: float32


# ----------------------------------------------------------------------------- a trained checkpoint, via the CLI
def run_export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdlight.export", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_exports_a_learned_text_model(tiny_text_ldm, tmp_path):
    ckpt, _ = tiny_text_ldm
    single = tmp_path / "m.safetensors"
    done = run_export(f"ckpt={ckpt}", "format=single_file", f"out={single}", "dtype=fp16",
                      f"hydra.run.dir={tmp_path / 'h'}")
    assert done.returncode == 0, done.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert single.stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone would write 0600
    model = Pipeline.from_checkpoint(ckpt, "cpu").model  # with its EMA weights
    out = tmp_path / "d"  # format=diffusers in-process (one interpreter start per test is enough)
    assert write_diffusers(model, out) == ["unet", "vae", "scheduler", "sdlight_conditioning.safetensors"]
    # no diffusers counterpart for the learned text encoder: the parts, its weights, and a README saying so
    assert not (out / "model_index.json").exists() and "no diffusers pipeline" in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", **LOAD).eval()
        vae = diffusers.AutoencoderKL.from_pretrained(out / "vae", **LOAD).eval()
    diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    assert vae.config.scaling_factor == pytest.approx(float(model.scale_factor))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        context = model.cond_stage_model.single(["a red circle"])
        assert rel_err(unet(x, t, encoder_hidden_states=context).sample,
                       model.model.diffusion_model(x, t, context=context)) <= 1e-4
        assert rel_err(vae.decode(x).sample, model.first_stage_model.decode(x)) <= 1e-4
        want = compvis_weights(model)
    sd = load_file(str(single))
    assert {k for k in sd if k.startswith(("model.", "first_stage", "cond_stage"))} == set(want)
    assert all(sd[k].dtype == torch.float16 for k in want if want[k].is_floating_point())
    # and back: a fresh model initialised from the folder (EMA weights, bit for bit)
    fresh = Pipeline.from_checkpoint(ckpt, "cpu").model
    for p in fresh.parameters():
        p.data.normal_()
    load_pretrained(out, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    got = compvis_weights(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("spelling, diffusers_name", [
    ("eps", "epsilon"), ("epsilon", "epsilon"), ("v", "v_prediction"), ("v_prediction", "v_prediction"),
    ("x0", "sample"), ("sample", "sample")])
def test_every_training_spelling_exports(spelling, diffusers_name):
    assert scheduler_config(tiny_clip_ldm(prediction_type=spelling))["prediction_type"] == diffusers_name


def test_an_unknown_objective_name_is_refused_when_the_model_is_built():
    from sdlight.errors import UsageError

    with pytest.raises(UsageError, match="prediction_type 'noise'.*'eps', 'v', 'x0'.*'epsilon'"):
        tiny_clip_ldm(prediction_type="noise")


def test_cli_exports_a_checkpoint_trained_with_diffusers_spelling(tiny_text_ldm, tmp_path):
    """`model.prediction_type=epsilon` trains; its checkpoint exports (once a KeyError), into world-readable files."""
    ckpt = torch.load(tiny_text_ldm[0], weights_only=True)
    ckpt["sdlight"]["config"]["model"]["prediction_type"] = "epsilon"
    ckpt["hyper_parameters"]["prediction_type"] = "epsilon"
    torch.save(ckpt, tmp_path / "epsilon.ckpt")
    done = run_export(f"ckpt={tmp_path / 'epsilon.ckpt'}", "format=diffusers", f"out={tmp_path / 'd'}",
                      f"hydra.run.dir={tmp_path / 'h'}")
    assert done.returncode == 0, done.stderr
    config = diffusers.DDIMScheduler.load_config(tmp_path / "d" / "scheduler")
    assert config["prediction_type"] == "epsilon"
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file()] + [tiny_text_ldm[0]]  # checkpoints too
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}, files


@pytest.mark.parametrize("options, message", [
    ({"format": "onnx"}, "format=onnx: choose diffusers"), ({"dtype": "fp8"}, "dtype=fp8: choose one of"),
    ({"format": "single_file", "out": "m.ckpt"}, "ending in .safetensors")])
def test_bad_options_are_named(options, message):
    from omegaconf import OmegaConf

    from sdlight.errors import UsageError
    from sdlight.export import check_options

    cfg = OmegaConf.create({"format": "diffusers", "dtype": "fp32", "out": "new_dir", **options})
    with pytest.raises(UsageError, match=message):
        check_options(cfg)


def test_init_from_through_the_config(tiny_text_ldm, train_cfg, tmp_path):
    import hydra

    ckpt, vae = tiny_text_ldm
    cfg = train_cfg(["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae}", f"model.init_from={ckpt}"])
    model = hydra.utils.instantiate(cfg.model)
    source = Pipeline.from_checkpoint(ckpt, "cpu").model
    want, got = compvis_weights(source), compvis_weights(model.net)
    assert all(torch.equal(want[k], got[k]) for k in want)
    # the file's scale factor is taken, not re-estimated: from a checkpoint and from a diffusers export
    assert model._scale_factor_ready and float(model.net.scale_factor) == float(source.scale_factor)
    write_diffusers(source, tmp_path / "exported")
    cfg = train_cfg(["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae}",
                     f"model.init_from={tmp_path / 'exported'}"])
    model = hydra.utils.instantiate(cfg.model)
    assert model._scale_factor_ready and float(model.net.scale_factor) == pytest.approx(float(source.scale_factor))
    cfg = train_cfg(["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae}", f"model.init_from={ckpt}",
                     "model.unet.model_channels=32"])
    with pytest.raises(Exception, match=r"UNet does not fit model.unet: .*shape mismatches \(file vs model\) 285"):
        hydra.utils.instantiate(cfg.model)


def test_compvis_ema_is_selectable():
    w = {"model.diffusion_model.a.b": torch.zeros(1), "first_stage_model.x": torch.ones(1),
         "model_ema.diffusion_modelab": torch.full((1,), 2.0), "model_ema.num_updates": torch.tensor(3)}
    ema, which = ema_swapped(w, use_ema=True)
    assert which == "EMA weights" and ema["model.diffusion_model.a.b"].item() == 2.0
    assert not any(k.startswith("model_ema") for k in ema)
    raw, _ = ema_swapped(w, use_ema=False)
    assert raw["model.diffusion_model.a.b"].item() == 0.0


# ------------------------------------------------------------------------------------------- one safe reader
class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_reader_refuses_full_unpickling_unless_trusted(tmp_path, monkeypatch):
    from sdlight.evaluate import _peek
    from sdlight.weights import load_state_dict

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": Payload()}, path)
    monkeypatch.delenv("SDLIGHT_TRUST_PICKLE", raising=False)
    for reader in (read_checkpoint, load_state_dict, _peek):
        with pytest.raises(CheckpointError, match="SDLIGHT_TRUST_PICKLE=1"):
            reader(path)
    monkeypatch.setenv("SDLIGHT_TRUST_PICKLE", "1")
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(1))
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tmp_path / "nothing", None, None, None)


def test_quickgelu_weights_need_the_quickgelu_arch():
    from sdlight.conditioning.open_clip_weights import load_open_clip_text_model

    with pytest.raises(ValueError, match="arch=ViT-L-14-quickgelu"):
        load_open_clip_text_model("ViT-L-14", "openai")


def test_sd15_finetune_experiment_composes(train_cfg):
    cfg = train_cfg(["+experiment=sd15_finetune", "model.init_from=/weights/v1-5.safetensors", "data=folder",
                     "data.root=/images"])
    assert cfg.model.init_from == "/weights/v1-5.safetensors" and cfg.model.first_stage.ckpt is None
    assert cfg.model.unet.context_dim == 768 and cfg.model.conditioning.arch == "ViT-L-14-quickgelu"
    assert cfg.model.first_stage.autoencoder.ch == 128 and cfg.data.image_size == 512


@pytest.mark.slow
def test_sd15_architecture_exports_exactly(tmp_path):
    """SD 1.5's UNet (860M), kl_f8 VAE and CLIP ViT-L/14 text tower, random: export → diffusers / transformers load
    the folder → the same outputs at 8x8 latents."""
    from omegaconf import OmegaConf
    from open_clip.model import CLIPTextCfg, _build_text_tower

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    unet_cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(conf / "unet" / "sd15.yaml")).items()
                if not k.startswith("_")} | {"in_channels": 4}
    vae_cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(conf / "autoencoder" / "kl_f8.yaml")).items()
               if k != "_target_"}
    torch.manual_seed(0)
    tower = _build_text_tower(768, CLIPTextCfg(context_length=77, vocab_size=49408, width=768, heads=12, layers=12),
                              quick_gelu=True)
    model = build_latent_diffusion(UNetModel(**unet_cfg), AutoencoderKL(**vae_cfg), NoiseSchedule.make("scaled_linear"),
                                   OpenCLIPTextEncoder("ViT-L-14-quickgelu", layer="last", model=tower),
                                   scale_factor=0.18215, image_size=64).eval()
    randomize_(model.model.diffusion_model)
    write_diffusers(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([321])
        with torch.no_grad():
            context = model.cond_stage_model.single(["a photograph of an astronaut riding a horse"])
            ids, _ = model.cond_stage_model.single.tokenizer(["a photograph of an astronaut riding a horse"])
            assert rel_err(text(ids)[0], context) <= 1e-4
            del text
            ours = model.model.diffusion_model(x, t, context=context)
            unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet", **LOAD).eval()
            assert rel_err(unet(x, t, encoder_hidden_states=context).sample, ours) <= 1e-4
            del unet
            vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", **LOAD).eval()
            assert rel_err(vae.decode(x).sample, model.first_stage_model.decode(x)) <= 1e-4
