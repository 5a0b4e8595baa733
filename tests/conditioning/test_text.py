"""ClipTokenizer against open_clip's tokenizer, LearnedTextEncoder against a float64 recomputation."""

import math
import warnings

import open_clip
import pytest
import torch

from sdlight.conditioning import ClipTokenizer, LearnedTextEncoder

CAPTIONS = ["a red circle on the left", "", "two small blue squares!!", "a green triangle"]
LONG = "a very long caption " * 10  # > 40 BPE tokens


@pytest.mark.parametrize("max_length", [8, 32, 77])
def test_tokenizer_matches_open_clip(max_length):
    tok = ClipTokenizer("ViT-B-32", max_length)
    texts = CAPTIONS + [LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, lengths = tok(texts)
    ref = open_clip.get_tokenizer("ViT-B-32", context_length=max_length)(texts)
    assert torch.equal(ids, ref)
    # true lengths: <sot> + BPE + <eot>, capped at max_length
    bpe = open_clip.tokenizer.SimpleTokenizer()
    expected = [min(len(bpe.encode(t)) + 2, max_length) for t in texts]
    assert lengths.tolist() == expected
    assert (ids[torch.arange(len(texts)), lengths - 1] == bpe.eot_token_id).all()


def test_tokenizer_warns_once_on_truncation():
    tok = ClipTokenizer("ViT-B-32", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(CAPTIONS[:2])  # short captions: no warning
    with pytest.warns(UserWarning, match=r"1 of 2 captions exceed max_length=8"):
        tok([LONG, "short"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([LONG, LONG])  # reported once only


def test_tokenizer_rejects_too_short_length():
    with pytest.raises(ValueError):
        ClipTokenizer("ViT-B-32", 1)


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def _linear(x, lin):
    return x @ lin.weight.double().T + lin.bias.double()


def reference_encoder(enc: LearnedTextEncoder, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Float64 recomputation with explicit softmax attention, written from the architecture's definition."""
    enc = enc.eval()
    b, length = tokens.shape
    width = enc.token_embedding.embedding_dim
    x = enc.token_embedding.weight.double()[tokens] + enc.positional_embedding.double()[:length]
    pos = torch.arange(length)
    allowed = (pos[None, None, :] < lengths[:, None, None]).expand(b, length, length)  # (B, query, key)
    if enc.causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    for blk in enc.resblocks:
        heads = blk.attn.heads
        d = width // heads
        q, k, v = _linear(_layer_norm(x, blk.ln_1), blk.attn.qkv).split(width, dim=-1)
        q, k, v = (t.reshape(b, length, heads, d) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, length, width)
        x = x + _linear(attn, blk.attn.out_proj)
        h = _linear(_layer_norm(x, blk.ln_2), blk.mlp.c_fc)
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + _linear(h, blk.mlp.c_proj)
    x = _layer_norm(x, enc.ln_final)
    x = _linear(x, enc.proj) if enc.proj is not None else x
    return x * enc.context_scale


@pytest.mark.parametrize(("causal", "context_scale"), [(False, 1.0), (True, 1.0), (False, 10.0)])
def test_learned_encoder_matches_float64_reference(causal, context_scale):
    torch.manual_seed(0)
    enc = LearnedTextEncoder(max_length=16, width=32, layers=2, heads=4, context_dim=24, causal=causal,
                             context_scale=context_scale)
    # perturb the zero-initialised biases and LayerNorms so the reference checks them too
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    ctx = enc(CAPTIONS)
    assert ctx.shape == (4, 16, 24) and enc.context_dim == 24
    tokens, lengths = enc.tokenizer(CAPTIONS)
    ref = reference_encoder(enc, tokens, lengths)
    torch.testing.assert_close(ctx.double(), ref, rtol=1e-5, atol=2e-5)


def test_learned_encoder_context_scale_multiplies_the_context_and_must_be_positive():
    torch.manual_seed(0)
    one = LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2, context_dim=12)
    ten = LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2, context_dim=12, context_scale=10.0)
    ten.load_state_dict(one.state_dict())  # a constant, not a parameter: the same weights load either way
    torch.testing.assert_close(ten(CAPTIONS), 10 * one(CAPTIONS))
    with pytest.raises(ValueError, match="context_scale"):
        LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2, context_scale=0.0)


def test_learned_encoder_without_projection_has_width_dim():
    enc = LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2)
    assert enc.proj is None and enc.context_dim == 16
    assert enc(["a"]).shape == (1, 8, 16)
    assert LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2, context_dim=16).proj is None


@pytest.mark.parametrize("causal", [False, True])
def test_learned_encoder_ignores_padding_and_masks_future_when_causal(causal):
    torch.manual_seed(0)
    enc = LearnedTextEncoder(max_length=12, width=16, layers=2, heads=2, causal=causal).eval()
    tokens, lengths = enc.tokenizer(["a red circle", "a blue square left"])
    out = enc.encode_tokens(tokens, lengths)
    # different ids in the padding must not change the real tokens' embeddings
    noisy = tokens.clone()
    pad = torch.arange(12)[None] >= lengths[:, None]
    noisy[pad] = torch.randint(1, 1000, (int(pad.sum()),))
    out_noisy = enc.encode_tokens(noisy, lengths)
    real = ~pad
    torch.testing.assert_close(out[real], out_noisy[real], rtol=0, atol=1e-6)
    # changing the last real token: earlier tokens see it only in bidirectional mode
    edited = tokens.clone()
    edited[:, 2] = 999
    early = enc.encode_tokens(edited, lengths)[:, :2]
    moved = (early - out[:, :2]).abs().max().item()
    assert (moved < 1e-6) if causal else (moved > 1e-4)


def test_learned_encoder_gradients_null_and_truncation():
    torch.manual_seed(0)
    enc = LearnedTextEncoder(max_length=8, width=16, layers=2, heads=2, context_dim=12)
    texts = ["a red circle", "a blue square"]
    assert enc.input_key == "text"
    assert enc.null_like(texts) == ["", ""]
    null_ctx, real_ctx = enc(["", ""]), enc(texts)
    assert (null_ctx - real_ctx).abs().max() > 1e-3
    enc(texts).pow(2).mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    with pytest.warns(UserWarning, match="truncated"):
        ctx = enc([LONG])
    assert ctx.shape == (1, 8, 12)
