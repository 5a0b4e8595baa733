"""Rectified flow against diffusers: the training densities (``compute_density_for_timestep_sampling``), the shift,
the forward process and target in closed form, and Euler / Heun step for step against
``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` (fixed and Flux's resolution-dependent
shift); DDPM's and DDIM's samplers refuse it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlight.diffusion import Draws, RectifiedFlow
from sdlight.diffusion.grid_samplers import sample_dpmpp_2m, sample_euler, sample_heun, sample_unipc
from sdlight.diffusion.rectified_flow import shift_for_tokens, shift_times
from sdlight.diffusion.samplers import sample_ddim, sample_ddpm
from sdlight.errors import UsageError

diffusers = pytest.importorskip("diffusers")


def velocity_net(seed: int = 0):
    """A smooth stand-in network: v depends on x and on the time input (0..1000), like a trained one."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 4, generator=g) * 0.3, torch.randn(4, generator=g)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", w, x) * (1 - tt) + b.view(1, 4, 1, 1) * tt + 0.1 * x.sin()

    return net


@pytest.mark.parametrize("kind", ["logit_normal", "mode", "uniform", "cosmap"])
def test_training_times_follow_diffusers_densities(kind):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    objective = RectifiedFlow(timestep_sampling=kind, loc=0.3, scale=0.8, mode_scale=1.29)
    ours = objective.draw_levels(4096, Draws(torch.Generator().manual_seed(0)))
    theirs = compute_density_for_timestep_sampling(kind, 4096, logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(0))
    if kind == "cosmap":  # diffusers' cosmap is a loss weighting, not a density: SD3's eq. 20 by hand
        u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
        theirs = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    elif kind == "uniform":
        theirs = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)
    assert 0 <= ours.min() and ours.max() <= 1


def test_the_shift_is_sd3s_and_the_auto_shift_fluxs():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_times(t, 3.0), 3 * t / (1 + 2 * t))
    for tokens in (64, 256, 1024, 4096):
        assert shift_for_tokens(tokens) == pytest.approx(math.exp(calculate_shift(tokens)), rel=1e-12)
    objective = RectifiedFlow(shift="auto")
    objective.fit_latent_size(64, 64)  # 32 x 32 tokens of 2x2 latents
    assert objective.shift == pytest.approx(math.exp(calculate_shift(1024)))
    with pytest.raises(UsageError, match=r"model.objective.shift must be a number > 0 \(or auto\), got 0"):
        RectifiedFlow(shift=0)
    with pytest.raises(UsageError, match="timestep_sampling='lognorm'"):
        RectifiedFlow(timestep_sampling="lognorm")


def test_noising_and_the_velocity_target_in_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    objective = RectifiedFlow()
    x = objective.noised(x0, noise, t)
    torch.testing.assert_close(x[0], x0[0]), torch.testing.assert_close(x[2], noise[2])
    torch.testing.assert_close(x[1], 0.75 * x0[1] + 0.25 * noise[1])
    seen = {}

    def perfect(x_t, time):  # the exact velocity, and the time input it was called with
        seen["t"] = time
        return noise - x0

    assert torch.equal(objective.losses(perfect, x0, t, noise), torch.zeros(3))
    torch.testing.assert_close(seen["t"], t * 1000)
    assert objective.losses(lambda x_t, time: torch.zeros_like(x_t), x0, t, noise).tolist() == pytest.approx(
        (noise - x0).square().flatten(1).mean(1).tolist())


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap", "none"])
def test_sd3_loss_weightings_are_diffusers(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    zero = lambda x_t, time: torch.zeros_like(x_t)  # noqa: E731
    weighted = RectifiedFlow(weighting=weighting).losses(zero, x0, t, noise)
    plain = RectifiedFlow().losses(zero, x0, t, noise)
    expected = compute_loss_weighting_for_sd3(weighting, sigmas=t.double()).float()
    torch.testing.assert_close(weighted, plain * expected, rtol=1e-6, atol=0)
    with pytest.raises(UsageError, match="weighting='snr'"):
        RectifiedFlow(weighting="snr")


def diffusers_loop(scheduler, net, x, steps):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_flow_match_euler_step_for_step(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    net, steps = velocity_net(), 12
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    objective = RectifiedFlow(shift=shift)
    ours = sample_euler(net, x.clone(), objective, steps=steps)
    theirs = diffusers_loop(FlowMatchEulerDiscreteScheduler(**objective.scheduler_config()), net, x.clone(), steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    scheduler = FlowMatchEulerDiscreteScheduler(**objective.scheduler_config())
    scheduler.set_timesteps(steps)
    grid = objective.grid(steps)
    torch.testing.assert_close(torch.tensor(grid.times, dtype=torch.float64), scheduler.timesteps.double(),
                               rtol=1e-6, atol=1e-4)


def test_euler_with_flux_resolution_dependent_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    net, steps = velocity_net(2), 8
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    objective = RectifiedFlow(shift="auto")
    objective.fit_latent_size(32, 32)
    ours = sample_euler(net, x.clone(), objective, steps=steps)
    scheduler = FlowMatchEulerDiscreteScheduler(**objective.scheduler_config())
    assert scheduler.config.use_dynamic_shifting
    scheduler.set_timesteps(steps, mu=calculate_shift(16 * 16))
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.expand(1)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_heun_is_flow_match_heun_step_for_step():
    from diffusers import FlowMatchHeunDiscreteScheduler

    net, steps = velocity_net(3), 10
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    objective = RectifiedFlow(shift=3.0)
    ours = sample_heun(net, x.clone(), objective, steps=steps)
    theirs = diffusers_loop(FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0), net, x.clone(),
                            steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_multistep_solvers_converge_to_the_same_sample_as_fine_euler():
    """DPM-Solver++(2M) and UniPC run on the flow's grid (log-SNR steps from pure noise): a few steps land where
    many Euler steps do."""
    net = velocity_net(4)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    objective = RectifiedFlow(shift=3.0)
    reference = sample_euler(net, x.clone(), objective, steps=400)
    for sampler in (sample_dpmpp_2m, sample_unipc, sample_heun):
        out = sampler(net, x.clone(), objective, steps=20)
        assert torch.isfinite(out).all()
        assert (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_ddpm_and_ddim_refuse_another_objective():
    x = torch.randn(1, 4, 4, 4)
    for sampler, name in ((sample_ddim, "ddim"), (sample_ddpm, "ddpm")):
        with pytest.raises(UsageError, match=f"sampler={name} needs the DDPM objective; this model's objective is "
                                             "rectified_flow: use sampler=euler"):
            sampler(velocity_net(), x, RectifiedFlow(), steps=4)


def test_dpm_solver_is_diffusers_flow_sigma_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    net, steps, shift = velocity_net(5), 10, 3.0
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    ours = sample_dpmpp_2m(net, x.clone(), RectifiedFlow(shift=shift), steps=steps)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    torch.testing.assert_close(ours, diffusers_loop(scheduler, net, x.clone(), steps), rtol=1e-4, atol=1e-4)


def test_unipc_is_diffusers_flow_sigma_unipc_on_the_same_grid():
    """diffusers' UniPC builds its flow grid otherwise (from t = 1 - 1e-6); given the same grid (our t values as its
    sigmas, shift 1), it steps as ours does."""
    from diffusers import UniPCMultistepScheduler

    net, steps = velocity_net(6), 10
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    objective = RectifiedFlow(shift=3.0)
    ours = sample_unipc(net, x.clone(), objective, steps=steps)
    ts = [s / (1 + s) for s in objective.grid(steps, round_times=True).sigmas[:-1]]
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=1.0, solver_order=2)
    scheduler.set_timesteps(sigmas=np.array(ts))
    theirs = x.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(net(theirs, t.expand(2)), t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
