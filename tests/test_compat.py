"""A checkpoint written before the model was split from its trainer still loads and samples what it sampled then.

``fixtures/ldm_class_v0.ckpt``: a tiny class-conditional LDM on 16 px shapes (RANDOM-INIT stage 1, two training
steps, EMA), written by ``sdlight.train`` as of commit 4cce674; ``fixtures/ldm_class_v0_samples.pt``: the images
that code sampled from it with every sampler (6 steps, seed 3, labels 3 and 17, two samples each). On another
processor the float kernels differ in their last bits, hence the tolerance of one grey level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdlight.pipeline import Pipeline

FIXTURES = Path(__file__).parent / "fixtures"
PINNED = torch.load(FIXTURES / "ldm_class_v0_samples.pt", weights_only=True)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_checkpoint(FIXTURES / "ldm_class_v0.ckpt", "cpu")


def _images(result) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)) for im in result.images])


@pytest.mark.parametrize("name", sorted(PINNED))
def test_an_old_checkpoint_samples_its_pinned_images(pipe, name):
    sampler, options = (name, None) if name != "ddim_eta" else ("ddim", {"eta": 0.5})
    got = _images(pipe([3, 17], 2 if options is None else 1, steps=6, sampler=sampler, seed=3,
                       sampler_options=options))
    want = PINNED[name]
    assert got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, f"{name}: {int(diff.max())} grey levels apart"
