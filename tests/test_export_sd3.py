"""SD3 whole: an MMDiT with SD3's three text towers (CLIP-L, bigG, T5; tiny random weights built here, from
model/conditioning=sd3_text_tiny) → a diffusers folder that ``StableDiffusion3Pipeline`` loads offline and that
encodes our contexts and pooled vectors and samples our image; → an SD3 single file (``text_encoders.*``) that
diffusers reads; and both back through ``model.init_from``, bit for bit."""

from __future__ import annotations

import json
import shutil
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sdlight.checkpoints import CheckpointError, save_safetensors
from sdlight.conditioning import LearnedTextEncoder
from sdlight.conditioning.t5 import T5Tower
from sdlight.diffusion import RectifiedFlow, sample_euler
from sdlight.export import compvis_weights, single_file, write_diffusers
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.mmdit import MMDiT
from sdlight.pretrained import load_pretrained

from tests.nn.test_mmdit import randomize_, relative_error
from tests.stages.conftest import tiny_vae

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LOAD = {"local_files_only": True, "low_cpu_mem_usage": False}
CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "conditioning"
PROMPT = "a red circle in the center on a white background"
MMDIT = dict(patch_size=2, out_channels=4, depth=2, num_heads=2, hidden=32, pos_embed_max_size=8, context_dim=64,
             pooled_dim=64)


def sd3_text(seed: int, **options):
    """model/conditioning=sd3_text_tiny's encoder (``options`` override its keys), LayerNorms moved off 1 / 0."""
    cfg = OmegaConf.load(CONF / "sd3_text_tiny.yaml").conditioning
    torch.manual_seed(seed)
    encoder = instantiate(OmegaConf.merge(cfg, options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "ln" in name or "layer_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return encoder


def sd3_ldm(seed: int = 0, **options):
    """A random 16 px LDM: MMDiT on the tiny f=4 VAE (with a shift), SD3's tiny text towers, rectified flow."""
    torch.manual_seed(seed)
    model = build_latent_diffusion(partial(MMDiT, **MMDIT), tiny_vae(seed), conditioning=sd3_text(seed, **options),
                                   objective=RectifiedFlow(shift=3.0), prediction_type=None, loss_type=None,
                                   loss_weighting=None, snr_gamma=None, image_size=16, scale_factor=0.5,
                                   shift_factor=0.125, sampler=partial(sample_euler, steps=4))
    randomize_(model.model.diffusion_model, seed)
    randomize_(model.first_stage_model, seed)
    return model.eval()


def pipeline(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **LOAD)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    model = sd3_ldm()
    written = write_diffusers(model, root / "diffusers")
    assert written == ["transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                       "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    return model, root / "diffusers"


def test_folder_is_an_sd3_pipeline_that_encodes_our_conditions(exported):
    model, folder = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    readme = (folder / "README.md").read_text()
    assert "negative_prompt_embeds=torch.zeros_like" in readme and "max_sequence_length=24" in readme
    pipe = pipeline(folder)
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    prompts = [PROMPT, "a blue square at the top left"]
    with torch.no_grad():
        theirs, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=24)
        ours = model.cond_stage_model(model.condition_values(prompts))
    assert theirs.shape == ours["context"].shape == (2, 16 + 24, 64)
    assert ours["context"][:, 16:].abs().max() > 0.1 and ours["y"][:, :24].abs().max() > 0.1
    assert relative_error(ours["context"], theirs) <= 1e-5
    assert relative_error(ours["y"], pooled) <= 1e-5


@pytest.mark.parametrize("null_text", ["zeros", "empty"])
def test_pipeline_samples_sdlights_image(tmp_path, null_text):
    """Euler, guidance 3: the null caption is ours (zeros, given as negative embeddings; or the empty caption,
    the pipeline's own default)."""
    model = sd3_ldm(null_text=null_text)
    write_diffusers(model, tmp_path / "out")
    pipe = pipeline(tmp_path / "out")
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    negative = {}
    if null_text == "zeros":
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                      max_sequence_length=24)
        negative = {"negative_prompt_embeds": torch.zeros_like(embeds),
                    "negative_pooled_prompt_embeds": torch.zeros_like(pooled)}
    with torch.no_grad():
        ours = model.generate([PROMPT], steps=4, guidance_scale=3.0, x_T=x_T)
        theirs = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=3.0, latents=x_T.clone(),
                      max_sequence_length=24, output_type="pt", **negative).images
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ours.std() > 0.05 and relative_error(ours, theirs) <= 1e-5


def test_init_from_the_folder_is_bit_identical(exported):
    model, folder = exported
    fresh = sd3_ldm(seed=1)
    loaded = load_pretrained(folder, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert any("SD3 layout: clip_l, clip_g, t5xxl" in line for line in loaded.lines)
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:3]


def test_a_sharded_t5_as_sd3s_release_loads(exported, tmp_path):
    """SD3's diffusers release holds T5 in shards named by model.safetensors.index.json."""
    model, folder = exported
    copy = tmp_path / "sharded"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder_3")
    model.cond_stage_model.single.t5.model.save_pretrained(copy / "text_encoder_3", max_shard_size="40KB")
    assert len(list((copy / "text_encoder_3").glob("model-*.safetensors"))) > 1
    fresh = sd3_ldm(seed=1)
    load_pretrained(copy, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_an_sd3_folder_into_another_conditioning_is_one_line(exported):
    _, folder = exported
    text = LearnedTextEncoder(max_length=16, width=32, layers=1, heads=2, context_dim=64)
    other = build_latent_diffusion(partial(MMDiT, **MMDIT), tiny_vae(0), conditioning=text,
                                   objective=RectifiedFlow(shift=3.0), prediction_type=None, loss_type=None,
                                   loss_weighting=None, snr_gamma=None, image_size=16)
    with pytest.raises(CheckpointError, match="holds SD3's text encoders .*: choose model/conditioning=sd3_text"
                       ) as info:
        load_pretrained(folder, other.model.diffusion_model, other.first_stage_model, other.cond_stage_model)
    assert "\n" not in str(info.value)


def test_a_t5_tower_loads_from_an_sd3_folder(exported):
    """model/conditioning=sd3_text_t5 pointed at an SD3 diffusers folder: t5.pretrained=DIR,
    t5.subfolder=text_encoder_3, t5.tokenizer_subfolder=tokenizer_3."""
    model, folder = exported
    tower = T5Tower(pretrained=folder, subfolder="text_encoder_3", tokenizer_subfolder="tokenizer_3", max_length=24)
    want = model.cond_stage_model.single.t5([PROMPT])[0]
    assert want.abs().max() > 0.1 and torch.equal(tower([PROMPT])[0], want)


def test_single_file_has_sd3_names_and_comes_back_bit_identical(exported, tmp_path):
    model, folder = exported
    sd = single_file(model)
    path = tmp_path / "sd3.safetensors"
    save_safetensors(sd, path)
    keys = load_file(path).keys()
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "text_encoders.clip_g.transformer.text_projection.weight" in keys
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in keys  # SD3's: CLIP-L unprojected
    assert "text_encoders.t5xxl.transformer.shared.weight" in keys
    # diffusers reads our text encoders from it as it reads SD3's files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), **LOAD)
    reference = pipeline(folder)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        theirs, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(theirs[k], want[k]) for k in want), name
    fresh = sd3_ldm(seed=1)
    load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_without_t5_the_export_is_parts_saying_why(tmp_path):
    model = sd3_ldm(**{"t5": None})
    written = write_diffusers(model, tmp_path / "out")
    assert written[-1] == "sdlight_conditioning.safetensors" and not (tmp_path / "out" / "model_index.json").exists()
    assert "StableDiffusion3Pipeline needs a T5 tower" in (tmp_path / "out" / "README.md").read_text()


def test_t5_weights_into_a_conditioning_without_t5_is_one_line(exported, tmp_path):
    model, folder = exported
    path = tmp_path / "sd3.safetensors"
    save_safetensors(single_file(model), path)
    fresh = sd3_ldm(seed=1, t5=None)
    with pytest.raises(CheckpointError, match="has no T5 tower: choose model/conditioning=sd3_text_t5") as info:
        load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert "\n" not in str(info.value)


def test_quickstart_sd3_with_sd3s_towers_trains_exports_and_comes_back(tmp_path):
    """`+experiment=quickstart_sd3 model/conditioning=sd3_text_tiny`: two training steps, `sdlight.export` to a
    folder the SD3 pipeline samples our image from, and `model.init_from=<the folder>` in a new run's config."""
    from sdlight.pipeline import Pipeline
    from sdlight.train import train

    from tests.conftest import TINY_TEXT_LDM, compose_train, random_stage1_checkpoint
    from tests.test_export import run_export

    vae = random_stage1_checkpoint(tmp_path / "vae16.ckpt", latent_channels=16)
    overrides = ["+experiment=quickstart_sd3", "model/conditioning=sd3_text_tiny", f"model.first_stage.ckpt={vae}"]
    train(compose_train([*overrides, *TINY_TEXT_LDM, "logger=none"], tmp_path))
    ckpt, out = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "exported"
    done = run_export(f"ckpt={ckpt}", "format=diffusers", f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert done.returncode == 0, done.stderr[-3000:]
    model = Pipeline.from_checkpoint(ckpt, "cpu").model  # the EMA weights, as exported
    pipe = pipeline(out)
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                  max_sequence_length=24)
        theirs = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, latents=x_T.clone(),
                      negative_prompt_embeds=torch.zeros_like(embeds),
                      negative_pooled_prompt_embeds=torch.zeros_like(pooled), max_sequence_length=24,
                      output_type="pt").images
        ours = model.generate([PROMPT], steps=4, guidance_scale=3.0, x_T=x_T)
    assert relative_error((ours / 2 + 0.5).clamp(0, 1), theirs) <= 1e-5
    cfg = compose_train([*overrides, f"model.init_from={out}"], tmp_path / "again")
    torch.manual_seed(7)
    fresh = instantiate(cfg.model).net
    want, got = compvis_weights(model), compvis_weights(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_an_unknown_text_encoder_in_an_sd3_file_is_one_line(exported, tmp_path):
    model, _ = exported
    sd = single_file(model)
    sd["text_encoders.t5xl.transformer.shared.weight"] = sd.pop("text_encoders.t5xxl.transformer.shared.weight")
    path = tmp_path / "odd.safetensors"
    save_safetensors(sd, path)
    fresh = sd3_ldm(seed=1)
    with pytest.raises(CheckpointError, match=r"text_encoders.t5xl.transformer.shared.weight: not one of SD3's text "
                                              r"encoders \(clip_l, clip_g, t5xxl") as info:
        load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert "\n" not in str(info.value)
