"""sdlight.convert: our UNet / VAE / open_clip text tower against diffusers' and transformers' own classes, through
our key maps (not diffusers' converters), and the maps' inverses."""

from __future__ import annotations

import pytest
import torch

from sdlight import convert
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
            use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False)
UNETS = {
    "sd1": dict(TINY, attention_resolutions=[1], num_heads=4),
    "sd2": dict(TINY, attention_resolutions=[2], num_head_channels=16, use_linear_in_transformer=True),
    "two_blocks_classes": dict(TINY, num_res_blocks=2, attention_resolutions=[1, 2], num_heads=2, num_classes=5,
                               use_scale_shift_norm=True, channel_mult=[1, 2, 2]),
    "sequential": dict(TINY, attention_resolutions=[2], num_heads=2, num_classes="sequential", adm_in_channels=6),
}
VAES = {
    "f4": dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4,
               resolution=32),
    "f2_attn": dict(ch=32, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[16], z_channels=4, embed_dim=4,
                    resolution=32),
}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its init (zero-initialised output convs too), norms' gains kept near one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(noise + 1.0 if p.ndim == 1 and name.endswith("weight") and "norm" in name else noise)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def to_diffusers_unet(model: UNetModel):
    config = convert.diffusers_unet_config(model.config)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    sd = model.state_dict()
    theirs.load_state_dict(convert.apply_map(sd, convert.unet_key_map(sd, model.config)), strict=True)
    return theirs.eval()


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_matches_diffusers_through_our_map(name):
    params = UNETS[name]
    model = randomize_(UNetModel(**params)).eval()
    theirs = to_diffusers_unet(model)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    t = torch.tensor([7, 901])
    y = torch.randn(2, 6, generator=gen) if params.get("num_classes") == "sequential" else (
        torch.tensor([1, 4]) if params.get("num_classes") else None)
    with torch.no_grad():
        ours = model(x, t, context=context, y=y)
        ref = theirs(x, t, encoder_hidden_states=context, class_labels=y).sample
    assert rel_err(ours, ref) <= 1e-4

    # the inverse map gives back every key and tensor
    own = model.state_dict()
    back = convert.invert_map(theirs.state_dict(), convert.unet_key_map(own, model.config), own)
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_unet_without_counterpart_is_refused():
    with pytest.raises(convert.ConversionError, match="resblock_updown"):
        convert.diffusers_unet_config(UNetModel(**UNETS["sd1"], resblock_updown=True).config)


@pytest.mark.parametrize("name", list(VAES))
def test_vae_matches_diffusers_through_our_map(name):
    model = randomize_(AutoencoderKL(**VAES[name])).eval()
    config = convert.diffusers_vae_config(model.config, 0.5)
    theirs = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    sd = model.state_dict()
    table = convert.vae_key_map(sd, len(model.config["ch_mult"]))
    theirs.load_state_dict(convert.apply_map(sd, table, squeeze=True), strict=True)
    theirs.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post, ref = model.encode(x), theirs.encode(x).latent_dist
        assert rel_err(post.mean, ref.mean) <= 1e-4
        z = post.mean
        assert rel_err(model.decode(z), theirs.decode(z).sample) <= 1e-4
    back = convert.invert_map(theirs.state_dict(), table, sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def tiny_text_tower(layers: int = 3, quick_gelu: bool = True, seed: int = 0):
    """A random open_clip text transformer of CLIP's vocabulary and context, width 32."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(seed)
    cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=layers)
    tower = _build_text_tower(16, cfg, quick_gelu=quick_gelu)
    return randomize_(tower, seed).eval()


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_open_clip_text_matches_clip_text_model(layer):
    transformers = pytest.importorskip("transformers")
    from sdlight.conditioning.text import OpenCLIPTextEncoder

    tower = tiny_text_tower(quick_gelu=layer == "last")
    encoder = OpenCLIPTextEncoder(arch="ViT-L-14", layer=layer, model=tower)
    sd = tower.state_dict()
    layers = 3 if layer == "last" else 2
    config = convert.hf_clip_text_config(sd, heads=2, layers=layers, quick_gelu=layer == "last")
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    # transformers 5 names the module's keys without the "text_model." of the files on the hub
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf.state_dict()) else ""
    result = hf.load_state_dict(convert.open_clip_to_hf(sd, layers, prefix), strict=False)
    assert result.unexpected_keys == [] and all(k.endswith("position_ids") for k in result.missing_keys)
    tokens, _ = encoder.tokenizer(["a red circle", ""])
    with torch.no_grad():
        ours = encoder.encode_tokens(tokens)
        ref = hf(tokens).last_hidden_state
    assert rel_err(ours, ref) <= 1e-4
    back = convert.hf_to_open_clip(hf.state_dict(), prefix)
    for key, value in back.items():
        assert torch.equal(value, sd[key]), key
    assert set(sd) - set(back) == ({"text_projection"} | ({f"transformer.resblocks.2.{k}" for k in sd_block(sd, 2)}
                                                            if layer == "penultimate" else set()))


def sd_block(sd, i):
    prefix = f"transformer.resblocks.{i}."
    return {k[len(prefix):] for k in sd if k.startswith(prefix)}
