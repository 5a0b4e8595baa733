"""SD-XL export: the tiny quickstart_sdxl model (random weights) → a diffusers folder that
``StableDiffusionXLPipeline`` loads offline and that gives our contexts, pooled vectors, UNet outputs and images;
→ an SD-XL single file (generative-models' names); and both back through ``model.init_from``, bit for bit."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from sdlight import convert
from sdlight.diffusion.samplers import sample_ddim
from sdlight.export import compvis_weights, single_file, write_diffusers
from sdlight.pipeline import Pipeline
from sdlight.pretrained import load_pretrained

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from conftest import compose_train, random_stage1_checkpoint, train_tiny_text_ldm  # noqa: E402
from test_convert import randomize_, rel_err  # noqa: E402
from test_export import run_export  # noqa: E402

LOAD = {"local_files_only": True, "low_cpu_mem_usage": False}
PROMPTS = ["a red circle in the center on a white background", ""]


def tiny_sdxl(root: Path, seed: int, overrides: tuple[str, ...] = ()):
    """quickstart_sdxl's model, its UNet and VAE moved off their init (the UNet's output conv starts at zero)."""
    vae = random_stage1_checkpoint(root / f"vae{seed}.ckpt")
    cfg = compose_train(["+experiment=quickstart_sdxl", f"model.first_stage.ckpt={vae}", *overrides], root)
    torch.manual_seed(seed)
    net = instantiate(cfg.model).net
    for part in (net.model.diffusion_model, net.first_stage_model):
        randomize_(part, seed)
    net.scale_factor.fill_(0.7)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    model = tiny_sdxl(root, 0)
    written = write_diffusers(model, root / "diffusers")
    assert written == ["unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    return model, root / "diffusers"


@pytest.fixture(scope="module")
def pipe(exported):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionXLPipeline.from_pretrained(exported[1], **LOAD)


def test_folder_is_an_sdxl_pipeline(exported, pipe):
    model, folder = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert (unet["addition_embed_type"], unet["addition_time_embed_dim"]) == ("text_time", 16)
    assert unet["projection_class_embeddings_input_dim"] == 128 and "class_embed_type" not in unet
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert [m.config.num_hidden_layers for m in (pipe.text_encoder, pipe.text_encoder_2)] == [2, 2]  # full depth
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert all((folder / t / f).is_file() for t in ("tokenizer", "tokenizer_2") for f in ("vocab.json", "merges.txt"))
    # the UNet's weights are what diffusers' own converter makes of our CompVis keys with this config
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    theirs = convert_ldm_unet_checkpoint(ours, unet)
    written = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert theirs.keys() == written.keys() and "add_embedding.linear_1.weight" in written
    assert all(torch.equal(theirs[k], written[k]) for k in written)


def test_tokenizers_and_encode_prompt_give_our_conditions(exported, pipe):
    model, _ = exported
    towers = model.cond_stage_model.embedders[0].towers
    for tokenizer, tower in zip((pipe.tokenizer, pipe.tokenizer_2), towers):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        assert torch.equal(ids, tower.tokenizer(PROMPTS)[0])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                       do_classifier_free_guidance=True)
        ours = model.cond_stage_model(model.condition_values(PROMPTS))
    assert embeds.shape == ours["context"].shape == (2, 32, 80)
    assert (embeds - ours["context"]).abs().max() <= 1e-5
    assert (pooled - ours["y"][:, :32]).abs().max() <= 1e-5 and ours["y"][:, :32].abs().max() > 0.1
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0  # our null: zeros


def test_unet_takes_pooled_text_and_sizes_in_sdxl_order(exported, pipe):
    model, _ = exported
    values = model.condition_values({"text": PROMPTS, "original_size": [[48, 40], [32, 32]],
                                     "crop_coords": [[4, 2], [0, 8]], "target_size": [[32, 24], [16, 32]]})
    with torch.no_grad():
        cond = model.cond_stage_model(values)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 900])
        ours = model.model.diffusion_model(x, t, context=cond["context"], y=cond["y"])
        time_ids = torch.cat([values[k].float() for k in ("original_size", "crop_coords", "target_size")], dim=1)

        def theirs(ids: torch.Tensor) -> torch.Tensor:
            return pipe.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs={
                "text_embeds": cond["y"][:, :32], "time_ids": ids}).sample
        assert ours.abs().mean() > 1e-2 and rel_err(theirs(time_ids), ours) <= 1e-5
        assert rel_err(theirs(time_ids[:, [2, 3, 0, 1, 4, 5]]), ours) > 1e-3  # the order matters


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_image_is_sdlights(exported, pipe, guidance):
    model, _ = exported
    prompt = PROMPTS[0]
    theirs = pipe(prompt, height=32, width=32, num_inference_steps=5, guidance_scale=guidance, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    result = Pipeline(model, "cpu")([prompt], 1, steps=5, guidance_scale=guidance, sampler="ddim", seed=0)
    ours = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    assert (ours - theirs[0]).abs().max() <= 1 / 255 + 1e-6  # the same image up to uint8 rounding
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = (model.generate([prompt], steps=5, guidance_scale=guidance, sampler=sample_ddim, x_T=x_T) + 1) / 2
    assert rel_err(exact, theirs) <= 1e-5 and theirs.std() > 0.01


def assert_same_weights(source, fresh) -> None:
    want, got = compvis_weights(source), compvis_weights(fresh)
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, differ[:5]


def test_init_from_the_diffusers_folder_is_bit_identical(exported, tmp_path):
    model, folder = exported
    fresh = tiny_sdxl(tmp_path, 1)
    assert not torch.equal(compvis_weights(fresh)["cond_stage_model.embedders.0.towers.1.model.text_projection"],
                           compvis_weights(model)["cond_stage_model.embedders.0.towers.1.model.text_projection"])
    loaded = load_pretrained(folder, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert loaded.scale_factor == pytest.approx(0.7) and loaded.lines[-1].startswith("text encoders: ")
    assert_same_weights(model, fresh)


def test_single_file_has_sdxl_names_and_init_from_is_bit_identical(exported, pipe, tmp_path):
    model, folder = exported
    path = tmp_path / "sd_xl_tiny.safetensors"
    save_file(single_file(model), str(path))
    keys = set(load_file(str(path)))
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert {"conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"} <= keys
    assert not any(k.startswith(("cond_stage_model.", "conditioner.embedders.2")) for k in keys)
    with warnings.catch_warnings():  # diffusers' own single-file reader gives the folder's weights
        warnings.simplefilter("ignore")
        read = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), **LOAD)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs, expected = getattr(read, name).state_dict(), getattr(pipe, name).state_dict()
        assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in expected), name
    fresh = tiny_sdxl(tmp_path, 2)
    loaded = load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert loaded.lines[-1].endswith("(SD-XL layout)")
    assert_same_weights(model, fresh)


def test_diffusers_text_encoders_back_to_sdxl_names(exported):
    _, folder = exported
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    text_2 = load_file(str(folder / "text_encoder_2" / "model.safetensors"))
    from sdlight.convert_sdxl import diffusers_text_to_sgm

    sgm = diffusers_text_to_sgm(text, text_2)
    assert torch.equal(sgm["conditioner.embedders.1.model.text_projection"], text_2["text_projection.weight"].T)
    with pytest.raises(convert.ConversionError, match="CLIPTextModelWithProjection"):
        diffusers_text_to_sgm(text, {k: v for k, v in text_2.items() if k != "text_projection.weight"})


def test_empty_caption_null_exports_without_forced_zeros(tmp_path):
    model = tiny_sdxl(tmp_path, 3, ("model.conditioning.null_text=empty",))
    write_diffusers(model, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False


@pytest.mark.parametrize("override, reason", [("model.conditioning.towers.clip_l.layer=last", "penultimate layer"),
                                              ("model.conditioners.crop_coords.drop_rate=0.1", "the sizes kept")])
def test_what_the_pipeline_cannot_run_exports_as_parts(tmp_path, override, reason):
    model = tiny_sdxl(tmp_path, 4, (override,))
    written = write_diffusers(model, tmp_path / "d")
    assert written[-1] == "sdlight_conditioning.safetensors" and not (tmp_path / "d" / "model_index.json").exists()
    assert reason in (tmp_path / "d" / "README.md").read_text()


def test_cli_export_of_a_trained_checkpoint_and_init_from_through_the_config(tmp_path):
    vae, _ = train_tiny_text_ldm(tmp_path, ["logger=none"], experiment="quickstart_sdxl")
    ckpt, out = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "exported"
    done = run_export(f"ckpt={ckpt}", "format=diffusers", f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert done.returncode == 0, done.stderr[-3000:]
    model = Pipeline.from_checkpoint(ckpt, "cpu").model  # the EMA weights, as exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, **LOAD)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        ours = model.cond_stage_model(model.condition_values(PROMPTS))
    assert (embeds - ours["context"]).abs().max() <= 1e-5 and (pooled - ours["y"][:, :32]).abs().max() <= 1e-5
    theirs = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=5, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    result = Pipeline(model, "cpu")([PROMPTS[0]], 1, steps=5, guidance_scale=3.0, sampler="ddim", seed=0)
    ours_image = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    assert (ours_image - theirs[0]).abs().max() <= 1 / 255 + 1e-6
    # model.init_from=<the folder> in a new run's config: every weight back, bit for bit
    cfg = compose_train(["+experiment=quickstart_sdxl", f"model.first_stage.ckpt={vae}", f"model.init_from={out}"],
                        tmp_path / "again")
    torch.manual_seed(7)
    assert_same_weights(model, instantiate(cfg.model).net)


def test_sdxl_base_unet_config_and_names_are_diffusers_own():
    """conf/model/unet/sdxl.yaml at true size (on the meta device): our diffusers config and key map are what
    diffusers' converter for SD-XL's original files makes of it."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from omegaconf import OmegaConf

    from sdlight.convert_sdxl import text_time_unet_config
    from sdlight.nn.unet import UNetModel

    params = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "unet" / "sdxl.yaml"))
    params.pop("_target_")
    with torch.device("meta"):
        unet = UNetModel(**params)
    ours = unet.state_dict()
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=1024)
    config = text_time_unet_config(convert.diffusers_unet_config(unet.config), 256)
    assert {k: config.get(k) for k in theirs} == {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}
    table = convert.unet_key_map(ours, unet.config, text_time=True)
    converted = convert_ldm_unet_checkpoint(checkpoint, theirs)
    assert set(table.values()) == set(converted) and len(table) == len(ours)
    # each tensor lands where diffusers' converter puts it (shapes differ across nearly all neighbours)
    assert all(converted[table[k]].shape == v.shape for k, v in ours.items())
    assert table["label_emb.0.2.weight"] == "add_embedding.linear_2.weight"


def test_sdxl_base_text_encoders_export_as_the_release_configs():
    """conf/model/conditioning/sdxl_text.yaml (meta device): the text model configs SD-XL base's diffusers release
    has, and a pipeline check of the release's UNet input width."""
    from omegaconf import OmegaConf

    from sdlight.conditioning import Conditioner
    from sdlight.convert_sdxl import hf_text_model, sdxl_pipeline_parts

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "conditioning" / "sdxl_text.yaml")
    cfg.conditioning.pretrained = False
    with torch.device("meta"):
        conditioner = Conditioner.join(instantiate(cfg.conditioning), instantiate(cfg.conditioners))
    encoder, time_dim = sdxl_pipeline_parts(conditioner, {"adm_in_channels": 2816})
    assert time_dim == 256
    keys = ("hidden_act", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "projection_dim", "max_position_embeddings", "vocab_size", "architectures")
    release = [("quick_gelu", 768, 3072, 12, 12, 768, 77, 49408, ["CLIPTextModel"]),
               ("gelu", 1280, 5120, 20, 32, 1280, 77, 49408, ["CLIPTextModelWithProjection"])]
    for tower, want in zip(encoder.towers, release):
        weights, config = hf_text_model(tower)
        assert tuple(config[k] for k in keys) == want
    assert weights["text_projection.weight"].shape == (1280, 1280)
    assert [t.tokenizer.pad_id for t in encoder.towers] == [49407, 0]  # <|endoftext|> and "!", as the release
    with pytest.raises(convert.ConversionError, match="vector input"):
        sdxl_pipeline_parts(conditioner, {"adm_in_channels": 2048})
