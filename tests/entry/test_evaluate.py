"""The evaluate entry point on a tiny text-conditioned checkpoint trained in the test: the CLI end to end with the
offline adherence oracle, FID / KID / CLIP score through the Python entry with tiny random-init networks, rFID of
an autoencoder checkpoint, shared samples, and the errors."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torchvision.transforms import InterpolationMode

from sdlight.callbacks.adherence import scene_from_attributes, score_scene
from sdlight.checkpoints import CheckpointError, load_autoencoder
from sdlight.data.shapes import ShapesDataset, describe
from sdlight.evaluate import METRICS, SampleSet, data_config, evaluate
from sdlight.models import LatentDiffusionModel
from sdlight.weights import WeightsNotFoundError

VAL_SIZE = 8
SHAPES_VAL = {"_target_": "sdlight.data.datamodules.ShapesDataModule", "image_size": 32, "batch_size": 4,
              "train_size": 8, "val_size": VAL_SIZE}


@pytest.fixture(scope="module")
def ckpts(tiny_text_ldm):
    """(ldm checkpoint, vae checkpoint): a random tiny VAE and two training steps of a tiny text LDM."""
    ckpt = torch.load(tiny_text_ldm[0], map_location="cpu", weights_only=True)
    assert ckpt["sdlight"]["config"]["data"]["val_size"] == VAL_SIZE  # what the tests below count on
    return tiny_text_ldm


class RandomInitFeatureExtractorForTest(torch.nn.Module):
    """Tiny stand-in for the Inception: a seeded random conv, pooled to 4 features."""

    num_features = 4

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        return torch.tanh(self.conv(x)).mean((2, 3))


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def random_init_tiny_clip():
    torch.manual_seed(3)
    model = CLIP(TINY_CLIP["embed_dim"], CLIPVisionCfg(**TINY_CLIP["vision_cfg"]), CLIPTextCfg(**TINY_CLIP["text_cfg"]))
    return model.eval()


@pytest.fixture
def recorded_samples(monkeypatch):
    """Every image the model really samples (the shared sample set sits in front of it)."""
    calls = []
    original = LatentDiffusionModel.generate

    def recording(self, *args, **kwargs):
        images = original(self, *args, **kwargs)
        calls.append(images.cpu())
        return images

    monkeypatch.setattr(LatentDiffusionModel, "generate", recording)
    return calls


def val_items(n):
    data = ShapesDataset("val", VAL_SIZE, 32, 1, 0)
    return [data[i] for i in range(n)]


def reference_fid(real, fake):
    real, fake = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def reference_clip_score(model, images, prompts):
    """100 * max(cos, 0) in float64: bicubic antialiased resize to 16 px, OpenAI mean / std, open_clip encoders."""
    x = TF.resize(((images + 1) / 2).clamp(0, 1), [16, 16], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.normalize(x, list(open_clip.constants.OPENAI_DATASET_MEAN), list(open_clip.constants.OPENAI_DATASET_STD))
    with torch.no_grad():
        image = F.normalize(model.encode_image(x).double(), dim=-1)
        text = F.normalize(model.encode_text(open_clip.tokenize(prompts)).double(), dim=-1)
    return float((100 * (image * text).sum(-1).clamp(min=0)).mean())


def reference_adherence(images, items):
    totals = {"colour": 0, "shape": 0, "position": 0, "shapes": 0, "background": 0, "all": 0, "images": 0}
    for image, item in zip(images, items):
        found = score_scene(scene_from_attributes(item["attributes"].tolist()), describe(image))
        totals = {k: totals[k] + found[k] for k in totals}
    out = {f"adherence/{k}": totals[k] / totals["shapes"] for k in ("colour", "shape", "position")}
    out.update({f"adherence/{k}": totals[k] / totals["images"] for k in ("background", "all")})
    return out


def test_cli_scores_adherence_offline_and_writes_metrics_json(ckpts, tmp_path):
    env = dict(os.environ, SDLIGHT_OFFLINE="1", HF_HUB_OFFLINE="1", SDLIGHT_ROOT=str(tmp_path))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdlight.evaluate", f"ckpt={ckpts[0]}", "metrics=[adherence]", "num_samples=6",
            "batch_size=4", "steps=2", "seed=3", "sampler=ddim", "device=cpu", "data.batch_size=2", f"out={out}"]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    scores, settings = report["scores"], report["settings"]
    names = {"colour", "shape", "position", "background", "all"}
    assert {f"adherence/{n}" for n in names} <= set(scores)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["adherence/chance/colour"] == pytest.approx(1 / 6, abs=0.1)  # a rate, not a count
    assert settings["ckpt"] == str(ckpts[0]) and settings["metrics"] == ["adherence"]
    assert (settings["steps"], settings["seed"], settings["num_samples"]) == (2, 3, 6)
    assert settings["sampler"] == "ddim" and settings["guidance"] == 3.0  # the model's configured scale
    assert settings["data"]["val_size"] == VAL_SIZE and settings["data"]["batch_size"] == 2  # stored + override
    assert "adherence/colour" in run.stdout  # the printed table


def test_python_entry_fid_kid_clip_and_adherence_share_one_set_of_samples(ckpts, tmp_path, recorded_samples):
    extractor, clip_model = RandomInitFeatureExtractorForTest(), random_init_tiny_clip()
    report = evaluate(ckpts[0], ["fid", "kid", "clip_score", "adherence"], 8, batch_size=4, steps=2, seed=1,
                      device="cpu", fid={"cache_dir": tmp_path / "fid", "kid_subset_size": 4}, out=tmp_path,
                      feature_extractor=extractor, clip_model=clip_model)
    scores = report["scores"]
    assert len(recorded_samples) == 2  # two batches sampled once, scored by three metrics
    fake = torch.cat(recorded_samples)
    assert fake.shape == (8, 3, 32, 32)
    items = val_items(8)
    real = torch.stack([item["image"] for item in items])

    def features(x):
        with torch.no_grad():
            return RandomInitFeatureExtractorForTest()(((x + 1) / 2).clamp(0, 1))

    assert scores["fid"] == pytest.approx(reference_fid(features(real), features(fake)), rel=1e-4, abs=1e-8)
    assert np.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0
    prompts = [item["text"] for item in items]
    assert scores["clip_score"] == pytest.approx(reference_clip_score(clip_model, fake, prompts), rel=1e-4)
    for name, value in reference_adherence(fake, items).items():
        assert scores[name] == pytest.approx(value)
    assert list((tmp_path / "fid").glob("real-32x32-n8-*.pt"))  # real statistics cached for the next run
    assert (report["settings"]["sampler"], report["settings"]["steps"]) == ("ddim", 2)  # the model's, and ours
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["scores"] == pytest.approx(scores)
    assert saved["settings"]["fid"]["cache_dir"] == str(tmp_path / "fid")


def test_autoencoder_checkpoint_gets_rfid_of_its_reconstructions(ckpts):
    extractor = RandomInitFeatureExtractorForTest()
    report = evaluate(ckpts[1], ["fid"], 6, batch_size=4, device="cpu", data=SHAPES_VAL, fid={"cache_dir": None},
                      feature_extractor=extractor)
    assert set(report["scores"]) == {"rfid"} and report["settings"]["stage"] == "autoencoder"
    real = torch.stack([item["image"] for item in val_items(6)])
    with torch.no_grad():
        reconstructions, _ = load_autoencoder(ckpts[1])(real, sample_posterior=False)
        reference = RandomInitFeatureExtractorForTest()
        expected = reference_fid(reference((real + 1) / 2), reference(((reconstructions + 1) / 2).clamp(0, 1)))
    assert report["scores"]["rfid"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="autoencoder checkpoint"):
        evaluate(ckpts[1], ["clip_score"], 6, device="cpu", data=SHAPES_VAL, clip_model=random_init_tiny_clip())
    with pytest.raises(CheckpointError, match="no data config"):  # this file was not written by sdlight.train
        evaluate(ckpts[1], ["fid"], 6, device="cpu", feature_extractor=extractor)


def test_fid_of_a_run_on_cached_latents_asks_for_the_images(ckpts):
    latents = {"_target_": "sdlight.data.latents.LatentsDataModule", "root": "cache"}
    with pytest.raises(ValueError, match="cached latents .*name the image dataset"):
        evaluate(ckpts[0], ["fid"], 6, device="cpu", data=latents, feature_extractor=RandomInitFeatureExtractorForTest())


def test_unknown_metric_or_sampler_is_a_clear_error(ckpts):
    with pytest.raises(ValueError, match=r"metrics=\[fidd,adherence\]: unknown fidd; choose from fid, kid, clip_score"):
        evaluate(ckpts[0], ["fidd", "adherence"])
    with pytest.raises(ValueError, match="sampler=heun3: unknown; choose one of ddim"):
        evaluate(ckpts[0], ["adherence"], sampler="heun3")
    assert set(METRICS) == {"fid", "kid", "clip_score", "adherence", "digits"}


@pytest.mark.parametrize("metric, missing", [("fid", "pt_inception-2015-12-05"), ("kid", "pt_inception"),
                                             ("clip_score", "CLIP-ViT-B-32")])
def test_missing_metric_weights_fail_fast_before_the_model_loads(ckpts, offline, metric, missing):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=missing):
        evaluate(ckpts[0], [metric], 8, device="cpu")
    assert time.perf_counter() - start < 2.0


def test_data_config_merges_overrides_into_the_stored_config():
    stored = {"_target_": "a.ShapesDataModule", "batch_size": 32, "val_size": 512, "num_workers": 0}
    assert data_config(stored, {"batch_size": 4, "num_workers": None}) == {**stored, "batch_size": 4}
    assert data_config(stored, {"val_size": 64})["val_size"] == 64
    other = {"_target_": "b.DigitsDataModule", "batch_size": None, "num_workers": 0, "val_fraction": 0.1}
    assert data_config(stored, other) == {"_target_": "b.DigitsDataModule", "num_workers": 0, "val_fraction": 0.1}
    with pytest.raises(CheckpointError, match="data=NAME"):
        data_config(None, {"batch_size": 4})


class NoiseTestModule(torch.nn.Module):
    """Test double of generate(): Gaussian images from the generator, counting real calls."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.calls = 0

    def generate(self, conditions=None, num_samples=None, *, generator=None, steps=None, **kwargs):
        self.calls += 1
        return torch.randn(num_samples or len(conditions), 3, 2, 2, generator=generator) * (steps or 1)


def test_shared_samples_equal_fresh_sampling_and_advance_the_generator_alike():
    module = NoiseTestModule()
    fresh = torch.Generator().manual_seed(0)
    first = [module.generate(["a", "b"], generator=fresh, steps=2) for _ in range(2)]
    state_after = fresh.get_state()
    shared = SampleSet(module, steps=2, guidance=None, sampler=None, uses=2)
    for _ in range(2):  # two metrics, each sampling two batches from a freshly seeded generator
        g = torch.Generator().manual_seed(0)
        got = [shared(module, ["a", "b"], 2, g) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(got, first))
        assert torch.equal(g.get_state(), state_after)
    assert module.calls == 4 and shared.hits == 2 and not shared.entries  # freed after their last use
    shared(module, ["a", "c"], 2, torch.Generator().manual_seed(0))  # other conditions: sampled
    shared(module, ["a", "b"], 1, torch.Generator().manual_seed(0))  # another count
    assert module.calls == 6
    shared = SampleSet(module, steps=2, guidance=None, sampler=None, uses=2, max_bytes=0)  # over budget: not kept
    for _ in range(2):
        shared(module, ["a"], 1, torch.Generator().manual_seed(0))
    assert module.calls == 8


def test_config_composes_with_data_overrides_or_another_dataset():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    stored = {**SHAPES_VAL, "num_workers": 0}
    with initialize_config_module(config_module="sdlight.conf", version_base="1.3"):
        keys = compose(config_name="evaluate", overrides=["ckpt=x", "data.batch_size=2", "+data.val_size=4"])
        other = compose(config_name="evaluate", overrides=["ckpt=x", "data=digits", "metrics=[fid,kid]"])
    merged = data_config(stored, OmegaConf.to_container(keys.data))
    assert merged == {**stored, "batch_size": 2, "val_size": 4}
    digits = data_config(stored, OmegaConf.to_container(other.data))
    assert digits["_target_"].endswith("DigitsDataModule") and "val_size" not in digits
    assert list(other.metrics) == ["fid", "kid"] and keys.fid.cache_dir.endswith("fid_stats")
