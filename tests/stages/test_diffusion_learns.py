"""Slow: the embedded experiments learn what they are asked: the quickstart's text-conditional LDM follows its
prompts, the digits LDM draws the asked digit.

Both stages run through the real entry point, ``train()``, as configured. Independent judges read the samples:
``describe()``, the pixel oracle of the shapes data, and a classifier fitted only on the real digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sdlight.train import train

pytestmark = pytest.mark.slow

# The quickstart as configured: the VAE (3,200 batches of 8) and the LDM on it (1,200 batches of 64, cosine LR).
# 192 val captions, 25 DDIM steps, guidance 3. `make quickstart` (2026-11-30): colour 100 %, background 100 %,
# position 100 %, shape 81 %, all four 81 %. This test's run of the same configs (it logs no images, so its runs
# draw other random numbers): its VAE reached 26.9 dB instead of 30.2 and reconstructs shape 70 % right instead of
# 95 %, and the LDM scored 99.5 / 100 / 100 / 69.8 / 69.3 %. Shape at this budget depends on the random stream by
# ~10 points through the VAE (BENCHMARKS.md, "Quickstart: adherence against training time"), so its threshold sits
# under both runs and far above chance (17 / 33 / 11 / 25 / 0.15 %). ~10 min on 2 idle CPU cores.
THRESHOLDS = {"colour": 0.9, "background": 0.95, "position": 0.9, "shape": 0.6, "all": 0.6}


def test_quickstart_ldm_follows_its_prompts(train_cfg, tmp_path):
    """Samples for val captions show the prompted colour, background, position and shape far more often than
    chance."""
    vae_cfg = train_cfg(["+experiment=quickstart_vae", "logger=csv", "callbacks=none",
                         "model.image_log_every_n_steps=0"])
    vae_metrics, vae = train(vae_cfg)
    vae_ckpt = tmp_path / "vae.ckpt"
    vae["trainer"].save_checkpoint(vae_ckpt)

    cfg = train_cfg(["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae_ckpt}", "logger=csv",
                     "callbacks=adherence", "callbacks.adherence.every_n_steps=null",
                     "callbacks.adherence.num_samples=192", "callbacks.adherence.steps=25",
                     "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "model.sample_every_n_steps=0"])
    metrics, objects = train(cfg)
    scores = {k.removeprefix("val/adherence/"): float(v) for k, v in metrics.items() if "adherence" in k}
    report = (f"quickstart VAE val/psnr {float(vae_metrics['val/psnr']):.1f} dB; LDM after "
              f"{objects['trainer'].global_step} steps: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(scores.items())))
    print(report)
    assert scores["chance/colour"] == pytest.approx(1 / 6) and scores["chance/position"] == pytest.approx(1 / 9)
    for name, threshold in THRESHOLDS.items():
        assert scores[name] >= threshold, f"{name}: {report}"


# digits_ldm as configured (both stages in full), scored by the digit judge (an SVM fitted only on the real scans,
# 99.1 % on 450 held-out ones): 200 samples for the labels of the 180 val items (cycled; DDIM 50, guidance 3) were
# all read as the asked digit (BENCHMARKS.md, "Digits"); the goal is 90 %, for each objective (rectified flow and
# EDM with their config defaults, sampled with Euler where the config says DDIM). One VAE for the three LDMs.
# ~6 min for the VAE and ~12 per LDM on 2 CPU cores.
DIGITS_THRESHOLD = 0.9


@pytest.fixture(scope="module")
def digits_vae(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import compose_train

    root = tmp_path_factory.mktemp("digits")
    _, vae = train(compose_train(["+experiment=digits_vae", "logger=csv", "callbacks=none",
                                  "model.image_log_every_n_steps=0"], root / "vae"))
    vae["trainer"].save_checkpoint(root / "digits_vae.ckpt")
    return root / "digits_vae.ckpt"


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow", "edm"])
def test_digits_ldm_draws_the_asked_digit(train_cfg, digits_vae, objective):
    """Class-conditional samples of the digits experiment are read as their label by a classifier that never saw
    a generated image."""
    cfg = train_cfg(["+experiment=digits_ldm", f"model.first_stage.ckpt={digits_vae}", f"model/objective={objective}",
                     "logger=csv", "callbacks=digits", "callbacks.digits.every_n_steps=null",
                     "callbacks.digits.num_samples=200", "+trainer.limit_val_batches=0",
                     "trainer.num_sanity_val_steps=0", "model.sample_every_n_steps=0"])
    metrics, _ = train(cfg)
    scores = {k.removeprefix("val/digits/"): float(v) for k, v in metrics.items() if k.startswith("val/digits/")}
    report = f"{objective}: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(scores.items()))
    print(report)
    assert scores["judge_accuracy"] >= 0.97, report
    assert scores["accuracy"] >= DIGITS_THRESHOLD, report
