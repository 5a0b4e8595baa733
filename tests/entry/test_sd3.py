"""+experiment=sd3 composes SD3 medium's recipe (MMDiT, rectified flow, SD3's 16-channel VAE and latent space, CLIP
text conditioning whose widths fit the backbone); +experiment=quickstart_sd3 trains on the CPU through the CLI on a
16-channel stage 1, estimating the latent shift, and its checkpoint samples through the CLI."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_helpers import assert_samples_one_image, run_cli  # noqa: E402
from conftest import compose_train, random_stage1_checkpoint  # noqa: E402


def test_sd3_experiment_is_sd3_medium(tmp_path):
    import open_clip

    cfg = compose_train(["+experiment=sd3", "data.root=/images"], tmp_path)
    model = cfg.model
    assert model.unet._target_ == "sdlight.nn.mmdit.MMDiT" and (model.unet.depth, model.unet.hidden) == (24, 1536)
    assert model.objective._target_ == "sdlight.diffusion.RectifiedFlow"
    assert (model.objective.shift, model.objective.timestep_sampling) == (3.0, "logit_normal")
    ae = model.first_stage.autoencoder
    assert (ae.z_channels, ae.embed_dim, list(ae.ch_mult), ae.use_quant_conv, ae.use_post_quant_conv) == (
        16, 16, [1, 2, 4, 4], False, False)
    assert (model.scale_factor, model.shift_factor) == (1.5305, 0.0609)
    assert model.unet.in_channels == ae.embed_dim and not model.conditioners
    # the towers' token widths side by side are the context, their pooled embeddings side by side the vector
    towers = [open_clip.get_model_config(t.arch) for t in model.conditioning.towers.values()]
    assert all(t.pooled for t in model.conditioning.towers.values())
    assert sum(t["text_cfg"]["width"] for t in towers) == model.unet.context_dim == 2048
    assert sum(t["embed_dim"] for t in towers) == model.unet.pooled_dim == 2048


def test_quickstart_sd3_trains_and_samples(tmp_path):
    from sdlight.checkpoints import load_autoencoder

    vae = random_stage1_checkpoint(tmp_path / "vae16.ckpt", latent_channels=16)
    # the architecture of kl_f4_16ch_tiny, which +experiment=quickstart_vae trains into logs/quickstart/vae16
    stage1 = compose_train(["+experiment=quickstart_vae", "model/autoencoder=kl_f4_16ch_tiny"], tmp_path)
    arch = {k: v for k, v in stage1.model.autoencoder.items() if k != "_target_"}
    ae = load_autoencoder(vae)
    assert ae.config == {**ae.config, **arch} and ae.quant_conv is None and ae.latent_channels == 16
    run_dir = tmp_path / "run"
    run = run_cli("train", ["+experiment=quickstart_sd3", f"model.first_stage.ckpt={vae}", "trainer.max_steps=3",
                            "data.train_size=64", "data.val_size=8", "data.batch_size=16", "logger=none",
                            "model.sample_every_n_steps=0", "model.scale_factor_batches=2",
                            f"hydra.run.dir={run_dir}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    assert float(sd["shift_factor"]) != 0.0 and float(sd["scale_factor"]) != 1.0  # both estimated
    assert sd["model.diffusion_model.x_embedder.proj.weight"].shape[1] == 16
    assert_samples_one_image(ckpt, tmp_path)
