"""Shared fixtures. Every test runs offline: no weights or hub downloads, W&B writes local files only."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDLIGHT_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from sdlight.hydra_utils import register_resolvers  # noqa: E402

register_resolvers()
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: ``train_cfg(["+experiment=quickstart_vae", ...])`` → composed config writing to tmp_path."""
    return lambda overrides: compose_train(overrides, tmp_path)
