"""UNetModel: equivalence with diffusers' UNet2DConditionModel through diffusers' own CompVis converter."""

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sdlight.nn.attention as attention_module
import sdlight.nn.unet as unet_module
from sdlight.nn.unet import ResBlock, UNetModel, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "unet"

TINY = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
    use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False,
)
CONFIGS = {
    # SD 1.x: conv proj_in/out, fixed head count; attention at full resolution only (exercises plain blocks).
    "sd1": dict(TINY, attention_resolutions=[1], num_heads=4),
    # SD 2.x: linear proj_in/out, fixed head width; attention at the low resolution only.
    "sd2": dict(TINY, attention_resolutions=[2], num_head_channels=16, use_linear_in_transformer=True),
    # class-conditional with FiLM (scale/shift) timestep modulation.
    "classes_scale_shift": dict(
        TINY, attention_resolutions=[1, 2], num_heads=2, num_classes=10, use_scale_shift_norm=True
    ),
    # SD 2 x4-upscaler shape: cross-attention in place of self-attention at some levels, noise-level classes.
    "disable_self_attn": dict(
        TINY, attention_resolutions=[1, 2], num_heads=2, num_classes=10, use_linear_in_transformer=True,
        disable_self_attentions=[True, False],
    ),
    # vector conditioning through label_emb.0.{0,2} (diffusers: class_embed_type="projection").
    "sequential": dict(
        TINY, attention_resolutions=[2], num_heads=2, num_classes="sequential", adm_in_channels=12,
        transformer_depth=2,
    ),
}


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random values everywhere, zero-initialised layers included, so no branch compares as trivially zero."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            # 1-D weights are GroupNorm/LayerNorm gains: keep them near one so activations keep their scale
            p.copy_(noise + 1.0 if p.ndim == 1 and name.endswith("weight") else noise)
    return module


def to_diffusers(model: UNetModel, params: dict) -> UNet2DConditionModel:
    """Convert our state dict with diffusers' converter for original SD checkpoints and load it strict."""
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=params["image_size"] * 8)
    if params.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"  # the converter does not read this flag
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.0, 250.5, 999.0])
    for dim in (8, 7, 32):
        emb = timestep_embedding(t, dim).double()
        half = dim // 2
        expected = torch.zeros(len(t), dim, dtype=torch.float64)
        for i in range(half):
            freq = math.exp(-math.log(10000.0) * i / half)
            for b, tb in enumerate(t.tolist()):
                expected[b, i] = math.cos(tb * freq)  # cos first (CompVis order)
                expected[b, half + i] = math.sin(tb * freq)
        assert emb.shape == (len(t), dim)
        # float32 rounding of t * freq at t=999 is ~6e-5 in the argument
        torch.testing.assert_close(emb, expected, atol=2e-4, rtol=0)
    assert timestep_embedding(torch.tensor([3.0]), 8, max_period=100.0)[0, 1].item() == pytest.approx(
        math.cos(3.0 * 100.0 ** (-1 / 4)), abs=1e-6
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    params = CONFIGS[name]
    model = randomize_(UNetModel(**params)).eval()
    reference = to_diffusers(model, params)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([3, 871])
    context = torch.randn(2, 7, 32, generator=gen)
    y = None
    if params.get("num_classes") == "sequential":
        y = torch.randn(2, params["adm_in_channels"], generator=gen)
    elif params.get("num_classes") is not None:
        y = torch.tensor([1, 7])
    with torch.no_grad():
        ours = model(x, t, context=context, y=y)
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=y).sample
    assert ours.shape == x.shape
    assert theirs.abs().mean() > 1e-3
    assert rel_err(ours, theirs) <= 1e-4
    # the conditioning reaches the output
    with torch.no_grad():
        assert rel_err(model(x, t, context=context.flip(0), y=y), ours) > 1e-3


def test_class_conditional_forward():
    model = randomize_(UNetModel(**CONFIGS["classes_scale_shift"])).eval()
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 3, 32)
    with torch.no_grad():
        a = model(x, torch.tensor([5, 5]), context, y=torch.tensor([0, 1]))
        b = model(x, torch.tensor([5, 5]), context, y=torch.tensor([0, 2]))
        c = model(x, 5, context, y=torch.tensor([0, 1]))  # scalar timestep broadcasts
    assert "label_emb.weight" in model.state_dict()
    assert model.state_dict()["label_emb.weight"].shape == (10, 4 * 32)
    torch.testing.assert_close(a[0], b[0])
    assert rel_err(a[1], b[1]) > 1e-3
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError):
        model(x, torch.tensor([5, 5]), context)
    with pytest.raises(ValueError):
        model(x[..., :15, :15], torch.tensor([5, 5]), context, y=torch.tensor([0, 1]))


@pytest.mark.parametrize("direction", ["up", "down", "none"])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_diffusers(direction, scale_shift):
    ours = ResBlock(
        32, 64, 0.0, out_channels=64, use_scale_shift_norm=scale_shift, up=direction == "up",
        down=direction == "down",
    )
    randomize_(ours).eval()
    theirs = ResnetBlock2D(
        in_channels=32, out_channels=64, temb_channels=64, eps=1e-5, up=direction == "up",
        down=direction == "down", time_embedding_norm="scale_shift" if scale_shift else "default",
    ).eval()
    rename = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in rename.items():
            key = key.replace(old, new)
        state[key] = value
    theirs.load_state_dict(state, strict=True)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    with torch.no_grad():
        a, b = ours(x, emb), theirs(x, emb)
    size = {"up": 16, "down": 4, "none": 8}[direction]
    assert a.shape == b.shape == (2, 64, size, size)
    assert rel_err(a, b) <= 1e-5


def test_resblock_updown_unet_runs():
    model = UNetModel(**dict(CONFIGS["sd1"], resblock_updown=True, conv_resample=False)).eval()
    assert "input_blocks.2.0.in_layers.2.weight" in model.state_dict()  # a ResBlock replaces Downsample
    with torch.no_grad():
        out = model(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 2, 32))
    assert out.shape == (1, 4, 16, 16)


def test_gradient_checkpointing_same_gradients(monkeypatch):
    params = dict(CONFIGS["sd2"], use_scale_shift_norm=True)
    plain = randomize_(UNetModel(**params)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_gradient_checkpointing(True)  # model.gradient_checkpointing=true
    blocks = [m for m in ckpt.modules() if isinstance(m, (ResBlock, attention_module.BasicTransformerBlock))]
    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", spy)
    monkeypatch.setattr(attention_module, "checkpoint", spy)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 5, 32)
    plain(x, t, context).square().mean().backward()
    ckpt(x, t, context).square().mean().backward()
    assert len(calls) == len(blocks) > 4 and set(calls) == {False}  # every block, once in the forward pass
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    # no checkpointing outside training
    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(x, t, context)
    assert not calls
    ckpt.train().set_gradient_checkpointing(False)
    ckpt(x, t, context).square().mean().backward()
    assert not calls


def test_unconditional_variants():
    # context_dim null: the second attention becomes self-attention; no transformer: CompVis AttentionBlock.
    spatial = UNetModel(**dict(CONFIGS["sd2"], context_dim=None)).eval()
    assert not spatial.input_blocks[3][1].transformer_blocks[0].attn2.is_cross_attention
    plain = UNetModel(**dict(CONFIGS["sd1"], context_dim=None, use_spatial_transformer=False, num_heads=2)).eval()
    assert plain.state_dict()["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for model in (spatial, plain):
            assert model(x, torch.tensor([4])).shape == x.shape
    with pytest.raises(ValueError):
        UNetModel(**dict(CONFIGS["sd1"], use_spatial_transformer=False))  # context_dim would be ignored


def _load(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def assert_converter_takes_every_key(checkpoint: dict, config: dict) -> None:
    """diffusers' converter maps every key of ``checkpoint`` (``model.diffusion_model.*``) onto a key of
    ``UNet2DConditionModel(**config)`` with its shape, and leaves none of either over (also used by test_unet_sdxl)."""
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert len(checkpoint) == len(converted)


@pytest.mark.parametrize(
    ("name", "n_params"),
    # parameter counts printed by CompVis' DiffusionWrapper for the released models
    [("sd15", 859_520_964), ("sd21", 865_910_724)],
)
def test_release_configs_match_compvis_layout(name, n_params):
    params = _load(name)
    assert params.pop("_target_") == "sdlight.nn.unet.UNetModel"
    with torch.device("meta"):
        model = UNetModel(**params)
    assert sum(p.numel() for p in model.parameters()) == n_params
    ours = model.state_dict()
    assert ours["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, params["context_dim"])
    assert ours["out.2.weight"].shape == (4, 320, 3, 3)
    proj_in = ours["middle_block.1.proj_in.weight"].shape
    assert proj_in == ((1280, 1280) if params.get("use_linear_in_transformer") else (1280, 1280, 1, 1))
    # every key diffusers' converter expects is present with the diffusers shape, and nothing is left over
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=512)
    assert_converter_takes_every_key(checkpoint, config)


def test_tiny_config_and_overrides():
    from hydra.utils import instantiate

    model = instantiate(OmegaConf.load(CONF / "tiny.yaml")).eval()  # list values arrive as ListConfig
    assert isinstance(model, UNetModel)
    params = _load("tiny")
    params.pop("_target_")
    x = torch.randn(2, params["in_channels"], 8, 8)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999]), torch.randn(2, 3, params["context_dim"])).shape == x.shape
    overridden = UNetModel(**dict(params, in_channels=8, num_classes=5, context_dim=None)).eval()
    with torch.no_grad():
        out = overridden(torch.randn(2, 8, 8, 8), torch.tensor([0, 999]), y=torch.tensor([0, 4]))
    assert out.shape == (2, params["out_channels"], 8, 8)


@pytest.mark.slow
def test_compiled_unet_matches_diffusers_forward_and_gradients():
    # torch.compile (inductor: generated C++ on the CPU) must not change the network: output and input gradient
    params = CONFIGS["sd2"]
    model = randomize_(UNetModel(**params))
    reference = to_diffusers(model, params)
    model.compile()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t, context = torch.tensor([3, 871]), torch.randn(2, 7, 32, generator=gen)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = model(x_ours, t, context=context)
    theirs = reference(x_ref, t, encoder_hidden_states=context).sample
    ours.square().mean().backward()
    theirs.square().mean().backward()
    assert model._compiled_call_impl is not None and theirs.abs().mean() > 1e-3
    assert rel_err(ours.detach(), theirs.detach()) <= 1e-4
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-4
