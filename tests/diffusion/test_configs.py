"""The schedule and sampler config nodes instantiate to our functions through Hydra."""

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sdlight.diffusion import SAMPLERS, NoiseSchedule, make_betas, sampler_name

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


@pytest.mark.parametrize(
    "name,b1,bT",
    [("linear", 1e-4, 2e-2), ("scaled_linear", 0.00085, 0.012), ("cosine", None, None),
     ("quadratic", 1e-4, 2e-2), ("sigmoid", 1e-4, 2e-2)],
)
def test_schedule_configs(name, b1, bT):
    cfg = OmegaConf.load(CONF / "schedule" / f"{name}.yaml")
    assert cfg.zero_terminal_snr is False and cfg.num_timesteps == 1000
    sched = instantiate(cfg)
    assert isinstance(sched, NoiseSchedule)
    ref = make_betas(name, 1000) if b1 is None else make_betas(name, 1000, b1, bT)
    torch.testing.assert_close(sched.betas, ref, rtol=0, atol=0)
    zsched = instantiate(cfg, zero_terminal_snr=True)
    assert zsched.alphas_cumprod[-1] == 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_configs(name):
    """Every registered sampler has a config node, and the node is that sampler (sampler_name reads it back)."""
    cfg = OmegaConf.load(CONF / "sampler" / f"{name}.yaml")
    sampler = instantiate(cfg)
    registered = SAMPLERS[name]
    assert isinstance(sampler, functools.partial) and sampler.func is getattr(registered, "func", registered)
    assert sampler_name(sampler) == name
    assert sampler.keywords["steps"] == {"ddpm": 250, "ddim": 50, "dpmpp_2m": 50, "euler": 50, "unipc": 20}.get(name, 25)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = sampler(lambda x, t: 0.1 * x, x, NoiseSchedule.make(), steps=4, prediction_type="eps",
                  generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
