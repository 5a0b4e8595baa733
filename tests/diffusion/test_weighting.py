"""Loss weights against closed forms, and the claim that they are weights on the x0 error."""

import pytest
import torch
import torch.nn.functional as F

from sdlight.diffusion import NoiseSchedule, diffusion_loss, loss_weight, q_sample, to_x0_eps, training_target


def test_min_snr_closed_form():
    snr = torch.tensor([0.01, 0.5, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    m = torch.tensor([0.01, 0.5, 5.0, 5.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(snr, "eps", "min_snr", g), m / snr)
    torch.testing.assert_close(loss_weight(snr, "v", "min_snr", g), m / (snr + 1))
    torch.testing.assert_close(loss_weight(snr, "x0", "min_snr", g), m)
    torch.testing.assert_close(loss_weight(snr, "v", "snr"), snr / (snr + 1))
    torch.testing.assert_close(loss_weight(snr, "x0", "snr"), snr)
    torch.testing.assert_close(loss_weight(snr, "eps", "snr"), torch.ones_like(snr))
    torch.testing.assert_close(loss_weight(snr, "v", "simple"), torch.ones_like(snr))
    # zero terminal SNR: finite, and the eps weight takes its limit 1
    z = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(loss_weight(z, "eps", "min_snr"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(loss_weight(z, "v", "min_snr"), torch.tensor([0.0, 2.0 / 3.0]))
    with pytest.raises(ValueError):
        loss_weight(z, "eps", "p2")


@pytest.mark.parametrize("kind", ["snr", "min_snr"])
def test_weights_are_weights_on_the_x0_error(kind):
    """Whatever the parametrisation, weight * its MSE == w(snr) * MSE of the implied x0."""
    sched = NoiseSchedule.make("scaled_linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 50, 300, 700, 999])
    xt = q_sample(x0, t, eps, sched)
    snr = sched.snr(t, dtype=torch.float64)
    w_x0 = snr if kind == "snr" else snr.clamp(max=5.0)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_err = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    for pred in ("eps", "v", "x0"):
        target = training_target(x0, eps, t, sched, pred)
        # the output of type `pred` that implies x0_hat at x_t
        eps_hat = (xt - sched.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0_hat) / sched.sqrt_one_minus_alphas_cumprod[
            t
        ].view(-1, 1, 1, 1)
        out = training_target(x0_hat, eps_hat, t, sched, pred)
        torch.testing.assert_close(to_x0_eps(out, xt, t, sched, pred)[0], x0_hat)
        loss = diffusion_loss(out, target, loss_weight(snr, pred, kind))
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, w_x0 * x0_err, rtol=1e-10, atol=1e-14)


def test_diffusion_loss():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    ref = torch.stack([F.mse_loss(pred[i], target[i]) for i in range(4)])
    torch.testing.assert_close(diffusion_loss(pred, target), ref)
    torch.testing.assert_close(diffusion_loss(pred, target, w), ref * w)
    ref1 = torch.stack([(pred[i] - target[i]).abs().mean() for i in range(4)])
    torch.testing.assert_close(diffusion_loss(pred.half(), target.half(), loss_type="l1"), ref1, rtol=2e-3, atol=2e-3)
    assert diffusion_loss(pred.half(), target.half()).dtype == torch.float32
    with pytest.raises(ValueError):
        diffusion_loss(pred, target, loss_type="l3")
