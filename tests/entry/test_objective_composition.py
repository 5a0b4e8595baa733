"""Rectified flow and EDM where they meet the rest of the tool: the trained inpainting and super-resolution
concat stages, the adherence callback during training, the EMA, and `sdlight.evaluate` (tiny RANDOM-INIT stage 1,
two training steps)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.checkpoints import read_checkpoint
from sdlight.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import run_cli  # noqa: E402
from conftest import train_tiny_text_ldm  # noqa: E402
from test_applications import first_unet_input  # noqa: E402

PROMPT = "a red circle in the center on a white background"
OBJECTIVES = {"rectified_flow": ["model/objective=rectified_flow"], "edm": ["model/objective=edm"]}
TARGETS = {"rectified_flow": "RectifiedFlow", "edm": "EDM"}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("stage", ["inpaint", "superres"])
def test_concat_stages_train_and_sample_with_the_objective(tmp_path, stage, objective):
    train_tiny_text_ldm(tmp_path, ["logger=none", *OBJECTIVES[objective], "model.sample_every_n_steps=1",
                                   "model.sampler.steps=2"], f"quickstart_{stage}")
    assert list((tmp_path / "images").glob("samples_*.png")), "sample grids with the inputs were logged"
    pipe = Pipeline.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", device="cpu")
    assert type(pipe.model.objective).__name__ == TARGETS[objective]
    if stage == "inpaint":
        init = Image.new("RGB", (32, 32), (255, 255, 255))
        mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12))
        x, out = first_unet_input(pipe, [PROMPT], steps=2, seed=0, init_image=init, mask=mask, sampler="heun")
        assert x.shape[1] == 9 and out.settings["inpainting"] is True
    else:
        low = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
        x, out = first_unet_input(pipe, None, num_samples=1, steps=2, seed=0, lowres=low, sampler="heun")
        assert x.shape[1] == 16
    assert np.isfinite(np.asarray(out.images[0], dtype=np.float32)).all()


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def scored_run(request, tmp_path_factory):
    """A tiny run of each objective with the adherence callback at the end of training."""
    root = tmp_path_factory.mktemp(request.param)
    _, objects = train_tiny_text_ldm(root, ["logger=none", *OBJECTIVES[request.param], "callbacks=[default,adherence]",
                                            "callbacks.adherence.num_samples=4", "callbacks.adherence.batch_size=4",
                                            "callbacks.adherence.steps=2", "callbacks.adherence.every_n_steps=null"])
    return request.param, root / "checkpoints" / "last.ckpt", objects


def test_the_adherence_callback_scores_the_objective_during_training(scored_run):
    _, _, objects = scored_run
    metrics = objects["trainer"].callback_metrics
    for name in ("colour", "shape", "position", "background", "all"):
        assert 0.0 <= float(metrics[f"val/adherence/{name}"]) <= 1.0


def test_the_ema_is_kept_and_sampled_by_default(scored_run):
    objective, ckpt, _ = scored_run
    sd = read_checkpoint(ckpt)["state_dict"]
    assert int(sd["model_ema.n_averaged"]) == 2
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sd[key], sd["model_ema.module.0.diffusion_model.out.2.weight"])
    ema = Pipeline.from_checkpoint(ckpt, device="cpu")
    assert type(ema.model.objective).__name__ == TARGETS[objective]
    assert torch.equal(ema.model.state_dict()[key], sd["model_ema.module.0.diffusion_model.out.2.weight"])


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_evaluate_scores_the_objective(scored_run, tmp_path, sampler):
    _, ckpt, _ = scored_run
    out = run_cli("evaluate", [f"ckpt={ckpt}", "metrics=[adherence]", "num_samples=4", "batch_size=4", "steps=2",
                               f"sampler={sampler}", "device=cpu", f"out={tmp_path / 'out'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["settings"]["sampler"] == sampler and 0.0 <= report["scores"]["adherence/all"] <= 1.0
