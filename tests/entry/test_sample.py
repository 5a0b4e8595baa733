"""The Pipeline API and the sample CLI on a tiny text-conditioned checkpoint trained in the test."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sdlight
import sdlight.pipeline
from sdlight.checkpoints import CheckpointError
from sdlight.diffusion import inpaint_callback
from sdlight.pipeline import Pipeline
from sdlight.pixels import to_pil

PROMPT = "a red circle in the center on a white background"


@pytest.fixture(scope="module")
def pipe(tiny_text_ldm):
    return Pipeline.from_checkpoint(tiny_text_ldm[0], device="cpu")


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_package_exposes_pipeline():
    assert sdlight.Pipeline is Pipeline


def test_sampling_is_deterministic_for_a_seed(pipe):
    a = pipe([PROMPT], num_samples=2, steps=3, seed=7)
    b = pipe([PROMPT], num_samples=2, steps=3, seed=7)
    c = pipe([PROMPT], num_samples=2, steps=3, seed=8)
    assert len(a.images) == 2 and a.images[0].size == (32, 32)
    assert np.array_equal(_arr(a.images), _arr(b.images))
    assert not np.array_equal(_arr(a.images), _arr(c.images))


def test_img2img_at_strength_zero_returns_the_reconstruction(pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = pipe([PROMPT], steps=10, init_image=init, strength=0.0).images[0]
    x = torch.from_numpy(np.asarray(init, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    m = pipe.model
    with torch.no_grad():
        rec = to_pil(m.decode_latents(m.encode_images(x, sample=False)))[0]
    assert np.abs(_arr([out]) - _arr([rec])).max() <= 1  # uint8 rounding only
    # with strength > 0 the image changes
    moved = pipe([PROMPT], steps=10, init_image=init, strength=0.8).images[0]
    assert np.abs(_arr([moved]) - _arr([rec])).mean() > 1


def test_inpainting_keeps_the_known_region(pipe):
    m = pipe.model
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    z0 = m.encode_images(init, sample=False)
    mask = torch.zeros(1, 1, *z0.shape[2:])
    mask[..., :, : z0.shape[3] // 2] = 1  # regenerate the left half
    gen = torch.Generator().manual_seed(0)
    z = m.generate([PROMPT], steps=4, generator=gen, return_latents=True,
                   callback=inpaint_callback(z0, mask, m.objective, generator=gen))
    keep = mask == 0
    assert torch.equal(z[keep.expand_as(z)], z0[keep.expand_as(z0)])  # exactly the known latents
    assert not torch.allclose(z[(~keep).expand_as(z)], z0[(~keep).expand_as(z0)])
    # through the pipeline, with mask and init images
    init_img = to_pil(init)[0]
    mask_img = Image.fromarray(np.where(np.arange(32)[None, :].repeat(32, 0) < 16, 255, 0).astype(np.uint8))
    out = pipe([PROMPT], steps=4, init_image=init_img, mask=mask_img)
    assert out.settings["inpainting"] is True


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_blended_inpainting_keeps_the_known_pixels_whatever_the_prompt(pipe, guidance, sampler):
    """A white image, its right half to regenerate, and a prompt that contradicts the kept half: the kept half
    comes back exactly (pasted over the decoder's output), and the regenerated half is the model's."""
    init = Image.new("RGB", (32, 32), "white")
    right = np.zeros((32, 32), np.uint8)
    right[:, 16:] = 255
    out = pipe(["a blue square at the top on a black background"], num_samples=2, steps=5, seed=0,
               guidance_scale=guidance, sampler=sampler, init_image=init, mask=Image.fromarray(right))
    got = _arr(out.images)
    assert (got[:, :, :16] == 255).all()  # the known half, untouched
    assert (got[:, :, 16:] != 255).any()  # the other half generated
    # the generated half is the sampler's output decoded, not the input
    free = pipe(["a blue square at the top on a black background"], num_samples=2, steps=5, seed=0,
                guidance_scale=guidance, sampler=sampler)
    assert not np.array_equal(got[:, :, 16:], _arr(free.images)[:, :, 16:])


def test_blended_inpainting_regenerates_every_latent_a_masked_pixel_touches(pipe):
    """A mask edge inside a latent cell: that whole cell is regenerated (so the seam is generated, then the known
    pixels are pasted over it), never kept with half of its pixels asked to change."""
    m = pipe.model
    seen = {}
    original = sdlight.pipeline.inpaint_callback

    def spy(known, mask, schedule, **kw):
        seen["mask"] = mask
        return original(known, mask, schedule, **kw)

    mask = np.zeros((32, 32), np.uint8)
    mask[:, 14:] = 255  # column 14 lies inside latent column 3 (f=4)
    try:
        sdlight.pipeline.inpaint_callback = spy
        pipe([PROMPT], steps=2, init_image=Image.new("RGB", (32, 32)), mask=Image.fromarray(mask))
    finally:
        sdlight.pipeline.inpaint_callback = original
    cols = seen["mask"][0, 0, 0]
    assert cols.tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and m.latent_shape[1:] == (8, 8)


def test_attention_maps_sum_to_one_over_tokens(pipe):
    result = pipe([PROMPT], num_samples=1, steps=2, save_attention=True)
    tokens, maps = result.attention[0]
    assert tokens[0] == "<start_of_text>" and "red" in tokens and "circle" in tokens
    assert maps.shape == (len(tokens), 32, 32)
    assert torch.allclose(maps.sum(0), torch.ones(32, 32), atol=1e-4)  # softmax over keys, averaged linearly


def test_bad_inputs_give_clear_errors(pipe, tiny_text_ldm, tmp_path, caplog):
    with pytest.raises(CheckpointError, match="not found"):
        Pipeline.from_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="not a latent diffusion checkpoint"):
        Pipeline.from_checkpoint(tiny_text_ldm[1])
    with pytest.raises(ValueError, match="sampler=heun3: unknown"):
        pipe([PROMPT], steps=2, sampler="heun3")
    with pytest.raises(ValueError, match="mask needs init_image="):
        pipe([PROMPT], steps=2, mask=Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="mask is 16x16 but init_image is 32x32"):
        pipe([PROMPT], steps=2, init_image=Image.new("RGB", (32, 32)), mask=Image.new("L", (16, 16)))
    with pytest.raises(ValueError, match="no condition was given"):
        pipe(None, steps=2)
    pipe([PROMPT], steps=2, init_image=Image.new("RGB", (48, 40)), strength=0.5)
    assert "init image resized from 48x40 to the model's 32x32" in caplog.text


def test_long_prompt_is_truncated_with_a_warning(tiny_text_ldm):
    pipe = Pipeline.from_checkpoint(tiny_text_ldm[0], device="cpu")  # a fresh tokenizer: the warning fires once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe([" ".join(["red"] * 100)], steps=1)
    assert any("truncated" in str(w.message) for w in caught)


def test_sample_cli_writes_pngs_grid_and_metadata(tiny_text_ldm, tmp_path):
    env = dict(os.environ, SDLIGHT_OFFLINE="1", HF_HUB_OFFLINE="1", SDLIGHT_ROOT=str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# shapes\n{PROMPT}\n\na blue square at the top left on a black background\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdlight.sample", f"ckpt={tiny_text_ldm[0]}", f"prompts_file={prompts}",
            "num_samples=2", "steps=3", "seed=3", "sampler=dpmpp_2m", f"out={out}", "save_attention=true",
            "device=cpu"]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4 and (out / "grid.png").is_file()
    # 2 x 2 samples of 32 px with 2 px padding, upscaled 4x with nearest neighbours so that it can be seen
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (4 * (2 * 32 + 3 * 2),) * 2
    assert np.array_equal(grid, grid[::4, ::4].repeat(4, 0).repeat(4, 1))
    assert Image.open(pngs[0]).size == (32, 32)
    meta = json.loads(Image.open(pngs[0]).text["sdlight"])
    assert meta["seed"] == 3 and meta["sampler"] == "dpmpp_2m" and meta["condition"] == PROMPT
    assert Image.open(pngs[0]).text["prompt"] == PROMPT
    grid_meta = json.loads(Image.open(out / "grid.png").text["sdlight"])  # the grid says what it shows, too
    assert grid_meta["seed"] == 3 and grid_meta["scale"] == 4 and grid_meta["conditions"] == [PROMPT] * 2 + [
        "a blue square at the top left on a black background"] * 2
    assert any((out / "attention" / "00000").glob("*red.png"))
    # same seed, same pixels
    run2 = subprocess.run(args[:-3] + [f"out={tmp_path / 'out2'}", "device=cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(Image.open(tmp_path / "out2" / "00000.png")))


def test_another_size_and_aspect_ratio(pipe):
    """height / width: latents of that shape (the UNet is fully convolutional), attention maps of that shape, the
    same seed drawing the same noise layout; sides that the UNet cannot halve are one line."""
    from sdlight.errors import UsageError

    step = pipe.model.size_multiple
    assert step == 8  # the tiny f=4 autoencoder x a UNet that halves once
    wide = pipe([PROMPT], num_samples=2, steps=2, height=32, width=64, save_attention=True)
    assert [im.size for im in wide.images] == [(64, 32)] * 2
    assert wide.settings["height"] == 32 and wide.settings["width"] == 64
    tokens, maps = wide.attention[0]
    assert maps.shape == (len(tokens), 32, 64)
    assert torch.allclose(maps.sum(0), torch.ones(32, 64), atol=1e-4)
    tall = pipe([PROMPT], steps=2, height=48, width=24, init_image=Image.new("RGB", (24, 48)), strength=0.5)
    assert tall.images[0].size == (24, 48)
    square = pipe([PROMPT], num_samples=2, steps=2, seed=0).images
    assert np.array_equal(_arr(square), _arr(pipe([PROMPT], num_samples=2, steps=2, seed=0, height=32,
                                                  width=32).images))
    with pytest.raises(UsageError, match="height=32 width=36: .*multiples of 8"):
        pipe([PROMPT], steps=2, height=32, width=36)
    with pytest.raises(UsageError, match="width=0"):
        pipe([PROMPT], steps=2, width=0)
