"""conf/model/conditioning/*.yaml instantiate the encoders with the documented arguments."""

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sdlight.conditioning import (
    AttributeEmbedder,
    ClassEmbedder,
    LearnedTextEncoder,
    NoConditioning,
    OpenCLIPTextEncoder,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "conditioning"


def load(name: str, context_dim: int = 16):
    """The group file placed where it sits in a composed config, so ${model.unet.context_dim} resolves."""
    root = OmegaConf.create({"model": {"unet": {"context_dim": context_dim}}})
    root.model.conditioning = OmegaConf.load(CONF / f"{name}.yaml")
    return root.model.conditioning


def test_no_p_uncond_in_encoder_configs():
    for path in CONF.glob("*.yaml"):
        assert "p_uncond" not in OmegaConf.load(path), path.name


@pytest.mark.parametrize(
    "name, cls, batch_value",
    [
        ("none", NoConditioning, None),
        ("class", ClassEmbedder, torch.tensor([0, 9])),
        ("attributes", AttributeEmbedder, torch.tensor([[3, 5, 4, 2], [0, 0, 0, 0]])),
        ("learned_text", LearnedTextEncoder, ["a red circle", ""]),
    ],
)
def test_trainable_encoder_configs_instantiate(name, cls, batch_value):
    enc = instantiate(load(name, context_dim=24))
    assert type(enc) is cls
    out = enc(batch_value)
    if cls is NoConditioning:
        assert out is None
    else:
        assert out.shape[0] == 2 and out.shape[-1] == 24 == enc.context_dim


def test_learned_text_config_values():
    enc = instantiate(load("learned_text"))
    assert enc.max_length == 32 and enc.positional_embedding.shape == (32, 128)
    assert len(enc.resblocks) == 2 and enc.resblocks[0].attn.heads == 4 and not enc.causal


def test_open_clip_config_is_the_sd2_setting():
    cfg = load("open_clip")
    assert get_class(cfg._target_) is OpenCLIPTextEncoder
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    assert args == {
        "arch": "ViT-H-14",
        "pretrained": "laion2b_s32b_b79k",
        "checkpoint_path": None,
        "layer": "penultimate",
        "max_length": 77,
        "route": "crossattn",
        "drop_rate": None,
    }
    inspect.signature(OpenCLIPTextEncoder).bind(**args)  # every key is a constructor argument


def test_size_config_is_sdxl_micro_conditioning():
    enc = instantiate(load("size"))
    assert (enc.input_key, enc.route, enc.drop_rate, enc.output_dim) == ("original_size", "vector", 0.0, 512)
    assert enc(torch.tensor([[1024, 768]])).shape == (1, 512)
