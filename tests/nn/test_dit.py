"""DiT (PixArt-α): equal to diffusers' PixArtTransformer2DModel through sdlight's export mapping (that of diffusers'
scripts/convert_pixart_alpha_to_diffusers.py, which diffusers ships as a script, not a function);
the key names and shapes of released PixArt-α files; gradient checkpointing."""

import warnings

import pytest
import torch

import sdlight.nn.dit as dit_module
from sdlight.convert_transformer import pixart_rules, to_diffusers
from sdlight.nn.dit import DiT, pixart_pos_embed

from tests.nn.test_mmdit import assert_checkpointing_keeps_gradients, randomize_, relative_error

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

TOL = 1e-5
# PixArt-α 512's widths (hidden 1152, 16 heads of 72, 2x2 patches of 4 channels, T5's 4096-wide tokens, learned
# sigma) with 2 of its 28 blocks
PIXART_512 = dict(input_size=64, patch_size=2, in_channels=4, out_channels=4, depth=2, hidden=1152, num_heads=16,
                  context_dim=4096, pe_interpolation=1.0, learn_sigma=True, caption_tokens=120)
TINY = dict(input_size=8, patch_size=2, in_channels=4, out_channels=4, depth=3, hidden=48, num_heads=4,
            context_dim=40)


def to_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sdlight's export mapping (the conversion script's: fused projections split, the position table and the null
    caption dropped, as diffusers recomputes the one and has no use for the other)."""
    return to_diffusers(state, pixart_rules(state))


def reference_for(model: DiT, state: dict | None = None, device: str | None = None) -> PixArtTransformer2DModel:
    cfg = model.config
    with torch.device(device or "cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PixArtTransformer2DModel(
            num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden"] // cfg["num_heads"],
            in_channels=cfg["in_channels"], out_channels=model.out_channels * (2 if cfg["learn_sigma"] else 1),
            num_layers=cfg["depth"], cross_attention_dim=cfg["hidden"], sample_size=cfg["input_size"],
            patch_size=cfg["patch_size"], interpolation_scale=cfg["pe_interpolation"],
            use_additional_conditions=cfg["use_additional_conditions"], caption_channels=cfg["context_dim"],
        )
    state = to_diffusers_keys({k: v.clone() for k, v in model.state_dict().items()} if state is None else state)
    reference.load_state_dict(state, strict=True, assign=device == "meta")
    return reference.eval()


def inputs(model: DiT, height: int, width: int, batch: int = 2, tokens: int = 9) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(batch, model.in_channels, height, width, generator=gen),
                t=torch.tensor([3, 871])[:batch],  # DDPM timesteps, as PixArt trains
                context=torch.randn(batch, tokens, model.context_dim, generator=gen))


def compare(model: DiT, reference: PixArtTransformer2DModel, height: int, width: int, mask: bool = False,
            sizes: torch.Tensor | None = None) -> float:
    args = inputs(model, height, width)
    context_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5]) if mask else None
    added = None if sizes is None else {"resolution": sizes[:, :2], "aspect_ratio": sizes[:, 2:]}
    with torch.no_grad():
        ours = model(**args, y=sizes, context_mask=context_mask, return_variance=model.learn_sigma)
        theirs = reference(args["x"], encoder_hidden_states=args["context"], timestep=args["t"],
                           added_cond_kwargs=added, encoder_attention_mask=context_mask, return_dict=False)[0]
    assert ours.shape == theirs.shape == (2, reference.out_channels, height, width)
    assert theirs.abs().max() > 0.1  # a real signal, not zero-initialised layers' zeros
    return relative_error(ours, theirs)


@pytest.fixture(scope="module")
def pixart_512_pair():
    torch.manual_seed(0)
    model = randomize_(DiT(**PIXART_512)).eval()
    return model, reference_for(model)


@pytest.mark.parametrize("height, width", [(64, 64), (32, 32), (32, 48)])  # the training grid, a smaller, non-square
def test_pixart_alpha_512_widths_match_diffusers(pixart_512_pair, height, width):
    model, reference = pixart_512_pair
    assert compare(model, reference, height, width) <= TOL


def test_prediction_half_is_what_sdlight_reads(pixart_512_pair):
    model, _ = pixart_512_pair
    args = inputs(model, 16, 24)
    with torch.no_grad():
        full, eps = model(**args, return_variance=True), model(**args)
    assert full.shape[1] == 8 and torch.equal(eps, full[:, :4])


@pytest.mark.parametrize("options, mask", [({}, False), ({}, True), ({"pe_interpolation": 0.5}, False)])
def test_tiny_matches_diffusers(options, mask):
    model = randomize_(DiT(**TINY, **options)).eval()
    assert compare(model, reference_for(model), 12, 20, mask=mask) <= TOL


def test_additional_conditions_of_pixart_alpha_1024_match_diffusers():
    """Resolution and aspect ratio as numbers, and as `SizeEmbedder(n=3, dim=256)` gives them (the vector route)."""
    from sdlight.conditioning.embeddings import SizeEmbedder

    model = randomize_(DiT(**TINY, use_additional_conditions=True, learn_sigma=True)).eval()
    reference = reference_for(model)
    sizes = torch.tensor([[1024.0, 768.0, 1024 / 768], [512.0, 512.0, 1.0]])
    assert compare(model, reference, 16, 12, sizes=sizes) <= TOL
    args = inputs(model, 16, 12)
    embedded = SizeEmbedder("size", dim=256, n=3)(sizes)
    with torch.no_grad():
        torch.testing.assert_close(model(**args, y=embedded), model(**args, y=sizes), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="give y"):
        model(**args)


def test_comparison_can_fail():
    """The mapping with the cross-attention's keys and values swapped must show."""
    model = randomize_(DiT(**TINY)).eval()
    state = model.state_dict()
    for n in range(TINY["depth"]):
        for kind in ("weight", "bias"):
            key = f"blocks.{n}.cross_attn.kv_linear.{kind}"
            state[key] = torch.cat(state[key].chunk(2)[::-1])
    assert compare(model, reference_for(model, state), 12, 20) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = randomize_(DiT(**TINY))
    assert_checkpointing_keeps_gradients(model, inputs(model, 12, 16), dit_module, monkeypatch, TINY["depth"])


def test_position_table_is_pixarts():
    """diffusers' (and PixArt's) table: each axis stretched to the base grid, divided by pe_interpolation."""
    for h, w, base, scale in [(32, 32, 32, 1.0), (24, 40, 32, 1.0), (64, 48, 64, 2.0), (16, 16, 16, 0.5)]:
        theirs = get_2d_sincos_pos_embed(64, (h, w), base_size=base, interpolation_scale=scale, output_type="pt")
        torch.testing.assert_close(pixart_pos_embed(64, h, w, base, scale), theirs.float(), rtol=0, atol=1e-6)


def test_key_names_of_pixart_alpha_files():
    """The full 28-block models' keys and shapes; mapped as the conversion script maps them, they load strict into
    diffusers' PixArt-α 512 and 1024."""
    full = {**PIXART_512, "depth": 28}
    with torch.device("meta"):
        ours = DiT(**full)
        ours_1024 = DiT(**full | {"input_size": 128, "pe_interpolation": 2.0, "use_additional_conditions": True})
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {
        "pos_embed": (1, 1024, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.2.weight": (1152, 1152),
        "t_block.1.weight": (6912, 1152), "y_embedder.y_proj.fc1.weight": (1152, 4096),
        "y_embedder.y_proj.fc2.weight": (1152, 1152), "y_embedder.y_embedding": (120, 4096),
        "blocks.0.attn.qkv.weight": (3456, 1152), "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.cross_attn.q_linear.weight": (1152, 1152), "blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
        "blocks.0.cross_attn.proj.bias": (1152,), "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.mlp.fc2.weight": (1152, 4608), "blocks.27.scale_shift_table": (6, 1152),
        "final_layer.scale_shift_table": (2, 1152), "final_layer.linear.weight": (32, 1152),
    }.items() <= shapes.items()
    assert not any("norm" in k for k in shapes)  # no affine LayerNorms, as in PixArt
    shapes_1024 = {k: tuple(v.shape) for k, v in ours_1024.state_dict().items()}
    assert shapes_1024["pos_embed"] == (1, 4096, 1152) and shapes_1024["csize_embedder.mlp.0.weight"] == (384, 256)
    assert shapes_1024["ar_embedder.mlp.2.weight"] == (384, 384)
    for model in (ours, ours_1024):
        reference = reference_for(model, model.state_dict(), device="meta")
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(model) == count(reference)  # PixArt-α's ~611M weights


def test_interface_without_context_and_adaln_start():
    model = randomize_(DiT(**TINY)).eval()
    args = inputs(model, 8, 12)
    with torch.no_grad():
        out = model(args["x"], args["t"][0])  # a scalar time, no text: the blocks skip cross-attention
    assert out.shape == args["x"].shape and torch.isfinite(out).all()
    assert model.size_multiple == 2
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 4, 9, 12), 1)
    with pytest.raises(ValueError, match="no size embedders"):
        model(**args, y=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="learn_sigma"):
        model(**args, return_variance=True)
    fresh = DiT(**TINY)
    assert fresh(**args).abs().max() == 0  # zero output layer: training starts from a zero prediction
    again = DiT(**fresh.config)
    assert again.config == fresh.config and set(again.state_dict()) == set(fresh.state_dict())
