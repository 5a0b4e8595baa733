"""OpenCLIPTextEncoder on a tiny random open_clip model: per-token embeddings, freezing, weight loading."""

import json
import time

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from sdlight.conditioning import OpenCLIPTextEncoder
from sdlight.conditioning.open_clip_weights import load_open_clip_text_model, text_state_dict
from sdlight.weights import WeightsNotFoundError

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
TEXTS = ["a photograph of an astronaut riding a horse", "", "a red circle!"]


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(TINY_CFG["embed_dim"], CLIPVisionCfg(**TINY_CFG["vision_cfg"]), CLIPTextCfg(**TINY_CFG["text_cfg"]))
    # random LayerNorm affine parameters, so that ln_final is really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


def tokens_of(texts, length=77):
    return open_clip.get_tokenizer("ViT-B-32", context_length=length)(texts)


def test_last_layer_matches_open_clip_text_path(model):
    enc = OpenCLIPTextEncoder(arch="ViT-B-32", layer="last", model=model)
    assert enc.context_dim == 32 and enc.input_key == "text"
    ctx = enc(TEXTS)
    assert ctx.shape == (3, 77, 32)
    tokens = tokens_of(TEXTS)
    out = model.forward_intermediates(text=tokens, intermediates_only=True, normalize_intermediates=True)
    torch.testing.assert_close(ctx, out["text_intermediates"][-1], rtol=1e-5, atol=1e-5)
    # pooled at <eot> and projected, the tokens give exactly CLIP's text embedding
    pooled = ctx[torch.arange(3), tokens.argmax(dim=-1)]
    torch.testing.assert_close(pooled @ model.text_projection, model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_penultimate_is_all_but_last_block_then_ln_final(model):
    enc = OpenCLIPTextEncoder(arch="ViT-B-32", layer="penultimate", model=model)
    ctx = enc(TEXTS)
    tokens = tokens_of(TEXTS)
    n = len(model.transformer.resblocks)
    out = model.forward_intermediates(text=tokens, text_indices=[n - 2], intermediates_only=True)
    torch.testing.assert_close(ctx, model.ln_final(out["text_intermediates"][0]), rtol=1e-5, atol=1e-5)
    last = OpenCLIPTextEncoder(arch="ViT-B-32", layer="last", model=model)(TEXTS)
    assert (ctx - last).abs().max() > 1e-2


def test_shorter_context_is_a_prefix_of_the_full_one(model):
    # causal mask: with the same tokens up front, 16 positions give the first 16 of 77
    short = OpenCLIPTextEncoder(arch="ViT-B-32", layer="penultimate", max_length=16, model=model)
    full = OpenCLIPTextEncoder(arch="ViT-B-32", layer="penultimate", max_length=77, model=model)
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(short(texts), full(texts)[:, :16], rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="truncated"):
        assert short([TEXTS[0] * 3]).shape == (1, 16, 32)
    with pytest.raises(ValueError):
        OpenCLIPTextEncoder(arch="ViT-B-32", max_length=78, model=model)


def test_frozen_no_grads_eval_forced_out_of_trainable_set():
    model = tiny_clip()
    enc = OpenCLIPTextEncoder(arch="ViT-B-32", model=model)
    assert not hasattr(enc.model, "visual")
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == []
    enc.train()
    assert enc.training and not enc.model.training
    assert all(not m.training for m in enc.model.modules())
    head = torch.nn.Linear(32, 1)
    ctx = enc(["a red circle"])
    assert ctx.grad_fn is None
    head(ctx).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in enc.parameters())
    # CompVis FrozenOpenCLIPEmbedder key names
    keys = set(enc.state_dict())
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in keys and "model.ln_final.weight" in keys
    assert not any(k.startswith("model.visual") for k in keys)


def test_null_condition_is_the_encoded_empty_caption(model):
    enc = OpenCLIPTextEncoder(arch="ViT-B-32", model=model)
    assert enc.null_like(["x", "y"]) == ["", ""]
    null = enc(enc.drop(["a red circle", "a blue square"], 1.0))
    torch.testing.assert_close(null, enc(["", ""]))
    assert (null - enc(["a red circle", "a blue square"])).abs().max() > 1e-3


def test_bad_layer_rejected(model):
    with pytest.raises(ValueError):
        OpenCLIPTextEncoder(arch="ViT-B-32", layer="first", model=model)


def test_missing_weights_offline_fail_fast_naming_the_file(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        OpenCLIPTextEncoder()  # ViT-H-14 laion2b_s32b_b79k, nowhere local
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert "open_clip-ViT-H-14-laion2b_s32b_b79k.bin" in message
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    with pytest.raises(WeightsNotFoundError, match="nothing.safetensors"):
        OpenCLIPTextEncoder(checkpoint_path=offline / "nothing.safetensors")
    with pytest.raises(ValueError, match="no open_clip release"):
        OpenCLIPTextEncoder(pretrained="not-a-release")


@pytest.fixture
def tiny_arch(tmp_path):
    """Register a tiny architecture with open_clip, as a user's own model config would be."""
    (tmp_path / "sdlight-tiny-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path)
    return "sdlight-tiny-test"


@pytest.mark.parametrize("layout", ["open_clip", "compvis"])
def test_loads_text_weights_from_checkpoint_path(tiny_arch, tmp_path, layout):
    source = tiny_clip(seed=1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout == "compvis":  # a Stable Diffusion 2.x checkpoint: the text encoder is cond_stage_model.model.*
        state = {f"cond_stage_model.model.{k}": v for k, v in state.items() if not k.startswith("visual.")}
        state["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    enc = OpenCLIPTextEncoder(arch=tiny_arch, checkpoint_path=path, layer="last")
    ref = OpenCLIPTextEncoder(arch=tiny_arch, layer="last", model=source)
    torch.testing.assert_close(enc(TEXTS), ref(TEXTS), rtol=0, atol=0)
    assert not hasattr(enc.model, "visual")


def test_mismatched_checkpoint_is_refused(tiny_arch, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_clip().state_dict().items() if "resblocks.2." not in k}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="missing"):
        load_open_clip_text_model(tiny_arch, None, path)


def test_text_state_dict_unwraps_training_checkpoints():
    w = torch.zeros(1)
    assert text_state_dict({"state_dict": {"module.ln_final.weight": w, "module.visual.proj": w}}) == {
        "ln_final.weight": w
    }
    assert text_state_dict({"cond_stage_model.model.ln_final.weight": w, "first_stage_model.x": w}) == {
        "ln_final.weight": w
    }
