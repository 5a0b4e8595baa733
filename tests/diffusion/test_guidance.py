"""Classifier-free guidance: one batched pass equals two separate ones; rescale against diffusers."""

import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg  # the same function the SD pipelines use

from sdlight.diffusion import NoiseSchedule, cfg_denoiser, rescale_guidance, sample_ddim


class CondModel:
    """Depends on every conditioning entry and on the batch position only through them; counts its calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(8, 3, generator=g)
        self.emb = torch.randn(10, 3, generator=g)
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        h = cond["context"].mean(1) @ self.w  # (B, 3)
        if cond.get("y") is not None:
            h = h + self.emb[cond["y"]]
        out = x * (1 + t.view(-1, 1, 1, 1) / 1000) + h.view(-1, 3, 1, 1)
        if cond.get("concat") is not None:
            out = out + cond["concat"].mean(1, keepdim=True)
        return out


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 4, 4, generator=g)
    t = torch.tensor([500, 20])[:b]
    cond = {"context": torch.randn(b, 5, 8, generator=g), "y": torch.tensor([3, 7])[:b],
            "concat": torch.randn(b, 2, 4, 4, generator=g)}
    uncond = {"context": torch.zeros(1, 5, 8), "y": torch.tensor([0]), "concat": cond["concat"]}
    return x, t, cond, uncond


def test_batched_equals_separate_calls():
    x, t, cond, uncond = _inputs()
    model = CondModel()
    out = cfg_denoiser(model, cond, uncond, scale=7.5)(x, t)
    assert model.calls == [4]  # one forward of batch 2B
    u = model(x, t, {k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    c = model(x, t, cond)
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_the_batched_conditions_are_built_once_per_batch_size():
    # the same context tensor at every step is what lets the UNet reuse its K and V (cached_context_projections)
    x, t, cond, uncond = _inputs(1)  # batch-1 conditions broadcast to the batch
    seen = []
    model = CondModel()
    denoise = cfg_denoiser(lambda x, t, c: seen.append(c["context"]) or model(x, t, c), cond, uncond, scale=3.0)
    first, second = denoise(x, t), denoise(x, t)
    assert seen[0] is seen[1] and seen[0].shape[0] == 2 and torch.equal(first, second)
    denoise(torch.cat([x, x]), torch.cat([t, t]))  # another batch size gets its own
    assert seen[2] is not seen[0] and seen[2].shape[0] == 4


def test_scale_one_is_the_conditional_model():
    x, t, cond, uncond = _inputs()
    model = CondModel()
    out = cfg_denoiser(model, cond, uncond, scale=1.0)(x, t)
    assert model.calls == [2]
    torch.testing.assert_close(out, model(x, t, cond))
    torch.testing.assert_close(cfg_denoiser(model, cond, None, scale=5.0)(x, t), model(x, t, cond))


def test_none_entries_and_mismatches():
    x, t, cond, uncond = _inputs()
    cond["concat"], uncond["concat"] = None, None
    model = CondModel()
    out = cfg_denoiser(model, cond, uncond, scale=3.0)(x, t)
    u = model(x, t, {"context": uncond["context"].expand(2, 5, 8), "y": uncond["y"].expand(2), "concat": None})
    torch.testing.assert_close(out, u + 3.0 * (model(x, t, cond) - u))
    uncond["concat"] = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError):
        cfg_denoiser(model, cond, uncond, scale=3.0)(x, t)
    with pytest.raises(ValueError):
        cfg_denoiser(model, cond, {"context": uncond["context"]}, scale=3.0)(x, t)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    x, t, cond, uncond = _inputs()
    model = CondModel()
    out = cfg_denoiser(model, cond, uncond, scale=9.0, rescale=phi)(x, t)
    u = model(x, t, {k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    c = model(x, t, cond)
    ref = rescale_noise_cfg(u + 9.0 * (c - u), c, guidance_rescale=phi)
    torch.testing.assert_close(out, ref)
    if phi == 1.0:  # the guided output then has the conditional output's per-sample std
        torch.testing.assert_close(out.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(c, u, 0.0), c)


def test_guided_sampling_runs_through_a_sampler():
    x, _, cond, uncond = _inputs()
    model = CondModel()
    out = sample_ddim(cfg_denoiser(model, cond, uncond, 4.0), x, NoiseSchedule.make(), steps=3)
    assert out.shape == x.shape and torch.isfinite(out).all() and model.calls == [4, 4, 4]
