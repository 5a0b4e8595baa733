"""adaLN's fused steps against their two-op definitions, values and gradients, in float64."""

import torch

from sdlight.nn.adaln import gated, modulate


def test_modulate_and_gated_residual_equal_their_definitions_with_gradients():
    g = torch.Generator().manual_seed(0)
    x, update = (torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    inputs = (x, update, shift, scale, gate)

    def fused():
        return gated(modulate(x, shift, scale), gate, update)

    def reference():
        h = x * (1 + scale[:, None, :]) + shift[:, None, :]
        return h + gate[:, None, :] * update

    weights = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    ours, ref = fused(), reference()
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    ours_grads = torch.autograd.grad((ours * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(ours, x)  # the inputs do change the tokens
