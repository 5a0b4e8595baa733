"""MMDiT: equal to diffusers' SD3Transformer2DModel through diffusers' own SD3 single-file converter; key names of
SD3 / SD3.5 single files; the cropped position table by hand."""

import math
import warnings

import pytest
import torch

import sdlight.nn.mmdit as mmdit_module
from sdlight.nn.mmdit import MMDiT, sincos_pos_embed

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

PREFIX = "model.diffusion_model."
# float32 agrees to ~4e-7 here; 1e-4 would let exact GELU pass for the tanh one (5.8e-5 on the tiny model)
TOL = 1e-5
# SD3-medium widths (hidden 1536, 24 heads of 64) with 2 of its 24 blocks
SD3_MEDIUM = dict(patch_size=2, in_channels=16, depth=2, num_heads=24, hidden=1536, pos_embed_max_size=192,
                  context_dim=4096, pooled_dim=2048, out_channels=16)
TINY = dict(patch_size=2, in_channels=4, depth=3, num_heads=4, hidden=64, pos_embed_max_size=16, context_dim=48,
            pooled_dim=24, out_channels=4)


def randomize_(module: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Weights of a trained network's scale everywhere, the zero-initialised adaLN and output layers included, so
    no branch compares as trivially zero: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.02²), norm gains 1 ± 0.05."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.05 * noise)
            else:
                p.copy_(0.02 * noise)
    return module


def to_diffusers(model: MMDiT) -> SD3Transformer2DModel:
    """Our state dict with the single files' prefix, through diffusers' converter, loaded strict."""
    cfg = model.config
    checkpoint = {PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SD3Transformer2DModel(
            sample_size=128, patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], num_layers=cfg["depth"],
            attention_head_dim=model.hidden // cfg["num_heads"], num_attention_heads=cfg["num_heads"],
            joint_attention_dim=cfg["context_dim"], caption_projection_dim=model.hidden,
            pooled_projection_dim=cfg["pooled_dim"], out_channels=cfg["out_channels"],
            pos_embed_max_size=cfg["pos_embed_max_size"], dual_attention_layers=tuple(cfg["dual_attention_layers"]),
            qk_norm="rms_norm" if cfg["qk_norm"] == "rms" else None,
        )
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def inputs(model: MMDiT, height: int, width: int, batch: int = 2, tokens: int = 7) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(batch, model.in_channels, height, width, generator=gen),
        t=torch.tensor([1000 * 0.31, 1000 * 0.97])[:batch],  # sigma · 1000, as SD3 feeds it
        context=torch.randn(batch, tokens, model.context_dim, generator=gen),
        y=torch.randn(batch, model.pooled_dim, generator=gen),
    )


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare(model: MMDiT, reference: SD3Transformer2DModel, height: int, width: int) -> float:
    args = inputs(model, height, width)
    with torch.no_grad():
        ours = model(**args)
        theirs = reference(hidden_states=args["x"], encoder_hidden_states=args["context"],
                           pooled_projections=args["y"], timestep=args["t"], return_dict=False)[0]
    assert ours.shape == theirs.shape == args["x"].shape
    assert theirs.abs().max() > 0.1  # a real signal, not adaLN-zero's zeros
    return relative_error(ours, theirs)


@pytest.fixture(scope="module")
def sd3_medium_pair():
    torch.manual_seed(0)
    model = randomize_(MMDiT(**SD3_MEDIUM)).eval()
    return model, to_diffusers(model)


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_sd3_medium_widths_match_diffusers(sd3_medium_pair, height, width):
    model, reference = sd3_medium_pair
    assert compare(model, reference, height, width) <= TOL


def test_sd35_medium_qk_norm_and_dual_attention_match_diffusers():
    """SD3.5 medium: RMS qk-norm in every attention, the image stream's second self-attention in block 0."""
    model = randomize_(MMDiT(**SD3_MEDIUM, qk_norm="rms", dual_attention_layers=[0])).eval()
    assert model.joint_blocks[0].x_block.adaLN_modulation[1].out_features == 9 * 1536
    assert compare(model, to_diffusers(model), 32, 48) <= TOL


@pytest.mark.parametrize("options", [{}, {"qk_norm": "rms"}, {"dual_attention_layers": [0, 1]}])
def test_tiny_matches_diffusers(options):
    model = randomize_(MMDiT(**TINY, **options)).eval()
    assert compare(model, to_diffusers(model), 12, 20) <= TOL


def test_comparison_can_fail():
    """A changed weight the conversion carries (the pre_only block's context modulation, which diffusers stores
    with scale and shift swapped) must show."""
    model = randomize_(MMDiT(**TINY)).eval()
    reference = to_diffusers(model)
    with torch.no_grad():
        model.joint_blocks[-1].context_block.adaLN_modulation[1].bias.add_(0.5)
    assert compare(model, reference, 12, 20) > 1e-3


def assert_checkpointing_keeps_gradients(model, args: dict, module, monkeypatch, depth: int) -> None:
    """``set_gradient_checkpointing``: one non-reentrant checkpoint per block in training, none without gradients,
    the same gradients (also used by test_dit.py)."""
    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(**args).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    calls = []

    def counting_checkpoint(*a, **k):
        calls.append(k.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*a, **k)

    monkeypatch.setattr(module, "checkpoint", counting_checkpoint)
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    assert calls == [False] * depth  # one per block, non-reentrant
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        model(**args)
    assert len(calls) == depth  # nothing to recompute without gradients


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = randomize_(MMDiT(**TINY, qk_norm="rms", dual_attention_layers=[1]))
    assert_checkpointing_keeps_gradients(model, inputs(model, 12, 16), mmdit_module, monkeypatch, TINY["depth"])


def test_cropped_position_table_by_hand():
    """A 3 x 5 patch grid (6 x 10 latents) from an 8 x 8 table of width 8: the centre crop starts at row
    (8 - 3) // 2 = 2, column (8 - 5) // 2 = 1; each vector is [sin, cos of the column; sin, cos of the row] at
    frequencies 1 and 1/100."""
    model = MMDiT(patch_size=2, in_channels=4, depth=2, num_heads=2, hidden=8, pos_embed_max_size=8,
                  context_dim=8, pooled_dim=None)
    table = model.cropped_pos_embed(6, 10)
    assert table.shape == (1, 15, 8)
    for i in range(3):
        for j in range(5):
            row, col = 2 + i, 1 + j
            expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                        math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
            torch.testing.assert_close(table[0, i * 5 + j], torch.tensor(expected), rtol=0, atol=1e-6)


def test_position_table_is_diffusers_for_a_scaling_factor():
    """diffusers builds SD3's table with positions divided by pos_embed_max_size / (sample_size / patch_size);
    the same factor gives the same table here."""
    theirs = get_2d_sincos_pos_embed(64, 48, base_size=16, output_type="pt")
    torch.testing.assert_close(sincos_pos_embed(64, 48, scaling_factor=3.0), theirs.float(), rtol=0, atol=1e-5)
    assert not torch.allclose(sincos_pos_embed(64, 48), theirs.float(), atol=1e-2)


def sd_keys(**config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {PREFIX + k: v.shape for k, v in MMDiT(**config).state_dict().items()}


def as_meta_tensors(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_key_names_of_sd3_single_files():
    medium = sd_keys(depth=24)  # SD3 medium: every other width follows from the depth
    assert {
        "x_embedder.proj.weight": (1536, 16, 2, 2), "pos_embed": (1, 36864, 1536),
        "t_embedder.mlp.0.weight": (1536, 256), "t_embedder.mlp.2.weight": (1536, 1536),
        "y_embedder.mlp.0.weight": (1536, 2048), "context_embedder.weight": (1536, 4096),
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
        "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536), "joint_blocks.0.x_block.mlp.fc2.weight": (1536, 6144),
        "joint_blocks.23.context_block.adaLN_modulation.1.weight": (3072, 1536),
        "joint_blocks.23.context_block.attn.qkv.bias": (4608,),
        "final_layer.adaLN_modulation.1.weight": (3072, 1536), "final_layer.linear.weight": (64, 1536),
    }.items() <= {k[len(PREFIX):]: tuple(v) for k, v in medium.items()}.items()
    for absent in ("joint_blocks.23.context_block.attn.proj.weight", "joint_blocks.23.context_block.mlp.fc1.weight",
                   "joint_blocks.0.x_block.attn.ln_q.weight", "joint_blocks.0.x_block.attn2.qkv.weight"):
        assert PREFIX + absent not in medium
    assert infer_diffusers_model_type(as_meta_tensors(medium)) == "sd3"

    sd35 = sd_keys(depth=24, pos_embed_max_size=384, qk_norm="rms", dual_attention_layers=list(range(13)))
    assert tuple(sd35[PREFIX + "joint_blocks.12.x_block.attn2.qkv.weight"]) == (4608, 1536)
    assert tuple(sd35[PREFIX + "joint_blocks.0.x_block.adaLN_modulation.1.weight"]) == (13824, 1536)
    assert tuple(sd35[PREFIX + "joint_blocks.23.context_block.attn.ln_k.weight"]) == (64,)
    assert PREFIX + "joint_blocks.13.x_block.attn2.qkv.weight" not in sd35
    assert infer_diffusers_model_type(as_meta_tensors(sd35)) == "sd35_medium"
    large = sd_keys(depth=38, qk_norm="rms")
    assert infer_diffusers_model_type(as_meta_tensors(large)) == "sd35_large"


def test_interface_without_context_or_pooled_vector():
    """sdlight's backbone call: y=None stands for a zero pooled vector; no context leaves the image tokens alone."""
    model = randomize_(MMDiT(**TINY)).eval()
    args = inputs(model, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(args["x"], args["t"], args["context"]),
                                   model(args["x"], args["t"], args["context"], torch.zeros_like(args["y"])))
        out = model(args["x"], args["t"][0])  # a scalar time, no conditions
    assert out.shape == args["x"].shape and torch.isfinite(out).all()
    assert model.size_multiple == 2
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 4, 9, 12), 1.0)
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, 4, 34, 12), 1.0)


def test_fresh_model_starts_as_adaln_zero_and_config_rebuilds_it():
    model = MMDiT(**TINY)
    args = inputs(model, 8, 8)
    assert model(**args).abs().max() == 0  # zero output layer: training starts from a zero prediction
    again = MMDiT(**model.config)
    assert again.config == model.config
    assert set(again.state_dict()) == set(model.state_dict())
