"""The sigma-grid samplers and grids against diffusers' schedulers, step by step, on the toy denoiser."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from sdlight.diffusion import SAMPLERS, inpaint_callback, make_sigmas, nearest_timestep, sigma_to_t
from sdlight.diffusion.grid_samplers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler, sample_heun
from tests.diffusion.test_samplers import SHAPE, T, ToyDenoiser, _close, _hf_kwargs, _noise, _record, _schedule


class FloatToy(ToyDenoiser):
    """The toy denoiser, recording the timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.ts: list[float] = []

    def __call__(self, x, t):
        self.ts.append(float(t[0]))
        return super().__call__(x, t)


def _hf_loop(hf, model, x, step_kwargs=lambda i: {}, record=lambda hf, x: True):
    """diffusers' denoising loop, calling the model at the scheduler's own (possibly fractional) timesteps."""
    states = []
    for i, t in enumerate(hf.timesteps):
        out = model(hf.scale_model_input(x, t), t.expand(x.shape[0]))
        x = hf.step(out, t, x, **step_kwargs(i)).prev_sample
        if record(hf, x):
            states.append(x)
    return states


@pytest.mark.parametrize("grid", ["karras", "exponential"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_sigma_grids_match_diffusers(grid, zero_snr):
    hf = EulerDiscreteScheduler(**_hf_kwargs("v", zero_snr), timestep_spacing="linspace",
                                use_karras_sigmas=grid == "karras", use_exponential_sigmas=grid == "exponential")
    hf.set_timesteps(12)
    sigmas, ts = make_sigmas(_schedule(zero_snr), 12, grid=grid)
    _close(sigmas.float(), hf.sigmas, 1e-5)
    torch.testing.assert_close(ts.float(), hf.timesteps, atol=5e-3, rtol=0)  # diffusers interpolates in float32
    assert nearest_timestep(0.0, _schedule()) == -1
    assert nearest_timestep(float(_schedule().sigmas[417]), _schedule()) == 417
    assert float(sigma_to_t(_schedule().sigmas[[5, 900]], _schedule())[1]) == pytest.approx(900)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_euler_on_sigma_grids_matches_diffusers(pred, grid):
    model, x = FloatToy(), _noise()
    hf = EulerDiscreteScheduler(**_hf_kwargs(pred), timestep_spacing="linspace",
                                use_karras_sigmas=grid == "karras", use_exponential_sigmas=grid == "exponential")
    hf.set_timesteps(10)
    ref = _hf_loop(hf, model, x * math.sqrt(1 + hf.sigmas[0].item() ** 2))
    ref = [r / math.sqrt(1 + s**2) for r, s in zip(ref, hf.sigmas[1:].tolist())]  # to the variance-preserving scale
    hf_ts = list(model.ts)
    model.ts.clear()
    states, cb = _record()
    out = sample_euler(model, x.clone(), _schedule(), steps=10, prediction_type=pred, spacing="linspace", grid=grid,
                       callback=cb)
    assert model.ts == pytest.approx(hf_ts, abs=5e-3)  # the same 10 calls, between training timesteps
    assert len(states) == len(ref) == 10 and states[-1][0] == -1
    for (_, a), b in zip(states, ref):
        _close(a, b)
    _close(out, ref[-1])


@pytest.mark.parametrize("pred", ["eps", "v"])
# (diffusers' Heun with "linspace" calls the model at unrounded linspace timesteps; our grid rounds them)
@pytest.mark.parametrize("spacing,grid", [("leading", "timesteps"), ("trailing", "timesteps"),
                                          ("linspace", "karras")])
def test_heun_matches_diffusers(pred, spacing, grid):
    model, x = FloatToy(), _noise()
    kw = {k: v for k, v in _hf_kwargs(pred).items() if k != "rescale_betas_zero_snr"}  # Heun has no such option
    hf = HeunDiscreteScheduler(**kw, timestep_spacing=spacing, steps_offset=1,
                               use_karras_sigmas=grid == "karras")
    hf.set_timesteps(8)
    # diffusers carries x / alpha; compare after each whole (two-call) step in the variance-preserving scale
    ref = _hf_loop(hf, model, x * math.sqrt(1 + hf.sigmas[0].item() ** 2),
                   record=lambda hf, x: hf.state_in_first_order or hf.step_index == len(hf.timesteps))
    ref = [r / math.sqrt(1 + s**2) for r, s in zip(ref, hf.sigmas[2::2].tolist() + [0.0])]
    hf_ts = list(model.ts)
    model.ts.clear()
    states, cb = _record()
    out = sample_heun(model, x.clone(), _schedule(), steps=8, prediction_type=pred, spacing=spacing, grid=grid,
                      callback=cb)
    assert model.ts == pytest.approx(hf_ts, abs=5e-3)  # the same 15 model calls at the same timesteps
    assert len(states) == len(ref) == 8 and states[-1][0] == -1
    for (_, a), b in zip(states, ref):
        _close(a, b)
    _close(out, ref[-1])


def _dpm(pred, algorithm, karras, steps, zero_snr=False):
    hf = DPMSolverMultistepScheduler(**_hf_kwargs(pred, zero_snr), algorithm_type=algorithm, solver_order=2,
                                     lower_order_final=True, timestep_spacing="trailing",
                                     use_karras_sigmas=karras)
    hf.set_timesteps(steps)
    return hf


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_karras_matches_diffusers(pred, steps):
    model, x = FloatToy(), _noise()
    hf = _dpm(pred, "dpmsolver++", True, steps)
    ref = _hf_loop(hf, model, x.clone())
    hf_ts = list(model.ts)
    model.ts.clear()
    states, cb = _record()
    out = sample_dpmpp_2m(model, x.clone(), _schedule(), steps=steps, prediction_type=pred, grid="karras",
                          callback=cb)
    assert model.ts == hf_ts  # whole timesteps, rounded from the Karras sigmas
    for (_, a), b in zip(states, ref):
        _close(a, b)
    _close(out, ref[-1])


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing,grid", [("trailing", "timesteps"), ("leading", "karras")])
def test_dpmpp_2m_sde_matches_diffusers(pred, spacing, grid):
    model, x, steps = ToyDenoiser(), _noise(), 10
    hf = _dpm(pred, "sde-dpmsolver++", grid == "karras", steps)
    g = torch.Generator().manual_seed(9)  # the same noise stream, handed to diffusers one step at a time
    ref = _hf_loop(hf, model, x.clone(), lambda i: {"variance_noise": torch.randn(SHAPE, generator=g)})
    states, cb = _record()
    out = sample_dpmpp_2m_sde(model, x.clone(), _schedule(), steps=steps, prediction_type=pred, spacing=spacing,
                              grid=grid, generator=torch.Generator().manual_seed(9), callback=cb)
    assert len(states) == len(ref) == steps
    for (_, a), b in zip(states, ref):
        _close(a, b)
    _close(out, ref[-1])
    # eta = 0 is the ODE solver
    ode = sample_dpmpp_2m_sde(model, x.clone(), _schedule(), steps=steps, prediction_type=pred, spacing=spacing,
                              grid=grid, eta=0.0, generator=torch.Generator().manual_seed(9))
    _close(ode, sample_dpmpp_2m(model, x.clone(), _schedule(), steps=steps, prediction_type=pred, spacing=spacing,
                                grid=grid), 1e-6)


def test_zero_terminal_snr_grid_samplers_are_finite():
    for name in ("heun", "dpmpp_2m_sde"):
        for grid in ("timesteps", "karras"):
            out = SAMPLERS[name](ToyDenoiser(), _noise(), _schedule(True), steps=6, prediction_type="v",
                                 spacing="trailing", grid=grid, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out).all(), (name, grid)


def test_heun_churn_adds_noise_and_stays_finite():
    x = _noise()
    a = sample_heun(ToyDenoiser(), x, _schedule(), steps=6, s_churn=1.0, generator=torch.Generator().manual_seed(0))
    b = sample_heun(ToyDenoiser(), x, _schedule(), steps=6, s_churn=1.0, generator=torch.Generator().manual_seed(1))
    c = sample_heun(ToyDenoiser(), x, _schedule(), steps=6)
    assert torch.isfinite(a).all() and not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m_sde"])
def test_grid_samplers_img2img_and_inpaint_callback(name):
    """strength keeps the last grid points; the callback gets x at the nearest training timestep (-1 at the end)."""
    known = _noise(4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1.0
    states, record = _record()

    def blend_and_record(i, t, x):
        x = inpaint_callback(known, mask, _schedule(), _noise(6))(i, t, x)
        record(i, t, x)
        return x

    out = SAMPLERS[name](ToyDenoiser(), known.clone(), _schedule(), steps=10, strength=0.5, grid="karras",
                         generator=torch.Generator().manual_seed(0), callback=blend_and_record)
    sigmas, _ = make_sigmas(_schedule(), 10, grid="karras")
    assert [t for t, _ in states] == [nearest_timestep(s, _schedule()) for s in sigmas[6:].tolist()]
    assert states[-1][0] == -1
    assert torch.equal(out[..., :2], known[..., :2])
