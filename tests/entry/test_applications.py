"""Trainable inpainting and super-resolution models: two training steps through train(), then the Pipeline."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import assert_one_line, run_cli  # noqa: E402
from conftest import train_tiny_text_ldm  # noqa: E402

PROMPT = "a red circle in the center on a white background"


def _train(root: Path, experiment: str) -> Path:
    train_tiny_text_ldm(root, ["logger=none", "model.sample_every_n_steps=1", "model.sampler.steps=2"], experiment)
    assert list((root / "images").glob("samples_*.png")), "sample grids with the inputs were logged"
    return root / "checkpoints" / "last.ckpt"


def first_unet_input(pipe: Pipeline, *args, **kwargs):
    """(the UNet's input x at the first sampler step, the pipeline's output) of ``pipe(*args, **kwargs)``."""
    seen = {}
    unet = pipe.model.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda mod, a: None if "x" in seen else seen.update(x=a[0]))
    try:
        out = pipe(*args, **kwargs)
    finally:
        hook.remove()
    return seen["x"], out


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("inpaint"), "quickstart_inpaint")


@pytest.fixture(scope="module")
def superres_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("superres"), "quickstart_superres")


def test_inpainting_model_sees_mask_and_masked_image(inpaint_ckpt):
    pipe = Pipeline.from_checkpoint(inpaint_ckpt, device="cpu")
    unet = pipe.model.model.diffusion_model
    assert unet.config["in_channels"] == 9
    init = Image.new("RGB", (32, 32), (255, 255, 255))
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12))
    x, out = first_unet_input(pipe, [PROMPT], steps=2, seed=0, init_image=init, mask=mask, guidance_scale=2.0)
    assert x.shape == (2, 9, 8, 8)  # [uncond; cond] x [z_t, mask, z(masked)]
    expected_mask = torch.zeros(8, 8)
    expected_mask[3:5, 3:5] = 1
    assert torch.equal(x[0, 4], expected_mask) and torch.equal(x[1, 4], expected_mask)
    assert torch.equal(x[0, 5:], x[1, 5:])  # both guidance branches see the same image evidence
    assert out.settings["inpainting"] is True and len(out.images) == 1
    with pytest.raises(ValueError, match="inpainting model"):
        pipe([PROMPT], steps=1)


def test_superres_model_sees_the_low_res_image(superres_ckpt):
    pipe = Pipeline.from_checkpoint(superres_ckpt, device="cpu")
    unet = pipe.model.model.diffusion_model
    assert unet.config["in_channels"] == 16
    low = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    x, out = first_unet_input(pipe, None, num_samples=2, steps=2, seed=0, lowres=low)
    assert x.shape == (2, 16, 8, 8)
    low_t = torch.from_numpy(np.asarray(low, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(torch.nn.functional.pixel_shuffle(x[:1, 4:], 2)[0], low_t, atol=1e-6)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="lowres"):
        pipe(None, num_samples=1, steps=1)


def test_sample_cli_asks_each_model_for_its_inputs(inpaint_ckpt, superres_ckpt, tmp_path):
    out = run_cli("sample", [f"ckpt={inpaint_ckpt}", f"prompt={PROMPT}", "device=cpu"], tmp_path)
    assert_one_line(out, "this checkpoint is an inpainting model", "give init_image= and mask=")
    out = run_cli("sample", [f"ckpt={superres_ckpt}", "device=cpu"], tmp_path)
    assert_one_line(out, "this checkpoint is a super-resolution model", "give lowres=")
