"""Attention modules against explicit float64 recomputations."""

import pytest
import torch

from sdlight.nn.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer, cached_context_projections
from sdlight.nn.unet import AttentionBlock, UNetModel


def reference_attention(module: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> tuple:
    """softmax(Q K^T / sqrt(d)) V per head, then to_out, all in float64."""
    wq, wk, wv = (layer.weight.double() for layer in (module.to_q, module.to_k, module.to_v))
    wo, bo = module.to_out[0].weight.double(), module.to_out[0].bias.double()
    x, context = x.double(), context.double()
    b, heads, d = x.shape[0], module.heads, module.dim_head
    q = (x @ wq.T).view(b, -1, heads, d).transpose(1, 2)
    k = (context @ wk.T).view(b, -1, heads, d).transpose(1, 2)
    v = (context @ wv.T).view(b, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, heads * d)
    return out @ wo.T + bo, probs.reshape(b * heads, q.shape[2], k.shape[2])


@pytest.mark.parametrize("cross", [True, False])
def test_cross_attention_matches_float64(cross):
    torch.manual_seed(0)
    attn = CrossAttention(24, context_dim=16 if cross else None, heads=3, dim_head=8).eval()
    x = torch.randn(2, 10, 24)
    context = torch.randn(2, 5, 16) if cross else None
    with torch.no_grad():
        out = attn(x, context)
        expected, _ = reference_attention(attn, x, x if context is None else context)
    assert attn.is_cross_attention is cross
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_attention_hook_path():
    torch.manual_seed(1)
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=8).eval()
    x, context = torch.randn(3, 9, 16), torch.randn(3, 4, 12)
    seen = []
    with torch.no_grad():
        fused = attn(x, context)
        attn.attention_hook = lambda module, probs: seen.append((module, probs))
        explicit = attn(x, context)
        _, expected_probs = reference_attention(attn, x, context)
    assert len(seen) == 1 and seen[0][0] is attn
    probs = seen[0][1]
    assert probs.shape == (3 * 2, 9, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, 9))
    torch.testing.assert_close(probs.double(), expected_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    # the hook is per instance: other modules keep the fused path
    assert CrossAttention(16).attention_hook is None


def _small_unet() -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                     context_dim=24, use_linear_in_transformer=True)
    with torch.no_grad():  # the zero-initialised output projections would hide the attention
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def test_hooks_collect_cross_attention_maps_from_unet():
    model = _small_unet()
    maps = []
    modules = [m for m in model.modules() if isinstance(m, CrossAttention) and m.is_cross_attention]
    assert len(modules) == 7  # one per input block (2), the middle block, one per output block (2 levels x 2)
    for m in modules:
        m.attention_hook = lambda module, probs: maps.append(probs.shape)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 7, 24))
    # (batch * heads, pixels, tokens): 32 channels / 16 = 2 heads at 8x8, 64 / 16 = 4 heads at 4x4
    assert sorted(maps) == sorted([(4, 64, 7)] * 3 + [(8, 16, 7)] * 4)


def test_transformer_block_flags_and_identity_init():
    block = BasicTransformerBlock(32, 4, 8, context_dim=20)
    assert not block.attn1.is_cross_attention and block.attn2.is_cross_attention
    upscaler_block = BasicTransformerBlock(32, 4, 8, context_dim=20, disable_self_attn=True)
    assert upscaler_block.attn1.is_cross_attention
    assert upscaler_block.attn1.to_k.weight.shape == (32, 20)
    for use_linear in (False, True):
        st = SpatialTransformer(64, 4, 16, context_dim=20, use_linear=use_linear).eval()
        x = torch.randn(2, 64, 4, 4)
        with torch.no_grad():
            # zero-initialised proj_out: a fresh transformer is the identity ...
            torch.testing.assert_close(st(x, torch.randn(2, 3, 20)), x)
            torch.nn.init.normal_(st.proj_out.weight, std=0.1)
            # ... and not after training moved it
            assert (st(x, torch.randn(2, 3, 20)) - x).abs().max() > 1e-3
        key = "transformer_blocks.0.ff.net.0.proj.weight"
        assert st.state_dict()[key].shape == (2 * 4 * 64, 64)
        assert st.state_dict()["transformer_blocks.0.ff.net.2.weight"].shape == (64, 4 * 64)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_float64(new_order):
    torch.manual_seed(2)
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    torch.nn.init.normal_(block.proj_out.bias, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        out = block(x)
        gn = block.norm
        h = torch.nn.functional.group_norm(
            x.double().reshape(2, 64, 16), 32, gn.weight.double(), gn.bias.double(), gn.eps
        )
        qkv = torch.nn.functional.conv1d(h, block.qkv.weight.double(), block.qkv.bias.double())
        if new_order:  # q, k, v blocks of all heads
            q, k, v = (t.reshape(2 * 4, 16, 16) for t in qkv.chunk(3, dim=1))
        else:  # per head: (q, k, v) channel blocks
            q, k, v = qkv.reshape(2 * 4, 3 * 16, 16).split(16, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 16**0.5, dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(2, 64, 16)
        a = torch.nn.functional.conv1d(a, block.proj_out.weight.double(), block.proj_out.bias.double())
        expected = (x.double().reshape(2, 64, 16) + a).reshape(2, 64, 4, 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_cached_context_projections_compute_k_and_v_once_per_context(monkeypatch):
    unet = _small_unet()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    t = [torch.tensor([999, 999]), torch.tensor([500, 500]), torch.tensor([1, 1])]
    with torch.no_grad():
        plain = [unet(x, s, context=ctx) for s in t]
    calls = []
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention) and m.is_cross_attention]
    for layer in layers:
        real = layer.to_k.forward
        layer.to_k.forward = lambda c, real=real: calls.append(1) or real(c)
    with torch.no_grad(), cached_context_projections(unet):
        cached = [unet(x, s, context=ctx) for s in t]
        assert len(calls) == len(layers)  # once for three steps
        other = torch.randn(2, 5, 24)
        torch.testing.assert_close(unet(x, t[0], context=other), _plain(unet, x, t[0], other), rtol=0, atol=0)
        ctx.mul_(2.0)  # an in-place change is seen
        torch.testing.assert_close(unet(x, t[0], context=ctx), _plain(unet, x, t[0], ctx), rtol=0, atol=0)
        ctx.div_(2.0)
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)  # the same numbers, bit for bit
    assert all(layer._kv_cache is None for layer in layers)  # nothing kept after the block
    with torch.no_grad(), cached_context_projections(unet):  # nested blocks: the inner one leaves the outer's
        unet(x, t[0], context=ctx)
        with cached_context_projections(unet):
            unet(x, t[0], context=ctx)
        assert all(len(layer._kv_cache) == 1 for layer in layers)
    assert all(layer._kv_cache is None for layer in layers)
    with cached_context_projections(unet):  # with gradients (training) it never caches
        calls.clear()
        unet(x, t[0], context=ctx).sum().backward()
        unet(x, t[1], context=ctx)
        assert len(calls) == 2 * len(layers)


def _plain(unet: UNetModel, x, t, ctx):
    saved = {}
    for m in unet.modules():
        if isinstance(m, CrossAttention) and m._kv_cache is not None:
            saved[m] = m.__dict__.pop("_kv_cache")
    try:
        return unet(x, t, context=ctx)
    finally:
        for m, cache in saved.items():
            m._kv_cache = cache
