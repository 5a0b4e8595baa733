"""UniPC against diffusers' UniPCMultistepScheduler, step by step, on the toy denoiser."""

import pytest
from diffusers import UniPCMultistepScheduler

from sdlight.diffusion import SAMPLERS
from sdlight.diffusion.grid_samplers import sample_unipc
from tests.diffusion.test_grid_samplers import FloatToy, _hf_loop
from tests.diffusion.test_samplers import _close, _hf_kwargs, _noise, _record, _schedule


@pytest.mark.parametrize("pred", ["eps", "v"])
# (no Karras grid with zero terminal SNR: diffusers' Karras grid needs a finite largest sigma)
@pytest.mark.parametrize("steps,grid,zero_snr", [(3, "timesteps", False), (10, "timesteps", False),
                                                 (20, "timesteps", False), (12, "karras", False),
                                                 (3, "timesteps", True), (10, "timesteps", True),
                                                 (20, "timesteps", True)])
def test_unipc_matches_diffusers(pred, steps, grid, zero_snr):
    model, x = FloatToy(), _noise()
    # trailing spacing: diffusers' UniPC spaces "leading"/"linspace" over T + 1 points, unlike its other schedulers
    hf = UniPCMultistepScheduler(**_hf_kwargs(pred, zero_snr), solver_order=2, solver_type="bh2", predict_x0=True,
                                 lower_order_final=True, timestep_spacing="trailing",
                                 use_karras_sigmas=grid == "karras")
    hf.set_timesteps(steps)
    ref = _hf_loop(hf, model, x.clone())
    hf_ts = list(model.ts)
    model.ts.clear()
    states, cb = _record()
    out = sample_unipc(model, x.clone(), _schedule(zero_snr), steps=steps, prediction_type=pred, spacing="trailing",
                       grid=grid, callback=cb)
    assert model.ts == hf_ts  # one model call per step, at the same timesteps
    assert len(states) == len(ref) == steps and states[-1][0] == -1
    for (_, a), b in zip(states, ref):
        _close(a, b)
    _close(out, ref[-1])


def test_unipc_is_registered():
    assert SAMPLERS["unipc"] is sample_unipc
