"""Classifier-free-guidance dropout shared by all encoders: ConditionEncoder.drop and drop_mask."""

import pytest
import torch

from sdlight.conditioning import AttributeEmbedder, ClassEmbedder, LearnedTextEncoder, NoConditioning, drop_mask


@pytest.fixture(scope="module")
def text_encoder():
    return LearnedTextEncoder(max_length=8, width=16, layers=1, heads=2)


def test_drop_p0_returns_input_unchanged_and_draws_nothing(text_encoder):
    labels = torch.tensor([1, 2, 3])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert ClassEmbedder(5, 4).drop(labels, 0.0, gen) is labels
    texts = ["a", "b"]
    assert text_encoder.drop(texts, 0.0, gen) is texts
    assert torch.equal(gen.get_state(), state)


def test_drop_p1_gives_all_null(text_encoder):
    labels = torch.tensor([0, 4, 2, 1])
    assert torch.equal(ClassEmbedder(5, 4).drop(labels, 1.0), torch.full((4,), 5))
    attrs = torch.tensor([[0, 1, 2], [1, 0, 0]])
    assert torch.equal(AttributeEmbedder([2, 3, 4], 4).drop(attrs, 1.0), torch.tensor([[2, 3, 4], [2, 3, 4]]))
    assert text_encoder.drop(("a red circle", "b"), 1.0) == ["", ""]
    assert NoConditioning().drop(None, 1.0) is None


def test_drop_rejects_bad_probability():
    with pytest.raises(ValueError):
        ClassEmbedder(3, 4).drop(torch.tensor([0]), 1.5)
    with pytest.raises(ValueError):
        ClassEmbedder(3, 4).drop(torch.tensor([0]), -0.1)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_frequency_matches_p(p):
    n = 20_000
    labels = torch.zeros(n, dtype=torch.long)
    out = ClassEmbedder(3, 4).drop(labels, p, torch.Generator().manual_seed(123))
    frac = (out == 3).double().mean().item()
    # binomial std is sqrt(p(1-p)/n) <= 0.0036; 5 sigma
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert set(out.unique().tolist()) <= {0, 3}


def test_drop_is_reproducible_and_same_mask_for_lists_and_tensors(text_encoder):
    n = 64
    a = ClassEmbedder(7, 4).drop(torch.arange(n) % 7, 0.5, torch.Generator().manual_seed(5))
    b = ClassEmbedder(7, 4).drop(torch.arange(n) % 7, 0.5, torch.Generator().manual_seed(5))
    c = ClassEmbedder(7, 4).drop(torch.arange(n) % 7, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    texts = text_encoder.drop([f"caption {i}" for i in range(n)], 0.5, torch.Generator().manual_seed(5))
    assert [t == "" for t in texts] == (a == 7).tolist()
    expected = drop_mask(n, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(expected, a == 7)


def test_drop_attributes_nulls_whole_samples():
    enc = AttributeEmbedder([3, 4, 5], 4)
    values = torch.stack([torch.randint(0, v, (500,)) for v in [3, 4, 5]], dim=1)
    out = enc.drop(values, 0.5, torch.Generator().manual_seed(0))
    null = torch.tensor([3, 4, 5])
    is_null = out == null
    # per sample: either every slot is null or none was touched
    assert torch.equal(is_null.all(1), is_null.any(1))
    assert torch.equal(out[~is_null.all(1)], values[~is_null.all(1)])
    assert 150 < is_null.all(1).sum().item() < 350
