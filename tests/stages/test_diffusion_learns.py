"""Slow: the quickstart's text-conditional latent diffusion model learns to follow its prompts.

Both stages run through the real entry point, ``train()``: the quickstart VAE as configured, then the quickstart
LDM on its checkpoint, shortened. The prompt-adherence callback generates samples for val captions at the end of
training, and ``describe()``, the pixel oracle of the shapes data, reads back what they show.
"""

from __future__ import annotations

import pytest

from sdlight.train import train

pytestmark = pytest.mark.slow

# Measured on 2 CPU cores (the test prints its scores with `pytest -s`): VAE val PSNR 26.7 dB; after 600 LDM
# batches, 192 samples show the prompted colour 67.7 % of the time (chance 16.7 %) and the prompted background
# 96.4 % (chance 33.3 %); shape 31.8 % (25 %) and position 12.0 % (11.1 %) are not learned this early. A 96-sample
# probe of the same run length gave 58 % / 94 %, so the thresholds leave ~20 points for seeds and platforms and
# still sit 2.4x (colour) and 2.1x (background) above chance. 21 min wall on a shared 2-core machine.
COLOUR_THRESHOLD = 0.4
BACKGROUND_THRESHOLD = 0.7
LDM_STEPS = 600


def test_quickstart_ldm_follows_colour_prompts(train_cfg, tmp_path):
    """Samples for val captions show the prompted colour far more often than chance (1/6: six colours, uniform
    in the data), and the prompted background far more often than its chance (1/3)."""
    vae_cfg = train_cfg(["+experiment=quickstart_vae", "logger=csv", "callbacks=none",
                         "model.image_log_every_n_steps=0"])
    vae_metrics, vae = train(vae_cfg)
    vae_ckpt = tmp_path / "vae.ckpt"
    vae["trainer"].save_checkpoint(vae_ckpt)

    batch = 64
    cfg = train_cfg(["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae_ckpt}", "logger=csv",
                     "callbacks=adherence", "callbacks.adherence.every_n_steps=null",
                     "callbacks.adherence.num_samples=192", "callbacks.adherence.steps=25",
                     f"data.batch_size={batch}", f"data.train_size={LDM_STEPS * batch}", "trainer.max_epochs=1",
                     "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "model.sample_every_n_steps=0"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == LDM_STEPS
    scores = {k.removeprefix("val/adherence/"): float(v) for k, v in metrics.items() if "adherence" in k}
    report = (f"quickstart VAE val/psnr {float(vae_metrics['val/psnr']):.1f} dB; LDM after {LDM_STEPS} steps: "
              + ", ".join(f"{k} {v:.1%}" for k, v in sorted(scores.items())))
    print(report)
    assert scores["chance/colour"] == pytest.approx(1 / 6) and scores["chance/background"] == pytest.approx(1 / 3)
    assert scores["colour"] >= COLOUR_THRESHOLD, report
    assert scores["background"] >= BACKGROUND_THRESHOLD, report
