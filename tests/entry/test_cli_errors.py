"""Every common mistake on the command line is answered in one line that names it, with exit status 2 and no
traceback; a run too short to log its optimized metric still exits 0."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "data")]
from cli_helpers import assert_one_line, run_cli  # noqa: E402
from conftest import random_stage1_checkpoint, train_tiny_text_ldm  # noqa: E402
from imagefiles import cut_shard_set  # noqa: E402

PROMPT = "a red circle in the center on a white background"
# a CUDA device this machine does not have
NO_SUCH_GPU = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def class_ldm(tmp_path_factory):
    """A tiny class-conditional LDM on shapes (24 classes), trained for two steps on a RANDOM-INIT stage 1."""
    root = tmp_path_factory.mktemp("class_ldm")
    train_tiny_text_ldm(root, ["logger=none", "model/conditioning=class", "model.conditioning.num_classes=24"])
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture
def notes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a checkpoint\n")
    return path


@pytest.mark.parametrize("args, needles", [
    (["num_samples=0"], ["num_samples=0", ">= 1"]),
    (["num_samples=-1"], ["num_samples=-1", ">= 1"]),
    (["guidance=-1"], ["guidance=-1", ">= 0"]),
    (["steps=0"], ["steps=0"]),
    (["strength=1.5"], ["strength=1.5", "[0, 1]"]),
    (["sampler=heun3"], ["sampler=heun3", "ddim"]),
    (["init_image=missing.png"], ["init_image=missing.png", "no such file"]),
    (["label=seven"], ["label=seven", "prompt="]),
    (["sampler_options.grid=karas"], ["sampler_options.grid=karas", "timesteps, karras, exponential"]),
    (["sampler_options.spacing=foo"], ["sampler_options.spacing=foo", "leading, trailing, linspace"]),
    # clamping the latent x0 to ±1 turned every sample into noise
    (["sampler=ddim", "sampler_options.clip_x0=true"], ["sampler_options.clip_x0=True", "latents", "leave it unset"]),
    ([f"device={NO_SUCH_GPU}"], [f"device={NO_SUCH_GPU}: not available here", "cpu"]),
])
def test_sample_option_mistakes_fail_before_loading(tmp_path, args, needles):
    # the checkpoint does not even exist: options are checked first
    out = run_cli("sample", ["ckpt=nowhere.ckpt", f"prompt={PROMPT}" if "label" not in args[0] else "seed=0",
                             *args], tmp_path)
    assert_one_line(out, *needles)


def test_sample_checkpoint_mistakes(tmp_path, notes):
    assert_one_line(run_cli("sample", ["ckpt=nowhere.ckpt", "prompt=x"], tmp_path), "nowhere.ckpt", "not found")
    assert_one_line(run_cli("sample", [f"ckpt={notes}", "prompt=x"], tmp_path), "notes.txt", "not a checkpoint")


def test_sample_condition_kind_and_range(tmp_path, tiny_text_ldm, class_ldm):
    line = assert_one_line(run_cli("sample", [f"ckpt={tiny_text_ldm[0]}", "label=7"], tmp_path), "conditioned on text")
    assert "prompt=" in line and "not label=" in line
    line = assert_one_line(run_cli("sample", [f"ckpt={class_ldm}", f"prompt={PROMPT}"], tmp_path),
                           "conditioned on class labels")
    assert "class labels 0-23 (label=)" in line and "not prompt=" in line
    assert_one_line(run_cli("sample", [f"ckpt={class_ldm}", "label=42"], tmp_path),
                    "label=42: this model has 24 classes (0-23)")
    assert_one_line(run_cli("sample", [f"ckpt={class_ldm}", f"steps={10**6}", "label=1"], tmp_path),
                    "steps=1000000", "1000 timesteps")


def test_train_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, notes):
    out = run_cli("train", ["+experiment=quickstart_vae", f"ckpt_path={notes}", "logger=none"], tmp_path)
    assert_one_line(out, "ckpt_path=", "notes.txt", "not a checkpoint")


def test_stage_two_without_a_stage_one_checkpoint(tmp_path):
    out = run_cli("train", ["+experiment=quickstart_ldm", "logger=none", "model.first_stage.ckpt=vae/last.ckpt"],
                  tmp_path)
    line = assert_one_line(out, "model.first_stage.ckpt=vae/last.ckpt", "no such file")
    assert "+experiment=quickstart_vae" in line and "+debug=fdr run writes no checkpoint" in line
    out = run_cli("train", ["model=ldm", "logger=none"], tmp_path)
    assert_one_line(out, "model.first_stage.ckpt is required")


@pytest.mark.parametrize("override, needles", [
    ("model.prediction_type=noise", ["unknown prediction_type 'noise'", "'eps', 'v', 'x0'"]),
    ("model.loss_weighting=min-snr", ["unknown loss weighting 'min-snr'", "'min_snr'"]),
    ("model.unet.in_channels=4", ["model.unet.in_channels=4", "+ 5 of model.concat: 9"]),
])
def test_objective_and_backbone_mistakes_are_named_when_the_model_is_built(tmp_path, override, needles):
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    experiment = "quickstart_inpaint" if "in_channels" in override else "quickstart_ldm"
    out = run_cli("train", [f"+experiment={experiment}", "logger=none", f"model.first_stage.ckpt={vae}", override],
                  tmp_path)
    assert_one_line(out, *needles)


def test_missing_open_clip_weights_are_reported_once_in_one_line(tmp_path):
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    out = run_cli("train", ["+experiment=quickstart_ldm", "logger=none", f"model.first_stage.ckpt={vae}",
                            "model/conditioning=open_clip", "model.unet.context_dim=1024"], tmp_path)
    line = assert_one_line(out, "open_clip-ViT-H-14-laion2b_s32b_b79k")
    assert "SDLIGHT_WEIGHTS" in line and "HF_HUB_OFFLINE=1" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_a_gpu(tmp_path):
    out = run_cli("train", ["+experiment=quickstart_vae", "trainer=gpu", "logger=none"], tmp_path)
    assert_one_line(out, "the trainer settings cannot run here", "gpu")


def test_evaluate_mistakes(tmp_path):
    assert_one_line(run_cli("evaluate", ["ckpt=x.ckpt", "num_samples=0"], tmp_path), "num_samples=0")
    assert_one_line(run_cli("evaluate", ["ckpt=x.ckpt", "metrics=[fid,sharpness]"], tmp_path), "metrics=[fid,sharpness]: unknown sharpness",
                    "clip_score")


def test_runs_shorter_than_their_first_validation_exit_zero(tmp_path):
    """`trainer.max_steps=3` stops before the epoch's validation: val/psnr was never logged. A single run and a
    plain sweep of such runs warn and exit 0."""
    tiny = ["+experiment=quickstart_vae", "data.train_size=64", "data.val_size=8", "data.batch_size=8",
            "trainer.max_steps=3", "logger=none", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]
    out = run_cli("train", tiny, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "optimized_metric=val/psnr was not logged" in out.stdout + out.stderr
    out = run_cli("train", ["-m", *tiny, "model.optimizer.lr=1e-4,2e-4"], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def fake_latent_cache(root: Path) -> Path:
    """A manifest alone: enough for data=latents to be built (and refuse its options) without any shard."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "format": "sdlight.latents", "format_version": 1, "image_size": 32, "latent_shape": [4, 8, 8],
        "dtype": "float16", "splits": {"train": {"shards": ["train-000000.tar"], "samples": 8}}}))
    return root


@pytest.mark.parametrize("data", ["shapes", "digits", "folder", "webdataset", "latents"])
def test_a_batch_size_of_zero_is_refused_by_every_datamodule(tmp_path, data):
    where = {"folder": [f"data.root={tmp_path}"], "webdataset": [f"data.urls={tmp_path}/s-000000.tar"],
             "latents": [f"data.root={fake_latent_cache(tmp_path / 'cache')}"]}.get(data, [])
    out = run_cli("train", ["+experiment=quickstart_vae", f"data={data}", *where, "data.batch_size=0", "logger=none"],
                  tmp_path)
    assert_one_line(out, "data.batch_size=0: must be an integer >= 1")


def test_shards_holding_no_more_samples_than_the_validation_head_stop_at_once(tmp_path):
    """103 samples in 4 shards, the last cut, and data.val_size=256: training would skip every sample it reads,
    forever (it hung, or blamed the cut shard); it stops at setup, in one line."""
    urls = cut_shard_set(tmp_path / "shards")
    out = run_cli("train", ["+experiment=quickstart_vae", "data=webdataset", f"data.urls='{urls}'", "logger=none"],
                  tmp_path, timeout=120)
    line = assert_one_line(out, "data.val_size=256 holds out 90 of the 90 samples in data.urls (4 shards)")
    assert "leaving none for training, fewer than one batch (data.batch_size=8 x 1 rank): lower data.val_size to " \
           "82 or less, or give a separate validation set with data.val_urls" in line


def test_mask_of_another_size_than_the_init_image_fails_before_loading(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")
    out = run_cli("sample", ["ckpt=nowhere.ckpt", f"prompt={PROMPT}", "init_image=init.png", "mask=mask.png"], tmp_path)
    assert_one_line(out, "mask=mask.png is 16x16 but init_image=init.png is 32x32")


def test_lowres_for_a_model_that_is_not_super_resolution(tmp_path, tiny_text_ldm):
    Image.new("RGB", (16, 16)).save(tmp_path / "low.png")
    out = run_cli("sample", [f"ckpt={tiny_text_ldm[0]}", f"prompt={PROMPT}", "lowres=low.png"], tmp_path)
    assert_one_line(out, "lowres=low.png: this checkpoint is not a super-resolution model", "leave it out")


def test_resized_init_image_is_said_in_one_plain_line(tmp_path, tiny_text_ldm):
    Image.new("RGB", (48, 40), "white").save(tmp_path / "init.png")
    out = run_cli("sample", [f"ckpt={tiny_text_ldm[0]}", f"prompt={PROMPT}", "init_image=init.png", "steps=2",
                             "num_samples=1", "progress=false", "device=cpu"], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert len([ln for ln in text.splitlines() if "resized from" in ln]) == 1, text[-3000:]
    assert "init image resized from 48x40 to the model's 32x32" in text
    assert "Warning" not in text and "warn(" not in text  # no Python warning with its source line


@pytest.mark.parametrize("tool, args", [
    ("evaluate", ["ckpt=nowhere.ckpt", "metrics=[adherence]"]),
    ("encode", ["ckpt=nowhere.ckpt", "data=shapes", "out=cache"]),
])
def test_device_this_machine_does_not_have(tmp_path, tool, args):
    # the sample CLI's case is among the option mistakes above
    out = run_cli(tool, [*args, f"device={NO_SUCH_GPU}"], tmp_path)
    assert_one_line(out, f"device={NO_SUCH_GPU}: not available here", "cpu")


def test_evaluate_metric_for_other_data_fails_before_sampling(tmp_path, tiny_text_ldm):
    """adherence reads shapes scenes and digits reads digits, from the val data: the digits model's data (here
    data=digits beside the text model, the same check) and the shapes data are refused before any sampling."""
    out = run_cli("evaluate", [f"ckpt={tiny_text_ldm[0]}", "metrics=[adherence]", "data=digits", "num_samples=2",
                               "steps=2"], tmp_path)
    line = assert_one_line(out, "metrics=[adherence]", "DigitsDataModule", "data=shapes")
    assert "metrics=[digits]" in line and "sampling" not in out.stdout + out.stderr
    out = run_cli("evaluate", [f"ckpt={tiny_text_ldm[0]}", "metrics=[digits]", "num_samples=2", "steps=2"], tmp_path)
    assert_one_line(out, "metrics=[digits]", "ShapesDataModule, 24 classes", "data=digits")
    assert "sampling" not in out.stdout + out.stderr


@pytest.mark.parametrize("override, hidden, package", [
    ("+hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ("+launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
])
def test_sweep_plugin_missing_names_the_extra(tmp_path, override, hidden, package):
    """The plugin is made unimportable for the subprocess alone, whether or not it is installed here."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {hidden!r} or name.startswith({hidden + '.'!r}):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    out = run_cli("train", ["-m", "+experiment=quickstart_vae", override, "logger=none"], tmp_path, PYTHONPATH=path)
    line = assert_one_line(out, override, package)
    assert 'pip install -e ".[sweep]"' in line and "sdlight[sweep]" in line
