"""Schedules against closed forms (float64, written out here) and against diffusers' schedulers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale_zero_terminal_snr

from sdlight.diffusion import NoiseSchedule, at, make_betas, rescale_zero_terminal_snr

T = 1000


def closed_form_betas(name: str, b1: float, bT: float, n: int = T, s: float = 8e-3) -> torch.Tensor:
    """The lecture-note formulas, t = 1..T, one python float at a time."""
    out = []
    for t in range(1, n + 1):
        r = (t - 1) / (n - 1)
        if name == "linear":
            out.append(b1 + r * (bT - b1))
        elif name in ("scaled_linear", "quadratic"):
            out.append((math.sqrt(b1) + r * (math.sqrt(bT) - math.sqrt(b1))) ** 2)
        elif name == "sigmoid":
            out.append(b1 + (bT - b1) / (1 + math.exp(6.0 * (1 - 2 * r))))
        elif name == "cosine":
            f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
            out.append(min(1 - f(t / n) / f((t - 1) / n), 0.999))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "name,b1,bT",
    [("linear", 1e-4, 2e-2), ("scaled_linear", 0.00085, 0.012), ("quadratic", 1e-4, 2e-2),
     ("sigmoid", 1e-4, 2e-2), ("cosine", 0.0, 0.0)],
)
def test_betas_match_closed_form(name, b1, bT):
    betas = make_betas(name, T, b1, bT)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    torch.testing.assert_close(betas, closed_form_betas(name, b1, bT), rtol=1e-12, atol=1e-15)
    # alphas_cumprod is the running product of 1 - beta
    acp = NoiseSchedule(betas).alphas_cumprod
    ref = torch.tensor([math.prod(1 - b for b in betas[: i + 1].tolist()) for i in (0, 10, 500, T - 1)],
                       dtype=torch.float64)
    torch.testing.assert_close(acp[[0, 10, 500, T - 1]], ref, rtol=1e-10, atol=0)


def test_cosine_alpha_bar_is_ratio_of_f():
    s = 8e-3
    acp = NoiseSchedule(make_betas("cosine", T, cosine_s=s)).alphas_cumprod
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ref = torch.tensor([f(t / T) / f(0) for t in range(1, T)], dtype=torch.float64)
    torch.testing.assert_close(acp[:-1], ref, rtol=1e-10, atol=1e-14)  # the last beta is clipped
    assert make_betas("cosine", T).max() == pytest.approx(0.999)


@pytest.mark.parametrize(
    "ours,theirs,b1,bT",
    [("linear", "linear", 1e-4, 2e-2), ("scaled_linear", "scaled_linear", 0.00085, 0.012),
     ("cosine", "squaredcos_cap_v2", 1e-4, 2e-2), ("sigmoid", "sigmoid", 1e-4, 2e-2)],
)
def test_betas_match_diffusers(ours, theirs, b1, bT):
    hf = DDPMScheduler(num_train_timesteps=T, beta_start=b1, beta_end=bT, beta_schedule=theirs)
    sched = NoiseSchedule.make(ours, T, b1, bT)
    # diffusers keeps float32 tables
    torch.testing.assert_close(sched.betas.float(), hf.betas, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas_cumprod.float(), hf.alphas_cumprod, rtol=2e-5, atol=1e-9)


def test_zero_terminal_snr_matches_diffusers():
    betas = make_betas("scaled_linear", T, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    theirs = hf_rescale_zero_terminal_snr(betas.clone())  # the same algorithm on the same float64 input
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    sched = NoiseSchedule.make("scaled_linear", T, zero_terminal_snr=True)
    assert sched.alphas_cumprod[-1] == 0 and sched.snr(T - 1) == 0 and math.isinf(sched.sigmas[-1])
    plain = NoiseSchedule.make("scaled_linear", T)
    # the first step keeps its value; the rest is a shifted and scaled sqrt(alpha_bar)
    torch.testing.assert_close(sched.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-12, atol=0)
    sa, sp = sched.sqrt_alphas_cumprod, plain.sqrt_alphas_cumprod
    lin = (sp - sp[-1]) * sp[0] / (sp[0] - sp[-1])
    torch.testing.assert_close(sa, lin, rtol=1e-10, atol=1e-14)


def test_make_defaults_and_errors():
    assert NoiseSchedule.make("linear").betas[0].item() == pytest.approx(1e-4)
    assert NoiseSchedule.make("linear").betas[-1].item() == pytest.approx(2e-2)
    sd = NoiseSchedule.make()  # scaled_linear with Stable Diffusion's range
    assert sd.betas[0].item() == pytest.approx(0.00085) and sd.betas[-1].item() == pytest.approx(0.012)
    assert sd.num_timesteps == 1000
    with pytest.raises(ValueError):
        make_betas("nope")
    with pytest.raises(ValueError):
        NoiseSchedule(torch.zeros(10))


def test_derived_tables():
    sched = NoiseSchedule.make("linear", 100)
    a = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 100, dtype=torch.float64), 0)
    torch.testing.assert_close(sched.alphas_cumprod, a)
    torch.testing.assert_close(sched.sqrt_alphas_cumprod, a.sqrt())
    torch.testing.assert_close(sched.sqrt_one_minus_alphas_cumprod, (1 - a).sqrt())
    torch.testing.assert_close(sched.sigmas, ((1 - a) / a).sqrt())
    t = torch.tensor([0, 5, 99])
    torch.testing.assert_close(sched.snr(t, dtype=torch.float64), (a / (1 - a))[t])
    assert sched.snr(t).dtype == torch.float32


def test_at_gathers_and_broadcasts():
    sched = NoiseSchedule.make("linear", 100)
    x = torch.zeros(3, 2, 4, 5, dtype=torch.float32)
    t = torch.tensor([0, 7, 99])
    out = at(sched.alphas_cumprod, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), sched.alphas_cumprod[t].float())
    torch.testing.assert_close(at(sched.betas, 7, x).flatten(), sched.betas[[7, 7, 7]].float())
    torch.testing.assert_close(at(sched.betas, torch.tensor(7), x.double()).flatten(), sched.betas[[7, 7, 7]])
    moved = sched.to("cpu")
    torch.testing.assert_close(moved.alphas_cumprod, sched.alphas_cumprod)
