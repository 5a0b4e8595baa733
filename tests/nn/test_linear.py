"""sdlight.nn.linear: the oneDNN CPU path computes F.linear and its gradients (float64 reference), and is taken
only where it is the same computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdlight.nn.linear as linear_mod
from sdlight.nn.linear import Linear, linear, onednn_linear_active, onednn_linear_default, set_onednn_linear

pytestmark = pytest.mark.skipif(not linear_mod._ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_on():
    """The path under test, whatever this machine's default."""
    previous = set_onednn_linear(True)
    yield
    set_onednn_linear(previous)


@pytest.mark.parametrize("mkl, onednn, default", [(1.0, 0.5, True), (1.0, 0.9, False), (1.0, 1.3, False)])
def test_the_default_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch, mkl, onednn, default):
    monkeypatch.setenv("SDLIGHT_CACHE", str(tmp_path))
    monkeypatch.setattr(linear_mod, "time_kernels", lambda: (mkl, onednn))
    assert onednn_linear_default() is default  # oneDNN only when clearly faster (by 15 %)
    monkeypatch.setattr(linear_mod, "time_kernels", lambda: pytest.fail("measured twice"))
    assert onednn_linear_default() is default  # the kept verdict: the same kernel in every run on this machine
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # another thread count is measured anew
    with pytest.raises(pytest.fail.Exception, match="measured twice"):
        onednn_linear_default()


def test_measuring_works_inside_no_grad_and_inference_mode():
    with torch.no_grad(), torch.inference_mode():
        mkl, onednn = linear_mod.time_kernels(((64, 16, 32),), reps=1)
    assert mkl > 0 and onednn > 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def calls(monkeypatch):
    """Counts the oneDNN matmuls (forward and backward)."""
    seen = []
    real = linear_mod._matmul

    def counting(x, w, b):
        seen.append((tuple(x.shape), tuple(w.shape), x.is_contiguous()))
        return real(x, w, b)

    monkeypatch.setattr(linear_mod, "_matmul", counting)
    return seen


@pytest.mark.parametrize("k, n", [(24, 40), (40, 24), (32, 32)])  # both ways of computing dL/dW
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64(k, n, bias, calls):
    g = torch.Generator().manual_seed(0)
    # a non-contiguous (B, L, K) input, as after a head merge
    x = torch.randn(3, k, 37, generator=g).transpose(1, 2).requires_grad_()
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    y = linear(x, w, b)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    assert len(calls) == 3  # forward, dL/dx, dL/dW all on oneDNN

    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y64 = F.linear(*ref)
    y64.backward(grad.double())
    assert y.shape == y64.shape == (3, 37, n)
    assert _rel(y, y64) < 1e-6
    assert _rel(x.grad, ref[0].grad) < 1e-6
    assert _rel(w.grad, ref[1].grad) < 1e-6
    assert w.grad.is_contiguous()
    if bias:
        assert _rel(b.grad, ref[2].grad) < 1e-6


def test_oneDNN_gets_a_contiguous_input_even_from_an_expanded_gradient(calls):
    # the gradient of a sum is expanded (stride 0), a transposed input strided: oneDNN runs those ~100x slower
    x = torch.randn(8, 16).t().requires_grad_()
    layer = Linear(8, 4)
    layer(x).sum().backward()
    assert len(calls) == 3 and all(contiguous for _, _, contiguous in calls)
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(16, 8), rtol=1e-6, atol=1e-6)


def test_only_the_gradients_asked_for():
    x = torch.randn(5, 8)
    layer = Linear(8, 4)
    layer(x).sum().backward()  # the input needs no gradient
    assert layer.weight.grad is not None and layer.bias.grad is not None
    layer.requires_grad_(False)
    x.requires_grad_()
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(5, 8), rtol=1e-6)


def test_state_dict_and_repr_are_nn_linear():
    ours, theirs = Linear(6, 3), nn.Linear(6, 3)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_falls_back_to_f_linear_where_it_is_not_the_same_computation(calls):
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's cast, as nn.Linear
    assert layer.double()(x.double()).dtype == torch.float64
    assert layer.float()(torch.empty(0, 8)).shape == (0, 4)
    previous = set_onednn_linear(False)
    try:
        assert not onednn_linear_active()
        layer(x)
    finally:
        set_onednn_linear(previous)
    assert calls == []
    layer(x)
    assert len(calls) == 1


def test_double_backward_is_refused():
    x = torch.randn(3, 4, requires_grad=True)
    layer = Linear(4, 2)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


def test_the_spatial_transformer_takes_it(calls):
    from sdlight.nn.attention import SpatialTransformer

    block = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=8, use_linear=True)
    with torch.inference_mode():  # sampling runs under inference mode
        block(torch.randn(1, 32, 4, 4), context=torch.randn(1, 3, 8))
    # proj_in, q k v out of two attentions, GEGLU, FF out, proj_out
    assert len(calls) == 1 + 2 * 4 + 2 + 1
