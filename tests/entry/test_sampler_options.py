"""Sampler options flow from the Pipeline and the sample CLI to the sampler function; a wrong one is named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlight.diffusion import SAMPLERS
from sdlight.errors import UsageError
from sdlight.pipeline import Pipeline
from sdlight.sampling_checks import resolve_sampler_options

PROMPT = "a red circle in the center on a white background"


@pytest.fixture(scope="module")
def pipe(tiny_text_ldm):
    return Pipeline.from_checkpoint(tiny_text_ldm[0], device="cpu")


def _arr(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_resolve_sampler_options_names_the_wrong_option_and_the_right_ones():
    assert resolve_sampler_options("ddim", SAMPLERS["ddim"], {"eta": 0.5}) == {"eta": 0.5}
    assert resolve_sampler_options("ddim", SAMPLERS["ddim"], None, eta=0.3) == {"eta": 0.3}
    with pytest.raises(UsageError) as err:
        resolve_sampler_options("euler", SAMPLERS["euler"], {"eta": 0.5})
    assert str(err.value) == "sampler_options.eta: sampler euler has no such option; its options: spacing, grid"
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="s_churn, s_tmin, s_tmax, s_noise"):
        resolve_sampler_options("heun", SAMPLERS["heun"], {"churn": 1.0})


def test_sampler_option_values_are_checked_with_or_without_the_sampler():
    with pytest.raises(UsageError) as err:
        resolve_sampler_options(None, None, {"grid": "karas"})  # the model's sampler: not loaded yet
    assert str(err.value) == "sampler_options.grid=karas: unknown; choose one of timesteps, karras, exponential"
    with pytest.raises(UsageError, match="sampler_options.spacing=foo: unknown; choose one of leading, trailing"):
        resolve_sampler_options("ddim", SAMPLERS["ddim"], {"spacing": "foo"})
    with pytest.raises(UsageError, match="sampler_options.s_churn=True: give a number >= 0"):
        resolve_sampler_options("heun", SAMPLERS["heun"], {"s_churn": True})
    with pytest.raises(UsageError, match="sampler_options.eta=-1: give a number >= 0"):
        resolve_sampler_options(None, None, {"eta": -1})
    options = {"grid": "karras", "spacing": "trailing", "s_churn": 1, "s_tmax": float("inf")}
    assert resolve_sampler_options("heun", SAMPLERS["heun"], options) == options


def test_clip_x0_is_refused_for_latent_models(pipe):
    """clip_x0 clamps x0 in the space the sampler runs in: sdlight's models sample latents, not pixels in [-1, 1]."""
    for bound in (True, 1.0):
        with pytest.raises(UsageError, match=f"sampler_options.clip_x0={bound}: .* sample latents"):
            pipe([PROMPT], steps=2, sampler="ddim", sampler_options={"clip_x0": bound})


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m_karras", "dpmpp_2m_sde"])
def test_pipeline_runs_the_new_samplers(pipe, sampler):
    a = pipe([PROMPT], steps=3, sampler=sampler, seed=1)
    assert a.settings["sampler"] == sampler and len(a.images) == 1


def test_pipeline_passes_options_through(pipe):
    det = pipe([PROMPT], steps=3, sampler="ddim", seed=1)
    noisy = pipe([PROMPT], steps=3, sampler="ddim", sampler_options={"eta": 1.0}, seed=1)
    shortcut = pipe([PROMPT], steps=3, sampler="ddim", eta=1.0, seed=1)
    assert not np.array_equal(_arr(det), _arr(noisy)) and np.array_equal(_arr(noisy), _arr(shortcut))
    assert noisy.settings["sampler_options"] == {"eta": 1.0} and noisy.settings["eta"] == 1.0
    karras = pipe([PROMPT], steps=3, sampler="dpmpp_2m", sampler_options={"grid": "karras"}, seed=1)
    assert np.array_equal(_arr(karras), _arr(pipe([PROMPT], steps=3, sampler="dpmpp_2m_karras", seed=1)))
    with pytest.raises(UsageError, match="sampler_options.eta: sampler dpmpp_2m has no such option"):
        pipe([PROMPT], steps=2, sampler="dpmpp_2m", sampler_options={"eta": 0.5})
    with pytest.raises(UsageError, match="sampler_options.s_churn"):
        pipe([PROMPT], steps=2, sampler_options={"s_churn": 1.0})  # the model's configured sampler: ddim


def test_sample_cli_sampler_options(tiny_text_ldm, tmp_path):
    env = dict(os.environ, SDLIGHT_OFFLINE="1", HF_HUB_OFFLINE="1", SDLIGHT_ROOT=str(tmp_path))
    base = [sys.executable, "-m", "sdlight.sample", f"ckpt={tiny_text_ldm[0]}", f"prompt={PROMPT}", "num_samples=1",
            "steps=2", "device=cpu", "progress=false"]
    bad = subprocess.run(base + ["sampler=euler", "sampler_options.eta=0.5", f"out={tmp_path / 'bad'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "sampler_options.eta: sampler euler has no such option; its options: spacing" in bad.stderr
    out = tmp_path / "out"
    run = subprocess.run(base + ["sampler=heun", "sampler_options.grid=karras", "sampler_options.s_churn=0.5",
                                 f"out={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads(Image.open(out / "00000.png").text["sdlight"])
    assert meta["sampler"] == "heun" and meta["sampler_options"] == {"grid": "karras", "s_churn": 0.5}


def test_evaluate_checks_sampler_options_before_reading_the_checkpoint(tmp_path):
    from sdlight.evaluate import evaluate

    with pytest.raises(UsageError, match="sampler_options.eta: sampler euler has no such option"):
        evaluate(tmp_path / "missing.ckpt", ["adherence"], sampler="euler", sampler_options={"eta": 1.0})
