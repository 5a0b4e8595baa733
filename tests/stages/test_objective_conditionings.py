"""Rectified flow and EDM with every conditioning (class labels, attribute sets, none; text is in
tests/entry/test_objectives.py): a tiny RANDOM-INIT model trains two steps and samples with guidance."""

from functools import partial

import pytest
import torch

from sdlight.diffusion import EDM, RectifiedFlow
from sdlight.diffusion.grid_samplers import sample_euler, sample_heun

from .conftest import SIZE, shapes_batch, shapes_loader, tiny_ldm, tiny_trainer

NO_DDPM = dict(schedule=None, prediction_type=None, loss_type=None, loss_weighting=None, snr_gamma=None)


@pytest.mark.parametrize("objective", [RectifiedFlow(shift=3.0), EDM(sigma_data=1.0)], ids=["rectified_flow", "edm"])
@pytest.mark.parametrize("conditioning", ["class", "attributes", "none"])
def test_each_conditioning_trains_and_samples_with_the_objective(tmp_path, objective, conditioning):
    torch.manual_seed(0)
    module = tiny_ldm(conditioning, objective=objective, sampler=partial(sample_euler, steps=2), p_uncond=0.2,
                      **NO_DDPM)
    before = {k: v.clone() for k, v in module.net.model.state_dict().items()}
    tiny_trainer(tmp_path).fit(module, shapes_loader(8, 4))
    assert any(not torch.equal(before[k], v) for k, v in module.net.model.state_dict().items())
    batch = shapes_batch(2)
    conditions = None if conditioning == "none" else batch
    for sampler in (sample_euler, sample_heun):
        images = module.generate(conditions, None if conditions else 2, sampler=partial(sampler, steps=2),
                                 guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()
