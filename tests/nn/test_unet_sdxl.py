"""conf/model/unet/sdxl.yaml against diffusers' SD-XL UNet (``addition_embed_type="text_time"``), converted with
diffusers' own converter for original checkpoints: at a reduced width with SD-XL's structure, and its size."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdlight.conditioning import SizeEmbedder
from sdlight.nn.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_unet import assert_converter_takes_every_key, randomize_, rel_err  # noqa: E402

SDXL = Path(__file__).resolve().parents[2] / "conf" / "model" / "unet" / "sdxl.yaml"
# SD-XL's structure (3 levels, no attention at the first, deeper transformers lower down, linear projections,
# fixed head width, a vector input) at a CPU size; the vector: pooled text (16) + 6 size numbers x 8
REDUCED = dict(image_size=8, model_channels=32, transformer_depth=[1, 1, 2], num_head_channels=8, context_dim=64,
               adm_in_channels=64, use_checkpoint=False)
TIME_DIM, POOLED = 8, 16


def sdxl_params(**overrides) -> dict:
    params = OmegaConf.to_container(OmegaConf.load(SDXL))
    assert params.pop("_target_") == "sdlight.nn.unet.UNetModel"
    return {**params, **overrides}


def diffusers_config(params: dict, checkpoint: dict) -> dict:
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=params["image_size"] * 8)


def test_reduced_sdxl_unet_matches_diffusers_text_time():
    params = sdxl_params(**REDUCED)
    model = randomize_(UNetModel(**params)).eval()
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    config = diffusers_config(params, checkpoint)
    # the converter picks SD-XL's text_time embedding only at SD-XL's context widths (2048, 1280)
    assert config["class_embed_type"] == "projection"
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM)
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([3, 871])
    context = torch.randn(2, 7, 64, generator=gen)
    pooled = torch.randn(2, POOLED, generator=gen)
    sizes = {"original_size": torch.tensor([[1024, 768], [512, 2048]]), "crop_coords": torch.tensor([[0, 0], [64, 8]]),
             "target_size": torch.tensor([[1024, 1024], [768, 1344]])}
    # y as sdlight's conditioner builds it: the pooled text, then each size's sinusoidal embedding
    y = torch.cat([pooled, *(SizeEmbedder(k, dim=TIME_DIM)(v) for k, v in sizes.items())], dim=1)
    with torch.no_grad():
        ours = model(x, t, context=context, y=y)
        theirs = reference(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": torch.cat(list(sizes.values()), dim=1)}).sample
    assert ours.shape == x.shape and theirs.abs().mean() > 1e-3
    assert rel_err(ours, theirs) <= 1e-4
    with torch.no_grad():  # each input reaches the output
        assert rel_err(model(x, t, context=context, y=y.flip(0)), ours) > 1e-3
        assert rel_err(model(x, t, context=context.flip(0), y=y), ours) > 1e-3


def test_sdxl_yaml_is_sdxl_base():
    params = sdxl_params()
    with torch.device("meta"):
        model = UNetModel(**params)
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684  # SD-XL base's UNet
    ours = model.state_dict()
    assert ours["label_emb.0.0.weight"].shape == (1280, 2816)
    assert ours["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape == (640, 2048)
    assert "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight" in ours
    assert not any(k.startswith("input_blocks.1.1.") for k in ours)  # no attention at the first level
    # diffusers' converter reads the yaml as SD-XL: every key lands with diffusers' shape, nothing left over
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    config = diffusers_config(params, checkpoint)
    assert (config["addition_embed_type"], config["addition_time_embed_dim"]) == ("text_time", 256)
    assert config["projection_class_embeddings_input_dim"] == 2816
    assert_converter_takes_every_key(checkpoint, config)
