"""Each sampler against the diffusers scheduler of the same name, step by step, on a fixed toy denoiser."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from sdlight.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    inpaint_callback,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
)

T, B1, BT = 1000, 0.00085, 0.012
SHAPE = (2, 3, 4, 4)
HF_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


class ToyDenoiser:
    """A fixed random linear map of x with timestep-dependent gain and bias: deterministic, cheap, nonlinear in t."""

    def __init__(self, seed: int = 0, c: int = SHAPE[1]):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(c, c, generator=g, dtype=torch.float64) / math.sqrt(c)
        self.b = torch.randn(c, generator=g, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(torch.float64) / T).view(-1, 1, 1, 1)
        dtype, x = x.dtype, x.double()
        out = torch.einsum("ij,bjhw->bihw", self.w, x) * (0.5 + s) + 0.3 * self.b.view(1, -1, 1, 1) * torch.cos(3 * s)
        out = out + 0.2 * x.roll(1, dims=-1)  # spatial coupling, so a blended region reaches the rest
        return out.to(dtype)


def _schedule(zero_snr: bool = False) -> NoiseSchedule:
    return NoiseSchedule.make("scaled_linear", T, B1, BT, zero_terminal_snr=zero_snr)


def _hf_kwargs(pred: str, zero_snr: bool = False) -> dict:
    return dict(num_train_timesteps=T, beta_start=B1, beta_end=BT, beta_schedule="scaled_linear",
                prediction_type=HF_PRED[pred], rescale_betas_zero_snr=zero_snr)


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _record():
    xs = []

    def callback(i, t, x):
        xs.append((int(t[0]), x.clone()))

    return xs, callback


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5):
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0))


def _hf_run(sched, model, x, step_kwargs=lambda i: {}, to_vp=lambda i, x: x):
    """The diffusers denoising loop; returns the state after each step (in the variance-preserving scale)."""
    states = []
    for i, t in enumerate(sched.timesteps):
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]).long())
        x = sched.step(out, t, x, **step_kwargs(i)).prev_sample
        states.append(to_vp(i, x))
    return states


def _compare(ours_states, ref_states, ts, tol=1e-5):
    assert [t for t, _ in ours_states] == ts[1:] + [-1]
    assert len(ours_states) == len(ref_states)
    for (_, a), b in zip(ours_states, ref_states):
        _close(a, b, tol)


def test_make_timesteps_matches_diffusers():
    for steps in (1, 3, 7, 10, 50, 250, 999, 1000):
        for spacing in ("leading", "trailing", "linspace"):
            hf = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1)
            hf.set_timesteps(steps)
            ours = make_timesteps(steps, T, spacing)
            if spacing == "leading" and steps == T:
                # diffusers would index past T - 1 here; we drop the offset instead
                assert ours.tolist() == list(range(T - 1, -1, -1))
                continue
            assert ours.tolist() == hf.timesteps.tolist(), (steps, spacing)
    with pytest.raises(ValueError):
        make_timesteps(0, T)
    with pytest.raises(ValueError):
        make_timesteps(10, T, "karras")


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_matches_diffusers(pred, spacing):
    model, x = ToyDenoiser(), _noise()
    hf = DDPMScheduler(**_hf_kwargs(pred), clip_sample=False, timestep_spacing=spacing, steps_offset=1)
    hf.set_timesteps(10)
    g = torch.Generator().manual_seed(7)
    ref = _hf_run(hf, model, x.clone(), lambda i: {"generator": g})
    states, cb = _record()
    out = sample_ddpm(model, x.clone(), _schedule(), steps=10, prediction_type=pred, spacing=spacing,
                      generator=torch.Generator().manual_seed(7), callback=cb)
    _compare(states, ref, hf.timesteps.tolist())
    _close(out, ref[-1])


def test_ddpm_clip_matches_diffusers():
    model, x = ToyDenoiser(), 3 * _noise()
    hf = DDPMScheduler(**_hf_kwargs("x0"), clip_sample=True, clip_sample_range=1.0, steps_offset=1)
    hf.set_timesteps(5)
    g = torch.Generator().manual_seed(2)
    ref = _hf_run(hf, model, x.clone(), lambda i: {"generator": g})
    out = sample_ddpm(model, x.clone(), _schedule(), steps=5, prediction_type="x0", clip_x0=1.0,
                      generator=torch.Generator().manual_seed(2))
    _close(out, ref[-1])
    assert out.abs().max() <= 1.0 + 1e-6  # the last step returns the clipped x0


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
@pytest.mark.parametrize("bound", [True, False, 0, -1.0, "1"])
def test_clip_x0_takes_a_positive_number_not_a_switch(sampler, bound):
    with pytest.raises(ValueError, match=r"clip_x0 is the bound of the predicted x0 \(a number > 0"):
        sampler(ToyDenoiser(), _noise(), _schedule(), steps=2, clip_x0=bound)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(pred, spacing, eta):
    model, x = ToyDenoiser(), _noise()
    hf = DDIMScheduler(**_hf_kwargs(pred), clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                       steps_offset=1)
    hf.set_timesteps(10)
    g = torch.Generator().manual_seed(5)  # the same noise stream, handed to diffusers one step at a time
    ref = _hf_run(hf, model, x.clone(), lambda i: {"eta": eta, "variance_noise": torch.randn(SHAPE, generator=g)})
    states, cb = _record()
    out = sample_ddim(model, x.clone(), _schedule(), steps=10, prediction_type=pred, spacing=spacing, eta=eta,
                      generator=torch.Generator().manual_seed(5), callback=cb)
    _compare(states, ref, hf.timesteps.tolist())
    _close(out, ref[-1])


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_ddpm_variance():
    model, x = ToyDenoiser(), _noise()
    a = sample_ddim(model, x, _schedule(), steps=8, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(model, x, _schedule(), steps=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample_ddim(model, x, _schedule(), steps=8, eta=1.0, generator=torch.Generator().manual_seed(3))
    d = sample_ddpm(model, x, _schedule(), steps=8, generator=torch.Generator().manual_seed(3))
    _close(c, d, 1e-5)  # eta = 1 is the DDPM posterior (Song et al., 2021, eq. 16)


def _dpm_scheduler(pred, spacing, steps, zero_snr=False):
    hf = DPMSolverMultistepScheduler(**_hf_kwargs(pred, zero_snr), algorithm_type="dpmsolver++", solver_order=2,
                                     lower_order_final=True, timestep_spacing="trailing")
    if spacing == "trailing":
        hf.set_timesteps(steps)
    else:  # diffusers' DPM-Solver has its own "leading"; the solver is what is under test here
        hf.set_timesteps(timesteps=make_timesteps(steps, T, spacing).tolist())
    return hf


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [8, 16])
def test_dpmpp_2m_matches_diffusers(pred, spacing, steps):
    model, x = ToyDenoiser(), _noise()
    hf = _dpm_scheduler(pred, spacing, steps)
    ref = _hf_run(hf, model, x.clone())
    states, cb = _record()
    out = sample_dpmpp_2m(model, x.clone(), _schedule(), steps=steps, prediction_type=pred, spacing=spacing,
                          callback=cb)
    _compare(states, ref, hf.timesteps.tolist())
    _close(out, ref[-1])


def test_dpmpp_2m_zero_terminal_snr_matches_diffusers():
    model, x = ToyDenoiser(), _noise()
    hf = _dpm_scheduler("v", "trailing", 10, zero_snr=True)
    ref = _hf_run(hf, model, x.clone())
    out = sample_dpmpp_2m(model, x.clone(), _schedule(True), steps=10, prediction_type="v", spacing="trailing")
    assert torch.isfinite(out).all()
    _close(out, ref[-1])


def _euler_vp(hf):
    # diffusers carries x in the variance-exploding scale; the callback sees the variance-preserving one
    return lambda i, x: x / math.sqrt(1 + hf.sigmas[i + 1].item() ** 2)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_matches_diffusers(pred, spacing):
    model, x = ToyDenoiser(), _noise()
    hf = EulerDiscreteScheduler(**_hf_kwargs(pred), timestep_spacing=spacing, steps_offset=1)
    hf.set_timesteps(10)
    x_ve = x * math.sqrt(1 + hf.sigmas[0].item() ** 2)
    ref = _hf_run(hf, model, x_ve, to_vp=_euler_vp(hf))
    states, cb = _record()
    out = sample_euler(model, x.clone(), _schedule(), steps=10, prediction_type=pred, spacing=spacing, callback=cb)
    _compare(states, ref, [int(t) for t in hf.timesteps.tolist()])
    _close(out, ref[-1])


def test_euler_zero_terminal_snr_matches_diffusers():
    model, x = ToyDenoiser(), _noise()
    hf = EulerDiscreteScheduler(**_hf_kwargs("v", True), timestep_spacing="trailing")
    hf.set_timesteps(10)
    assert hf.sigmas[0].item() == pytest.approx(4096.0, rel=1e-4)
    ref = _hf_run(hf, model, x * math.sqrt(1 + hf.sigmas[0].item() ** 2), to_vp=_euler_vp(hf))
    out = sample_euler(model, x.clone(), _schedule(True), steps=10, prediction_type="v", spacing="trailing")
    exact = sample_euler(model, x.double(), _schedule(True), steps=10, prediction_type="v", spacing="trailing")
    assert torch.isfinite(out).all()
    _close(out.double(), exact, 1e-6)
    # diffusers carries x * 4096 in float32 through the first step, which costs it about 1e-5 here
    _close(out, ref[-1], 5e-5)


def test_euler_is_ddim_eta_zero_on_finite_snr():
    model, x = ToyDenoiser(), _noise().double()
    a = sample_euler(model, x, _schedule(), steps=7, prediction_type="v", spacing="trailing")
    b = sample_ddim(model, x, _schedule(), steps=7, prediction_type="v", spacing="trailing")
    _close(a, b, 1e-12)


def _hf_img2img(name, pred, strength, steps, x0, generator):
    """StableDiffusionImg2ImgPipeline's get_timesteps + prepare_latents + denoising loop, written out."""
    kw = _hf_kwargs(pred)
    if name == "ddim":
        hf = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    elif name == "ddpm":
        hf = DDPMScheduler(**kw, clip_sample=False, steps_offset=1)
    elif name == "euler":
        hf = EulerDiscreteScheduler(**kw, timestep_spacing="leading", steps_offset=1)
    else:
        hf = DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp_2m":
        hf.set_timesteps(timesteps=make_timesteps(steps, T, "leading").tolist())
    else:
        hf.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = hf.timesteps[t_start * hf.order :]
    if hasattr(hf, "set_begin_index"):
        hf.set_begin_index(t_start * hf.order)
    # the img2img noise comes first from the generator, then (DDPM only) the step noise
    x = hf.add_noise(x0, torch.randn(x0.shape, generator=generator), timesteps[:1])
    model = ToyDenoiser()
    for t in timesteps:
        out = model(hf.scale_model_input(x, t), t.expand(x.shape[0]).long())
        x = hf.step(out, t, x, **({"generator": generator} if name == "ddpm" else {})).prev_sample
    return x, [int(t) for t in timesteps]


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("strength", [0.35, 0.6])
def test_img2img_strength_matches_diffusers(name, strength):
    x0 = 0.8 * _noise(3)
    ref, timesteps = _hf_img2img(name, "v", strength, 10, x0, torch.Generator().manual_seed(11))
    states, cb = _record()
    out = SAMPLERS[name](ToyDenoiser(), x0.clone(), _schedule(), steps=10, prediction_type="v", strength=strength,
                         generator=torch.Generator().manual_seed(11), callback=cb)
    assert len(states) == len(timesteps) == int(10 * strength)
    assert timesteps[0] == make_timesteps(10, T)[10 - int(10 * strength)]
    assert [t for t, _ in states] == timesteps[1:] + [-1]
    _close(out, ref)


def test_strength_zero_returns_input():
    x0 = _noise(3)
    assert torch.equal(sample_ddim(ToyDenoiser(), x0, _schedule(), steps=10, strength=0.05), x0)
    with pytest.raises(ValueError):
        sample_ddim(ToyDenoiser(), x0, _schedule(), steps=10, strength=1.5)


def test_inpaint_callback_matches_diffusers_blending():
    """StableDiffusionInpaintPipeline's blend for 4-channel UNets, with DDIM."""
    known, x = _noise(4), _noise(5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1.0  # generate the right half
    noise = _noise(6)
    model = ToyDenoiser()
    hf = DDIMScheduler(**_hf_kwargs("eps"), clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    hf.set_timesteps(6)
    ref = x.clone()
    for i, t in enumerate(hf.timesteps):
        ref = hf.step(model(ref, t.expand(2).long()), t, ref).prev_sample
        proper = known
        if i < len(hf.timesteps) - 1:
            proper = hf.add_noise(known, noise, torch.tensor([hf.timesteps[i + 1]]))
        ref = (1 - mask) * proper + mask * ref
    blend = inpaint_callback(known, mask, _schedule(), noise)
    out = sample_ddim(model, x.clone(), _schedule(), steps=6, callback=blend)
    _close(out, ref)
    assert torch.equal(out[..., :2], known[..., :2])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_dtype_and_progress(name):
    x = _noise().half()
    out = SAMPLERS[name](ToyDenoiser(), x, _schedule(), steps=3, generator=torch.Generator().manual_seed(0),
                         progress=True)
    assert out.dtype == torch.float16 and out.shape == x.shape and torch.isfinite(out).all()
    ref = SAMPLERS[name](ToyDenoiser(), x.float(), _schedule(), steps=3, generator=torch.Generator().manual_seed(0))
    _close(out.float(), ref, 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cuda_matches_cpu(name):
    """A CPU generator gives the same samples on CUDA; the schedule may live on either device."""
    x0 = _noise()
    kw = dict(steps=6, prediction_type="v", strength=0.8)
    cpu = SAMPLERS[name](ToyDenoiser(), x0, _schedule(), generator=torch.Generator().manual_seed(0), **kw)

    class CudaToy(ToyDenoiser):
        def __call__(self, x, t):
            assert x.is_cuda and t.is_cuda and t.dtype == torch.long
            self.w, self.b = self.w.cuda(), self.b.cuda()
            return super().__call__(x, t)

    for sched in (_schedule(), _schedule().to("cuda")):
        out = SAMPLERS[name](CudaToy(), x0.cuda(), sched, generator=torch.Generator().manual_seed(0), **kw)
        assert out.is_cuda
        _close(out.cpu(), cpu, 1e-5)
