"""Forward process and parametrisation conversions, in float64, against closed forms and diffusers."""

import pytest
import torch
from diffusers import DDPMScheduler

from sdlight.diffusion import (
    DDPM,
    Draws,
    NoiseSchedule,
    canonical_prediction_type,
    get_v,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    score_from_eps,
    to_x0_eps,
    training_target,
)

SCHED = NoiseSchedule.make("scaled_linear", 1000)


def _data(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])[:b]
    a = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    return x0, eps, t, a


def test_q_sample_closed_form_and_diffusers():
    x0, eps, t, a = _data()
    xt = q_sample(x0, t, eps, SCHED)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-14, atol=1e-14)
    hf = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(xt.float(), hf.add_noise(x0.float(), eps.float(), t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(get_v(x0, eps, t, SCHED).float(), hf.get_velocity(x0.float(), eps.float(), t),
                               rtol=1e-5, atol=1e-5)


def test_conversions_round_trip():
    x0, eps, t, a = _data()
    xt = q_sample(x0, t, eps, SCHED)
    v = get_v(x0, eps, t, SCHED)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(predict_x0_from_eps(xt, t, eps, SCHED), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(predict_eps_from_x0(xt, t, x0, SCHED), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(predict_x0_from_v(xt, t, v, SCHED), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(predict_eps_from_v(xt, t, v, SCHED), eps, rtol=1e-12, atol=1e-12)
    # v is the rotation of (eps, x0) by the angle phi_t: its norm equals that of (eps, x0) together
    torch.testing.assert_close(v**2 + xt**2, eps**2 + x0**2, rtol=1e-12, atol=1e-12)
    for kind in ("eps", "v", "x0", "epsilon", "v_prediction", "sample"):
        out = training_target(x0, eps, t, SCHED, kind)
        x0_hat, eps_hat = to_x0_eps(out, xt, t, SCHED, kind)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    assert canonical_prediction_type("v_prediction") == "v"
    with pytest.raises(ValueError):
        training_target(x0, eps, t, SCHED, "score")


def test_v_prediction_survives_zero_terminal_snr():
    zsched = NoiseSchedule.make("scaled_linear", 1000, zero_terminal_snr=True)
    x0, eps, _, _ = _data(b=2)
    t = torch.tensor([999, 999])
    xt = q_sample(x0, t, eps, zsched)
    torch.testing.assert_close(xt, eps)  # pure noise
    v = training_target(x0, eps, t, zsched, "v")
    torch.testing.assert_close(v, -x0)
    torch.testing.assert_close(to_x0_eps(v, xt, t, zsched, "v")[0], x0)


def test_q_sample_moments():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for t in (10, 600):
        a = SCHED.alphas_cumprod[t].item()
        x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
        xt = q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64), SCHED)
        se_mean, se_var = ((1 - a) / n) ** 0.5, (1 - a) * (2 / n) ** 0.5
        assert abs(xt.mean().item() - a**0.5 * 0.7) < 5 * se_mean
        assert abs(xt.var().item() - (1 - a)) < 5 * se_var


def test_score_from_eps_is_the_gaussian_score():
    # x0 ~ N(0, s^2) gives q(x_t) = N(0, a s^2 + 1 - a); the optimal eps is E[eps | x_t]
    s2, t = 0.3, torch.tensor([100, 700])
    a = SCHED.alphas_cumprod[t].view(-1, 1)
    xt = torch.linspace(-2, 2, 7, dtype=torch.float64).expand(2, 7)
    var = a * s2 + 1 - a
    eps_opt = (1 - a).sqrt() * xt / var
    torch.testing.assert_close(score_from_eps(eps_opt, t, SCHED), -xt / var, rtol=1e-12, atol=1e-12)


def test_ddpm_training_timesteps_are_uniform_and_seeded():
    draws = lambda: Draws(torch.Generator().manual_seed(3))  # noqa: E731
    a, b = DDPM(SCHED).draw_levels(4096, draws()), DDPM(SCHED).draw_levels(4096, draws())
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4096,)
    assert a.min() >= 0 and a.max() <= SCHED.num_timesteps - 1 and len(a.unique()) > 0.9 * SCHED.num_timesteps
    assert DDPM(SCHED).draw_levels(3, Draws(), device="cpu").device.type == "cpu"
