"""Every objective through the whole tool: rectified-flow and EDM models trained by train() (the stock DDIM
sampler of their config becoming Euler), sampled through the Pipeline with each sampler that runs on it, with guidance,
img2img, inpainting and attention maps, refused by DDPM's and DDIM's samplers in one line, exported with its
diffusers scheduler; and a sweep over the objectives from the command line."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.diffusion import DDPM, EDM, RectifiedFlow
from sdlight.pipeline import Pipeline
from sdlight.pixels import to_pil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import assert_one_line, run_cli  # noqa: E402
from conftest import TINY_TEXT_LDM, random_stage1_checkpoint, train_tiny_text_ldm  # noqa: E402

PROMPT = "a red circle in the center on a white background"
OBJECTIVES = {"rectified_flow": ["model/objective=rectified_flow", "model.objective.shift=2.0"],
              "edm": ["model/objective=edm"]}


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def flow_ckpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    train_tiny_text_ldm(root, ["logger=none", *OBJECTIVES[request.param], "model.sample_every_n_steps=1",
                               "model.sampler.steps=2"])
    assert list((root / "images").glob("samples_*.png")), "sample grids were drawn (with Euler)"
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def pipe(flow_ckpt):
    return Pipeline.from_checkpoint(flow_ckpt, device="cpu")


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_the_checkpoint_rebuilds_its_objective(pipe):
    objective = pipe.model.objective
    if isinstance(objective, RectifiedFlow):
        assert objective.shift == 2.0 and objective.timestep_sampling == "logit_normal"
    else:
        assert isinstance(objective, EDM) and objective.sigma_data == 1.0


def test_loading_does_not_repeat_the_training_runs_warning(flow_ckpt, caplog):
    """The experiment's DDPM keys (quickstart_ldm's loss_weighting: min_snr) were named once, when the run was
    built; the checkpoint, whose objective never used them, loads without that warning."""
    from sdlight.checkpoints import latent_diffusion_config, load_latent_diffusion, read_checkpoint

    assert latent_diffusion_config(read_checkpoint(flow_ckpt), flow_ckpt)["loss_weighting"] == "min_snr"
    with caplog.at_level(logging.WARNING, logger="sdlight"):
        model, _ = load_latent_diffusion(flow_ckpt)
    assert not isinstance(model.objective, DDPM)
    assert "setting(s) of the DDPM objective" not in caplog.text


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "unipc", "euler_karras"])
def test_each_sampler_of_the_flow_samples_with_guidance(pipe, sampler):
    options = {"grid": "karras"} if sampler == "euler_karras" else {}
    out = pipe([PROMPT], num_samples=2, steps=3, seed=0, sampler=sampler.split("_karras")[0],
               sampler_options=options, guidance_scale=3.0, guidance_rescale=0.7)
    assert len(out.images) == 2 and np.isfinite(_arr(out.images)).all()
    again = pipe([PROMPT], num_samples=2, steps=3, seed=0, sampler=sampler.split("_karras")[0],
                 sampler_options=options, guidance_scale=3.0, guidance_rescale=0.7)
    assert np.array_equal(_arr(out.images), _arr(again.images))


def test_img2img_starts_at_the_flow_level_of_its_strength(pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = pipe([PROMPT], steps=10, init_image=init, strength=0.0, sampler="euler").images[0]
    x = torch.from_numpy(np.asarray(init, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    m = pipe.model
    with torch.no_grad():
        rec = to_pil(m.decode_latents(m.encode_images(x, sample=False)))[0]
    assert np.abs(_arr([out]) - _arr([rec])).max() <= 1
    moved = pipe([PROMPT], steps=10, init_image=init, strength=0.8, sampler="euler").images[0]
    assert np.abs(_arr([moved]) - _arr([rec])).mean() > 1


def test_inpainting_keeps_the_known_region_and_attention_maps_come_out(pipe):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    out = pipe([PROMPT], steps=4, seed=0, init_image=init, mask=mask, sampler="heun", save_attention=True)
    known = np.asarray(mask) == 0
    assert np.array_equal(_arr(out.images)[0][known], np.asarray(init, dtype=np.int16)[known])
    tokens, maps = out.attention[0]
    assert any("red" in token for token in tokens) and maps.shape == (len(tokens), 32, 32)


def test_ddim_is_refused_in_one_line_by_the_sample_cli(flow_ckpt, tmp_path):
    out = run_cli("sample", [f"ckpt={flow_ckpt}", f"prompt={PROMPT}", "steps=2", "sampler=ddim",
                             f"hydra.run.dir={tmp_path / 's'}"], tmp_path)
    assert_one_line(out, "sampler=ddim needs the DDPM objective", "this model's objective is", "euler")
    out = run_cli("sample", [f"ckpt={flow_ckpt}", f"prompt={PROMPT}", "steps=2", "sampler=heun",
                             f"hydra.run.dir={tmp_path / 'h'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "h" / "grid.png").is_file()


def test_export_writes_the_objectives_diffusers_scheduler(flow_ckpt, tmp_path):
    import diffusers

    out = run_cli("export", [f"ckpt={flow_ckpt}", "format=diffusers", f"out={tmp_path / 'x'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "x" / "scheduler" / "scheduler_config.json").read_text())
    objective = Pipeline.from_checkpoint(flow_ckpt, device="cpu").model.objective
    expected = "FlowMatchEulerDiscreteScheduler" if isinstance(objective, RectifiedFlow) else "EDMEulerScheduler"
    assert config["_class_name"] == expected
    scheduler = getattr(diffusers, expected).from_pretrained(tmp_path / "x", subfolder="scheduler")
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == pytest.approx(objective.grid(5).times, abs=1e-3)


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_init_from_an_export_restores_its_objective(flow_ckpt, tmp_path, fmt, caplog):
    """The export records the objective's settings (metadata of the weights file); a run of the stock (DDPM) config
    initialised from it trains with that objective, says so, and its checkpoint rebuilds it; with
    model.init_from_objective=false the config's objective stays."""
    out = tmp_path / ("x.safetensors" if fmt == "single_file" else "x")
    done = run_cli("export", [f"ckpt={flow_ckpt}", f"format={fmt}", f"out={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    source = Pipeline.from_checkpoint(flow_ckpt, device="cpu").model.objective
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with caplog.at_level("INFO", logger="sdlight"):
        _, objects = train_tiny_text_ldm(tmp_path / "a", ["logger=none", f"model.init_from={out}", "trainer.max_steps=1"])
    assert objects["model"].net.objective.settings() == source.settings()
    assert f"was trained with the {source.name} objective" in caplog.text
    rebuilt = Pipeline.from_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt", device="cpu").model.objective
    assert rebuilt.settings() == source.settings()
    _, objects = train_tiny_text_ldm(tmp_path / "b", ["logger=none", f"model.init_from={out}", "trainer.max_steps=1",
                                                      "model.init_from_objective=false"])
    assert objects["model"].net.objective.name == "ddpm"


def test_a_sweep_over_the_objectives_from_the_command_line(tmp_path):
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    out = run_cli("train", ["-m", "+experiment=quickstart_ldm", *TINY_TEXT_LDM, f"model.first_stage.ckpt={vae}",
                            "logger=none", "trainer.max_steps=2", "model/objective=ddpm,rectified_flow,edm"],
                  tmp_path, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    sweep = next((tmp_path / "logs" / "quickstart_ldm" / "multiruns").iterdir())
    for job, target in (("0", "DDPM"), ("1", "RectifiedFlow"), ("2", "EDM")):
        pipe = Pipeline.from_checkpoint(sweep / job / "checkpoints" / "last.ckpt", device="cpu")
        assert type(pipe.model.objective).__name__ == target
        assert len(pipe([PROMPT], steps=2, sampler="heun").images) == 1
