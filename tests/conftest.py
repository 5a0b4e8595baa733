"""Shared fixtures. Every test runs offline: no weights or hub downloads, W&B writes local files only."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDLIGHT_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist workers share the CPUs: each worker, and the CLI subprocesses it starts, gets CPUs / workers
# threads instead of one per CPU each, which would spin against each other (see sdlight/threads.py)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from sdlight.hydra_utils import register_resolvers  # noqa: E402
from sdlight.threads import available_cpus  # noqa: E402

register_resolvers()
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), available_cpus() // _workers)))


def compose_train(overrides: list[str], output_dir) -> DictConfig:
    """The train config as `python -m sdlight.train <overrides>` would compose it, writing under output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdlight.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.work_dir = str(output_dir)
        cfg.extras.print_config = False
        # the hydra node is only needed to resolve paths; train() reads none of it
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def random_stage1_checkpoint(path, seed: int = 0, latent_channels: int = 4):
    """Writes a RANDOM-INIT tiny f=4 autoencoder as a stage-1 checkpoint (32 px -> 8x8x4 latents; with
    ``latent_channels=16`` kl_f4_16ch_tiny's 8x8x16, without quant convs, as SD3's VAE); returns path.

    Stage-2 tests need a first stage to load; whether it reconstructs well does not matter to them.
    """
    from sdlight.nn.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    sd3 = {} if latent_channels == 4 else dict(use_quant_conv=False, use_post_quant_conv=False)
    ae = AutoencoderKL(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=latent_channels,
                       embed_dim=latent_channels, resolution=32, **sd3)
    torch.save({"state_dict": ae.state_dict(), "hyper_parameters": {"autoencoder_config": ae.config}}, path)
    return path


# The quickstart's text LDMs made tiny: two training steps of batch 8 (val: 8 items)
TINY_TEXT_LDM = ["data.train_size=16", "data.val_size=8", "data.batch_size=8", "trainer.max_epochs=1",
                 "model.sample_every_n_steps=0", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]


def train_tiny_text_ldm(root, overrides=(), experiment: str = "quickstart_ldm"):
    """Trains ``experiment`` with TINY_TEXT_LDM (then ``overrides``) on a RANDOM-INIT stage 1 written to
    root/vae.ckpt, writing the run under root (its checkpoint: root/checkpoints/last.ckpt); returns
    (vae checkpoint, train()'s objects)."""
    from sdlight.train import train

    vae = random_stage1_checkpoint(root / "vae.ckpt")
    overrides = [f"+experiment={experiment}", *TINY_TEXT_LDM, f"model.first_stage.ckpt={vae}", *overrides]
    _, objects = train(compose_train(overrides, root))
    return vae, objects


@pytest.fixture(scope="session")
def tiny_text_ldm(tmp_path_factory):
    """(ldm checkpoint, vae checkpoint) of one TINY_TEXT_LDM run without a logger, shared by the tests that only
    read them."""
    root = tmp_path_factory.mktemp("tiny_text_ldm")
    vae, _ = train_tiny_text_ldm(root, ["logger=none"])
    return root / "checkpoints" / "last.ckpt", vae


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and empty caches everywhere a pretrained file could be found (returns tmp_path)."""
    import huggingface_hub.constants

    monkeypatch.setenv("SDLIGHT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip
    return tmp_path


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: ``train_cfg(["+experiment=quickstart_vae", ...])`` → composed config writing to tmp_path."""
    return lambda overrides: compose_train(overrides, tmp_path)
