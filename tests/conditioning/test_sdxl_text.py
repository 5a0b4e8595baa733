"""SD-XL's text conditioning on tiny random towers, against transformers' CLIP text models (what diffusers' SD-XL
pipeline runs: ``text_encoder`` = CLIPTextModel, ``text_encoder_2`` = CLIPTextModelWithProjection)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sdlight.conditioning import CLIPTextTower, Conditioner, SDXLTextEncoder, SizeEmbedder
from sdlight.convert import hf_clip_text_config, open_clip_to_hf
from sdlight.weights import WeightsNotFoundError

transformers = pytest.importorskip("transformers")

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
TEXTS = ["a photograph of an astronaut riding a horse", "", "a red circle!"]
# SD-XL's two towers in miniature: CLIP-L (QuickGELU, <eot> padding, tokens only) and bigG (GELU, pooled)
CLIP_L = dict(arch="ViT-L-14-quickgelu", layer="penultimate", pad_with_eot=True,
              text_cfg=dict(width=32, heads=2, layers=3))
CLIP_G = dict(arch="ViT-bigG-14", layer="penultimate", pooled=True, text_cfg=dict(width=48, heads=4, layers=3),
              embed_dim=24)


def randomized(tower: CLIPTextTower, seed: int) -> CLIPTextTower:
    """Random LayerNorm affines too, so that applying ln_final or not is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return tower


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return randomized(CLIPTextTower(**CLIP_L), 1), randomized(CLIPTextTower(**CLIP_G), 2)


def hf_twin(tower: CLIPTextTower, with_projection: bool, quick_gelu: bool) -> torch.nn.Module:
    """transformers' CLIP text model holding the tower's weights (sdlight.convert's key map, q/k/v split)."""
    sd = {k.removeprefix("model."): v for k, v in tower.state_dict().items()}
    layers = len(tower.model.transformer.resblocks)
    config = hf_clip_text_config(sd, tower.model.heads, layers, quick_gelu)
    config.update(eos_token_id=49407, pad_token_id=49407)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(transformers.CLIPTextConfig(**config)).eval()
    # transformers 5 names CLIPTextModel's keys without the "text_model." of the files on the hub
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    hf = open_clip_to_hf(sd, layers, prefix)
    if with_projection:
        hf["text_projection.weight"] = sd["text_projection"].T
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return model


def test_clip_l_is_transformers_penultimate_hidden_state_without_final_norm(towers, tmp_path):
    clip_l, _ = towers
    ids, _ = clip_l.tokenizer(TEXTS)
    # SD-XL tokenizes for CLIP-L with transformers' CLIPTokenizer, padding with <|endoftext|>
    from sdlight.export import tokenizer_files

    tokenizer_files(clip_l.tokenizer, tmp_path)
    hf_tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                        pad_token="<|endoftext|>")
    theirs = hf_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, theirs)
    assert ids[1, 2:].eq(49407).all()  # the empty caption: <sot> then <eot> to the end
    states, pooled = clip_l(TEXTS)
    assert states.shape == (3, 77, 32) and pooled is None
    with torch.no_grad():
        out = hf_twin(clip_l, with_projection=False, quick_gelu=True)(ids, output_hidden_states=True)
    torch.testing.assert_close(states, out.hidden_states[-2], rtol=1e-5, atol=1e-5)  # diffusers: hidden_states[-2]
    assert (states - out.last_hidden_state).abs().max() > 1e-2


def test_bigg_penultimate_states_and_pooled_projection_match_transformers(towers):
    _, clip_g = towers
    ids, _ = clip_g.tokenizer(TEXTS)
    assert ids[1, 2:].eq(0).all()  # open_clip.tokenize pads with 0, as SD-XL's second tokenizer
    states, pooled = clip_g(TEXTS)
    assert states.shape == (3, 77, 48) and pooled.shape == (3, 24)
    with torch.no_grad():
        out = hf_twin(clip_g, with_projection=True, quick_gelu=False)(ids, output_hidden_states=True)
    torch.testing.assert_close(states, out.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=1e-5, atol=1e-5)


def test_encoder_joins_towers_along_width_and_zeros_the_null(towers):
    enc = SDXLTextEncoder(list(towers))
    assert (enc.context_dim, enc.vector_dim, enc.routes) == (80, 24, ("crossattn", "vector"))
    out = enc(TEXTS)
    (l_states, _), (g_states, g_pooled) = towers[0](TEXTS), towers[1](TEXTS)
    torch.testing.assert_close(out["crossattn"], torch.cat([l_states, g_states], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(out["vector"], g_pooled, rtol=0, atol=0)
    # SD-XL's null: zeros for a dropped caption, the others untouched
    assert enc.null_like(TEXTS) == [None, None, None]
    dropped = enc(["a photograph of an astronaut riding a horse", None, "a red circle!"])
    assert dropped["crossattn"][1].abs().max() == 0 and dropped["vector"][1].abs().max() == 0
    torch.testing.assert_close(dropped["crossattn"][[0, 2]], out["crossattn"][[0, 2]], rtol=0, atol=0)
    assert out["crossattn"][1].abs().max() > 0.1  # the encoded empty caption is not the null
    empty = SDXLTextEncoder(list(towers), null_text="empty")
    assert empty.null_like(["x"]) == [""]
    with pytest.raises(ValueError, match="null_text"):
        SDXLTextEncoder(list(towers), null_text="none")


def test_conditioner_routes_tokens_to_context_and_pooled_plus_sizes_to_y(towers):
    sizes = [SizeEmbedder(k, dim=8, drop_rate=0.0, default=d) for k, d in
             (("original_size", [64, 64]), ("crop_coords", [0, 0]), ("target_size", [64, 64]))]
    conditioner = Conditioner([SDXLTextEncoder(list(towers)), *sizes])
    values = conditioner.values({"text": TEXTS[:2], "original_size": [[96, 48], [64, 64]]})
    assert values["crop_coords"].tolist() == [[0, 0], [0, 0]]  # the defaults stand in for absent entries
    assert values["target_size"].tolist() == [[64, 64], [64, 64]]
    out = conditioner(values)
    assert out["context"].shape == (2, 77, 80) and out["y"].shape == (2, 24 + 3 * 16)
    embedded = [s(values[s.input_key]) for s in sizes]
    torch.testing.assert_close(out["y"], torch.cat([towers[1](TEXTS[:2])[1], *embedded], dim=1), rtol=0, atol=0)
    # guidance's unconditional branch: zero text, the same sizes (never dropped)
    null = conditioner(conditioner.null_like(values))
    assert null["context"].abs().max() == 0 and null["y"][:, :24].abs().max() == 0
    torch.testing.assert_close(null["y"][:, 24:], out["y"][:, 24:], rtol=0, atol=0)
    # one caption drop covers both towers (one draw per sample)
    gen = torch.Generator().manual_seed(0)
    dropped = conditioner.drop(values, 1.0, gen)
    assert dropped["text"] == [None, None] and torch.equal(dropped["original_size"], values["original_size"])


def test_frozen_and_left_out_of_training(towers):
    enc = SDXLTextEncoder([CLIPTextTower(**CLIP_L), CLIPTextTower(**CLIP_G)])
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert all(not t.model.training for t in enc.towers)
    assert Conditioner([enc]).trainable_part() is None


def test_tiny_config_fits_its_unet_numbers():
    cfg = OmegaConf.load(CONF / "conditioning" / "sdxl_text_tiny.yaml")
    torch.manual_seed(0)
    enc = instantiate(cfg.conditioning)
    sizes = instantiate(cfg.conditioners)
    assert enc.context_dim == 80  # quickstart_sdxl's model.unet.context_dim
    assert enc.vector_dim + sum(s.output_dim for s in sizes.values()) == 128  # its adm_in_channels


def test_release_config_widths_are_sdxl_base(monkeypatch):
    # built on the meta device: the real towers' shapes without their 2.8 GB of weights
    cfg = OmegaConf.load(CONF / "conditioning" / "sdxl_text.yaml")
    unet = OmegaConf.load(CONF / "unet" / "sdxl.yaml")
    cfg.conditioning.pretrained = False
    with torch.device("meta"):
        enc = instantiate(cfg.conditioning)
    sizes = instantiate(cfg.conditioners)
    assert [t.width for t in enc.towers] == [768, 1280] and enc.context_dim == unet.context_dim == 2048
    assert enc.vector_dim == 1280 and enc.vector_dim + sum(s.output_dim for s in sizes.values()) == 2816
    assert unet.adm_in_channels == 2816
    n = sum(p.numel() for p in enc.towers[1].parameters())
    assert n == 694_659_840  # OpenCLIP ViT-bigG/14's text tower with its projection (no logit_scale)


def test_release_weights_missing_offline_fail_fast(offline):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "conditioning" / "sdxl_text.yaml").conditioning)
    assert cfg.pop("_target_") == "sdlight.conditioning.SDXLTextEncoder"
    with pytest.raises(WeightsNotFoundError) as err:
        SDXLTextEncoder(**cfg)
    message = str(err.value)
    assert "\n" not in message and "ViT-L-14-quickgelu" in message and "openai" in message
