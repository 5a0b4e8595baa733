"""The T5 text tower (SD3's third encoder) on tiny random T5 encoders built here: where its weights are found,
what a missing one says, its state dict, and SD3's joining of CLIP and T5 tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdlight.conditioning import CLIPTextTower, SDXLTextEncoder
from sdlight.conditioning.t5 import T5Tower
from sdlight.weights import WeightsNotFoundError

from tests.conftest import compose_train

transformers = pytest.importorskip("transformers")

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
TEXTS = ["a red circle in the center", "", "a blue square at the top left on a black background"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random T5 encoder and the byte tokenizer saved as a T5EncoderModel folder (what from_pretrained writes)."""
    torch.manual_seed(0)
    tower = T5Tower(tokenizer="byt5", config=TINY_T5, max_length=20)
    folder = tmp_path_factory.mktemp("t5") / "tiny-t5"
    tower.model.save_pretrained(folder)
    tower.tokenizer.save_pretrained(folder)
    return tower, folder


def test_tokens_are_the_pipelines_and_states_are_t5s_last_hidden_state(saved):
    tower, _ = saved
    ids = tower.tokenize(TEXTS)
    assert ids.shape == (3, 20) and ids[1, 0] == tower.tokenizer.eos_token_id and (ids[1, 1:] == 0).all()
    assert ids[2, -1] == tower.tokenizer.eos_token_id  # truncated, </s> kept last
    states, pooled = tower(TEXTS)
    with torch.no_grad():
        want = tower.model(input_ids=ids).last_hidden_state
    assert pooled is None and states.shape == (3, 20, 32) and torch.equal(states, want)


def test_a_folder_and_the_weights_dir_load_the_same_encoder(saved, monkeypatch, tmp_path):
    tower, folder = saved
    want = tower(TEXTS)[0]
    assert torch.equal(T5Tower(pretrained=folder, max_length=20)(TEXTS)[0], want)
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(folder.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = T5Tower(pretrained="someone/tiny-t5", max_length=20)  # $SDLIGHT_WEIGHTS/<the id's last part>
    assert torch.equal(found(TEXTS)[0], want)


def test_missing_weights_offline_are_one_line_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("SDLIGHT_WEIGHTS", raising=False)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=r"the T5 tokenizer google/t5-v1_1-xxl was not found \(offline"
                       ) as info:
        T5Tower(pretrained="google/t5-v1_1-xxl")
    assert "\n" not in str(info.value) and time.perf_counter() - start < 10
    with pytest.raises(WeightsNotFoundError, match="the T5 encoder google/t5-v1_1-xxl was not found"):
        T5Tower(pretrained="google/t5-v1_1-xxl", tokenizer="byt5")


def test_the_state_dict_holds_the_tied_embedding_once_and_loads_back(saved):
    tower, _ = saved
    sd = tower.state_dict()
    assert "model.shared.weight" in sd and "model.encoder.embed_tokens.weight" not in sd
    torch.manual_seed(1)
    other = T5Tower(tokenizer="byt5", config=TINY_T5, max_length=20)
    other.load_state_dict(sd)
    assert other.model.encoder.embed_tokens.weight is other.model.shared.weight
    assert torch.equal(other(TEXTS)[0], tower(TEXTS)[0])


def test_frozen_in_train_mode():
    tower = T5Tower(tokenizer="byt5", config=TINY_T5)
    tower.train()
    assert not tower.model.training and not any(p.requires_grad for p in tower.parameters())


def clip_towers():
    torch.manual_seed(0)
    return [CLIPTextTower(arch="ViT-L-14-quickgelu", pooled=True, project_pooled=False, max_length=12,
                          text_cfg=dict(context_length=12, width=8, heads=2, layers=2)),
            CLIPTextTower(arch="ViT-bigG-14", pooled=True, max_length=12, embed_dim=6,
                          text_cfg=dict(context_length=12, width=16, heads=2, layers=2))]


def test_sd3_joins_clip_tokens_padded_to_t5s_width_then_t5s_tokens(saved):
    tower, _ = saved
    towers = clip_towers()
    encoder = SDXLTextEncoder(towers, t5=tower)
    out = encoder(TEXTS)
    clip_l, pooled_l = towers[0](TEXTS)
    clip_g, pooled_g = towers[1](TEXTS)
    assert encoder.context_dim == 32 and encoder.vector_dim == 8 + 6 == out["vector"].shape[1]
    assert out["crossattn"].shape == (3, 12 + 20, 32)
    assert torch.equal(out["crossattn"][:, :12, :8], clip_l) and torch.equal(out["crossattn"][:, :12, 8:24], clip_g)
    assert (out["crossattn"][:, :12, 24:] == 0).all()
    assert torch.equal(out["crossattn"][:, 12:], tower(TEXTS)[0])
    # CLIP-L's pooled output unprojected: ln_final at <eot>, its width
    assert pooled_l.shape == (3, 8) and towers[0].model.text_projection is None
    assert torch.equal(out["vector"], torch.cat([pooled_l, pooled_g], dim=1))
    null = encoder([None])
    assert null["crossattn"].shape == (1, 32, 32) and not null["crossattn"].any() and not null["vector"].any()


def test_t5_narrower_than_the_clip_tokens_is_refused():
    narrow = T5Tower(tokenizer="byt5", config=dict(TINY_T5, d_model=16, d_kv=4))
    with pytest.raises(ValueError, match="T5's width 16 is below the CLIP towers' 24"):
        SDXLTextEncoder(clip_towers(), t5=narrow)


def test_sd3_text_t5_config_is_sd3s(tmp_path):
    """The T5 of model/conditioning=sd3_text_t5 is T5-XXL v1.1's encoder as Stability's SD3 reference code builds
    it (its T5_CONFIG), 256 tokens as diffusers' pipeline; CLIP-L's pooled output unprojected."""
    cfg = compose_train(["+experiment=sd3", "model/conditioning=sd3_text_t5", "model.unet.context_dim=4096",
                         "model.first_stage.ckpt=x", "data.root=x",  # an SD3 diffusers folder's T5, as README says
                         "model.conditioning.t5.tokenizer=DIR",
                         "model.conditioning.t5.tokenizer_subfolder=tokenizer_3"],
                        tmp_path)
    t5 = cfg.model.conditioning.t5
    assert (t5.tokenizer, t5.tokenizer_subfolder) == ("DIR", "tokenizer_3")
    assert (t5.config.d_ff, t5.config.d_model, t5.config.num_heads, t5.config.num_layers, t5.config.vocab_size) == \
        (10240, 4096, 64, 24, 32128)
    assert t5.max_length == 256 and t5.config.feed_forward_proj == "gated-gelu"
    assert cfg.model.conditioning.towers.clip_l.project_pooled is False
    transformers.T5Config(**OmegaConf.to_container(t5.config))  # every key is T5Config's
