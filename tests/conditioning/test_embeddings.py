"""NoConditioning, ClassEmbedder, AttributeEmbedder against direct table lookups."""

import pytest
import torch

from sdlight.conditioning import AttributeEmbedder, ClassEmbedder, ConditionEncoder, NoConditioning


def test_no_conditioning():
    enc = NoConditioning()
    assert isinstance(enc, ConditionEncoder)
    assert enc.input_key is None and enc.context_dim is None
    assert enc(None) is None and enc.null_like(None) is None
    assert list(enc.parameters()) == []


def test_class_embedder_lookup_shape_and_null_row():
    torch.manual_seed(0)
    enc = ClassEmbedder(num_classes=5, embed_dim=8)
    assert enc.input_key == "label" and enc.context_dim == 8
    labels = torch.tensor([0, 4, 2, 2])
    ctx = enc(labels)
    assert ctx.shape == (4, 1, 8)
    table = enc.embedding.weight.detach()
    assert table.shape == (6, 8)
    torch.testing.assert_close(ctx[:, 0], table[labels], rtol=0, atol=0)
    null = enc.null_like(labels)
    assert torch.equal(null, torch.full((4,), 5))
    null_ctx = enc(null)[:, 0]
    torch.testing.assert_close(null_ctx, table[5].expand(4, -1), rtol=0, atol=0)
    # the null row is its own vector, not a copy of a class row
    assert (table[:5] - table[5]).abs().amax(dim=1).min() > 1e-3


def test_class_embedder_gradient_reaches_used_rows_only():
    enc = ClassEmbedder(4, 6)
    enc(torch.tensor([1, 4])).pow(2).sum().backward()
    grad_rows = enc.embedding.weight.grad.abs().sum(1) > 0
    assert grad_rows.tolist() == [False, True, False, False, True]


def test_class_embedder_rejects_wrong_shape():
    with pytest.raises(ValueError):
        ClassEmbedder(3, 4)(torch.zeros(2, 1, dtype=torch.long))


def test_attribute_embedder_matches_per_slot_lookup_plus_slot_embedding():
    torch.manual_seed(0)
    sizes = [4, 6, 5, 3]
    enc = AttributeEmbedder(sizes, embed_dim=8)
    assert enc.input_key == "attributes" and enc.context_dim == 8
    values = torch.tensor([[0, 5, 4, 2], [3, 0, 1, 0], [1, 1, 1, 1]])
    ctx = enc(values)
    assert ctx.shape == (3, 4, 8)
    # float64 recomputation straight from the tables
    ref = torch.empty(3, 4, 8, dtype=torch.float64)
    for b in range(3):
        for s, size in enumerate(sizes):
            assert enc.embeddings[s].weight.shape == (size + 1, 8)
            ref[b, s] = enc.embeddings[s].weight[values[b, s]].double() + enc.slot_embedding[s].double()
    torch.testing.assert_close(ctx.double(), ref, rtol=1e-6, atol=1e-6)


def test_attribute_embedder_null_ids_and_rows():
    sizes = [4, 6, 5, 3]
    enc = AttributeEmbedder(sizes, embed_dim=8)
    values = torch.zeros(2, 4, dtype=torch.long)
    null = enc.null_like(values)
    assert torch.equal(null, torch.tensor([sizes, sizes]))
    null_ctx, real_ctx = enc(null), enc(values)
    assert not torch.allclose(null_ctx, real_ctx)
    for s, size in enumerate(sizes):
        table = enc.embeddings[s].weight.detach()
        assert (table[:size] - table[size]).abs().amax(dim=1).min() > 1e-3


def test_attribute_slot_embedding_distinguishes_equal_tables():
    enc = AttributeEmbedder([3, 3], embed_dim=4)
    with torch.no_grad():
        enc.embeddings[1].weight.copy_(enc.embeddings[0].weight)
    ctx = enc(torch.tensor([[1, 1]]))
    # same index in identical tables: only the slot embedding separates the two tokens
    torch.testing.assert_close(ctx[0, 0] - ctx[0, 1], (enc.slot_embedding[0] - enc.slot_embedding[1]).detach())
    assert (ctx[0, 0] - ctx[0, 1]).abs().max() > 0


def test_attribute_embedder_gradients_and_shape_check():
    enc = AttributeEmbedder([2, 3], embed_dim=4)
    enc(torch.tensor([[0, 2], [1, 3]])).sum().backward()
    assert enc.slot_embedding.grad is not None and enc.slot_embedding.grad.abs().sum() > 0
    assert all(e.weight.grad.abs().sum() > 0 for e in enc.embeddings)
    with pytest.raises(ValueError):
        enc(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        AttributeEmbedder([], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_with_cpu_generator():
    enc = AttributeEmbedder([3, 4], embed_dim=8).cuda()
    values = torch.tensor([[0, 1], [2, 3]] * 50, device="cuda")
    dropped = enc.drop(values, 0.5, torch.Generator().manual_seed(0))
    assert dropped.device == values.device
    expected = torch.where((torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.5)[:, None].cuda(),
                           torch.tensor([3, 4], device="cuda"), values)
    assert torch.equal(dropped, expected)
    torch.testing.assert_close(enc(dropped).cpu(), enc.cpu()(dropped.cpu()))
