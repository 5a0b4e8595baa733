"""The conditioner: routes, independent dropping per encoder, errors, and CompVis key names with one encoder."""

from __future__ import annotations

import math

import pytest
import torch

from sdlight.conditioning import (AttributeEmbedder, ClassEmbedder, Conditioner, LearnedTextEncoder,
                                  NoConditioning, SizeEmbedder)

DIM = 16


def text_encoder(**options) -> LearnedTextEncoder:
    torch.manual_seed(0)
    return LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2, context_dim=DIM, **options)


def sinusoid(value: float, dim: int) -> list[float]:
    """CompVis' timestep embedding of one number, written out: cos of every frequency, then sin."""
    half = dim // 2
    freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    return [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]


def test_routes_join_crossattn_tokens_and_vector_channels():
    text, label = text_encoder(), ClassEmbedder(10, DIM, route="vector")
    attrs = AttributeEmbedder([3, 4], DIM)  # a second cross-attention encoder: its tokens follow the caption's
    size = SizeEmbedder("original_size", dim=8)
    conditioner = Conditioner([text, label, attrs, size])
    batch = {"text": ["a red circle", "a square"], "label": [3, 9], "attributes": [[0, 1], [2, 3]],
             "original_size": [[32, 48], [64, 16]], "image": torch.zeros(2, 3, 4, 4)}
    values = conditioner.values(batch)
    out = conditioner(values)
    assert conditioner.input_keys == ["text", "label", "attributes", "original_size"]
    tokens = [text(batch["text"]), attrs(torch.tensor(batch["attributes"]))]
    torch.testing.assert_close(out["context"], torch.cat(tokens, dim=1))
    sizes = torch.tensor([sinusoid(32, 8) + sinusoid(48, 8), sinusoid(64, 8) + sinusoid(16, 8)])
    torch.testing.assert_close(out["y"], torch.cat([label.embedding.weight[[3, 9]], sizes], dim=1))
    assert out["concat"] is None


def test_concat_route_joins_channels():
    class Channels(SizeEmbedder):  # any encoder whose output is (B, C, h, w)
        route = "concat"

        def forward(self, values):
            return values.float()[:, :, None, None].expand(-1, -1, 2, 2)

    conditioner = Conditioner([Channels("depth", n=2), Channels("edges", n=1)])
    out = conditioner(conditioner.values({"depth": [[1, 2]], "edges": [[5]]}))
    assert out["concat"].shape == (1, 3, 2, 2) and out["concat"][0, :, 0, 0].tolist() == [1, 2, 5]
    assert out["context"] is None and out["y"] is None


def test_drop_is_per_encoder_and_independent():
    conditioner = Conditioner([text_encoder(drop_rate=0.0), ClassEmbedder(10, DIM, drop_rate=1.0)])
    values = conditioner.values({"text": ["a"] * 4, "label": [1, 2, 3, 4]})
    dropped = conditioner.drop(values, 0.5, torch.Generator().manual_seed(0))
    assert dropped["text"] == ["a"] * 4 and dropped["label"].tolist() == [10] * 4
    # both at the default rate: two draws, not one mask shared by both encoders
    conditioner = Conditioner([text_encoder(), ClassEmbedder(10, DIM)])
    n = 64
    values = conditioner.values({"text": ["a"] * n, "label": [1] * n})
    dropped = conditioner.drop(values, 0.5, torch.Generator().manual_seed(0))
    text_null = [t == "" for t in dropped["text"]]
    label_null = (dropped["label"] == 10).tolist()
    assert 10 < sum(text_null) < n - 10 and 10 < sum(label_null) < n - 10
    assert text_null != label_null
    kept = conditioner.drop(values, 0.0, torch.Generator().manual_seed(0))
    assert kept["text"] is values["text"] and kept["label"] is values["label"]


def test_null_keeps_encoders_that_are_never_dropped():
    conditioner = Conditioner([text_encoder(), SizeEmbedder("original_size", drop_rate=0.0),
                               SizeEmbedder("crop_coords")])
    values = conditioner.values({"text": ["a"], "original_size": [[64, 64]], "crop_coords": [[3, 4]]})
    null = conditioner.null_like(values)
    assert null["text"] == [""] and null["original_size"].tolist() == [[64, 64]]
    assert null["crop_coords"].tolist() == [[0, 0]]


def test_one_encoders_values_alone_and_errors():
    conditioner = Conditioner([ClassEmbedder(10, DIM), NoConditioning()])  # NoConditioning reads nothing
    assert conditioner.input_keys == ["label"]
    assert conditioner.values([1, 2])["label"].tolist() == [1, 2]
    with pytest.raises(KeyError, match=r"conditioned on \['label'\]; \['label'\] missing"):
        conditioner.values({"text": ["a"]})
    two = Conditioner([text_encoder(), ClassEmbedder(10, DIM)])
    with pytest.raises(ValueError, match="give a dict"):
        two.values(["a"])
    assert list(two.values({"label": [1]}, partial=True)) == ["label"]
    with pytest.raises(ValueError, match="different lengths"):
        two.values({"text": ["a"], "label": [1, 2]})
    with pytest.raises(ValueError, match="route must be one of"):
        ClassEmbedder(10, DIM, route="sideways")
    with pytest.raises(ValueError, match="drop_rate"):
        ClassEmbedder(10, DIM, drop_rate=1.5)
    with pytest.raises(ValueError, match="same batch entry"):
        Conditioner([ClassEmbedder(10, DIM), ClassEmbedder(5, DIM)])
    with pytest.raises(ValueError, match="this model is unconditional"):
        Conditioner([NoConditioning()]).values([1])


def test_one_encoder_keeps_its_own_key_names_and_several_are_numbered():
    encoder = text_encoder()
    single = Conditioner([encoder])
    assert list(single.state_dict()) == list(encoder.state_dict())  # CompVis: cond_stage_model.<encoder keys>
    other = text_encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    single.load_state_dict(other.state_dict())  # a file of the old layout: the encoder's own keys
    torch.testing.assert_close(encoder.token_embedding.weight, other.token_embedding.weight)
    two = Conditioner([text_encoder(), ClassEmbedder(10, DIM)])
    keys = list(two.state_dict())
    assert "embedders.1.embedding.weight" in keys and all(k.startswith("embedders.") for k in keys)
    copy = Conditioner([text_encoder(), ClassEmbedder(10, DIM)])
    copy.load_state_dict(two.state_dict())
    torch.testing.assert_close(copy.embedders[1].embedding.weight, two.embedders[1].embedding.weight)


def test_size_embedder_checks_its_input():
    size = SizeEmbedder("crop_coords", dim=4)
    with pytest.raises(ValueError, match=r"crop_coords: expected shape \(B, 2\)"):
        size(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="give 2 numbers"):
        size.check([[1, 2, 3]])


def test_channels_made_elsewhere_come_first():
    class Channels(SizeEmbedder):
        route = "concat"

        def forward(self, values):
            return values.float()[:, :, None, None].expand(-1, -1, 2, 2)

    conditioner = Conditioner([Channels("depth", n=1)])
    mask = torch.full((1, 2, 2, 2), 7.0)  # e.g. an inpainting model's mask and masked image
    out = conditioner(conditioner.values([[5]]), mask)
    assert out["concat"][0, :, 0, 0].tolist() == [7, 7, 5]
    assert Conditioner([])({}, mask)["concat"] is mask
