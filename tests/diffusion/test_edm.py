"""EDM against its paper and diffusers: the preconditioning (Table 1) and loss weight in closed form, the log-normal
training density, Euler step for step against ``EDMEulerScheduler`` on Karras' grid, Heun against Algorithm 1
written out here, and DPM-Solver++(2M) against ``EDMDPMSolverMultistepScheduler``."""

from __future__ import annotations

import math

import pytest
import torch

from sdlight.diffusion import EDM, Draws
from sdlight.diffusion.grid_samplers import sample_dpmpp_2m, sample_euler, sample_heun
from sdlight.diffusion.samplers import sample_ddim
from sdlight.errors import UsageError

diffusers = pytest.importorskip("diffusers")


def backbone(seed: int = 0):
    """A smooth stand-in F(c_in x; c_noise)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 4, generator=g) * 0.3, torch.randn(4, generator=g)

    def net(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c = c_noise.to(x.dtype).view(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", w.to(x), x) + b.to(x).view(1, 4, 1, 1) * torch.tanh(c) + 0.1 * x.sin()

    return net


def test_preconditioning_and_loss_weight_are_table_1():
    edm = EDM(sigma_data=0.5)
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
        assert c_skip == pytest.approx(0.25 / (sigma**2 + 0.25))
        assert c_out == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25))
        assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + 0.25))
        assert c_noise == pytest.approx(math.log(sigma) / 4)
    # the F-space error is lambda times the D-space one, lambda = (sigma^2 + sd^2) / (sigma sd)^2
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 1.0, 10.0])
    loss = edm.losses(lambda x, t: out, x0, sigma, noise)
    s = sigma.view(-1, 1, 1, 1).double()
    x = x0.double() + s * noise.double()
    d = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * out.double()
    lam = (s**2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(loss.double(), (lam * (d - x0.double()) ** 2).flatten(1).mean(1), rtol=1e-5, atol=0)


def test_training_sigmas_are_log_normal():
    edm = EDM(p_mean=-1.2, p_std=1.2)
    sigma = edm.draw_levels(20000, Draws(torch.Generator().manual_seed(0)))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)
    buckets = edm.bucket(sigma, 4)
    assert torch.bincount(buckets, minlength=4).float().div(20000).tolist() == pytest.approx([0.25] * 4, abs=0.02)
    assert edm.bucket_names(2) == ["val/loss_q0.00-0.50", "val/loss_q0.50-1.00"]


def test_euler_is_edm_euler_scheduler_step_for_step():
    from diffusers import EDMEulerScheduler

    net, steps, edm = backbone(1), 12, EDM(sigma_data=0.5)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = sample_euler(net, noise.clone(), edm, steps=steps)
    scheduler = EDMEulerScheduler(**edm.scheduler_config())
    scheduler.set_timesteps(steps)
    x = noise * scheduler.sigmas[0]  # ours starts at sigma_max (diffusers' init_noise_sigma is sqrt(sigma_max^2 + 1))
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t.expand(2))
        x = scheduler.step(out, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_heun_is_karras_algorithm_1():
    net, steps, edm = backbone(2), 8, EDM(sigma_data=1.0)
    noise = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sample_heun(net, noise.clone(), edm, steps=steps)

    def D(x, s):  # Table 1's preconditioned denoiser, written out
        c = math.sqrt(s**2 + 1)
        return x / c**2 + s / c * net(x / c, torch.full((1,), math.log(s) / 4)).double()

    i = torch.arange(steps, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t.float().double(), torch.zeros(1, dtype=torch.float64)])
    x = noise * t[0]
    for k in range(steps):
        d = (x - D(x, float(t[k]))) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if t[k + 1] > 0:
            x_next = x + (t[k + 1] - t[k]) * (d + (x_next - D(x_next, float(t[k + 1]))) / t[k + 1]) / 2
        x = x_next
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_dpm_solver_is_edm_dpm_solver_multistep_scheduler():
    from diffusers import EDMDPMSolverMultistepScheduler

    net, steps, edm = backbone(3), 10, EDM(sigma_data=0.5)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    ours = sample_dpmpp_2m(net, noise.clone(), edm, steps=steps)
    config = {k: v for k, v in edm.scheduler_config().items() if k != "num_train_timesteps"}
    scheduler = EDMDPMSolverMultistepScheduler(**config, solver_order=2, lower_order_final=True)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t.expand(2))
        x = scheduler.step(out, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_settings_are_checked_and_ddim_refused():
    with pytest.raises(UsageError, match="model.objective.sigma_data must be a number > 0, got 0"):
        EDM(sigma_data=0)
    with pytest.raises(UsageError, match="sigma_min=90 must be below sigma_max=80"):
        EDM(sigma_min=90)
    with pytest.raises(UsageError, match="sampler=ddim needs the DDPM objective; this model's objective is edm"):
        sample_ddim(backbone(), torch.randn(1, 4, 4, 4), EDM(), steps=3)
