"""Every config composes and instantiates; bad names fail with Hydra's own clear errors."""

from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

import sdlight

CONF = Path(sdlight.__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CPU_EXPERIMENTS = [e for e in EXPERIMENTS if "quickstart" in e or "digits" in e]


def test_conf_is_the_package_sdlight_conf():
    import importlib.resources

    assert importlib.resources.files("sdlight.conf").joinpath("train.yaml").is_file()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(train_cfg, experiment):
    cfg = train_cfg([f"+experiment={experiment}"])
    assert cfg.task_name and cfg.model._target_.startswith("sdlight.")
    assert "_target_" in cfg.data and "_target_" in cfg.trainer


@pytest.mark.parametrize("experiment", CPU_EXPERIMENTS)
def test_cpu_experiments_instantiate(train_cfg, experiment, tmp_path):
    overrides = [f"+experiment={experiment}"]
    if any(word in experiment for word in ("ldm", "inpaint", "superres", "sdxl", "sd3")):
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from conftest import random_stage1_checkpoint

        channels = 16 if "sd3" in experiment else 4  # SD3's design: a 16-channel VAE
        overrides.append(f"model.first_stage.ckpt={random_stage1_checkpoint(tmp_path / 'vae.ckpt', 0, channels)}")
    cfg = train_cfg(overrides)
    hydra.utils.instantiate(cfg.data)
    hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("group,option", [("trainer", t) for t in ("cpu", "gpu", "ddp", "ddp_sim", "fsdp", "fsdp_sim")]
                         + [("logger", lg) for lg in ("wandb", "csv", "tensorboard", "many", "none")]
                         + [("data", d) for d in ("shapes", "digits", "folder", "webdataset")] + [("callbacks", "none")])
def test_groups_compose(train_cfg, group, option):
    cfg = train_cfg([f"{group}={option}"])
    assert group in cfg


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit"])
def test_debug_modes_compose(train_cfg, debug):
    cfg = train_cfg(["+experiment=quickstart_vae", f"+debug={debug}"])
    assert cfg.task_name == "debug" and cfg.trainer.accelerator == "cpu"


def test_wrong_group_option_is_a_clear_hydra_error(train_cfg):
    with pytest.raises(ConfigCompositionException, match="Could not find 'trainer/tpu'"):
        train_cfg(["trainer=tpu"])
    with pytest.raises(ConfigCompositionException, match="experiment/nope"):
        train_cfg(["+experiment=nope"])


def test_wrong_key_is_a_clear_error(train_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ConfigAttributeError), match="batch_sise"):
        train_cfg(["data.batch_sise=3"])


@pytest.mark.parametrize("given, expected", [
    ("model/backbone=mmdit_tiny", "model/unet=mmdit_tiny"),
    ("+model/backbone=dit_tiny", "+model/unet=dit_tiny"),
    ("~model/backbone", "~model/unet"),
    ("model/backbone=tiny,mmdit_tiny,dit_tiny", "model/unet=tiny,mmdit_tiny,dit_tiny"),  # a sweep
    ("model.backbone=3", "model.backbone=3"),  # a key, not the group: left as it is
    ("model/unet=sdxl", "model/unet=sdxl"),
])
def test_backbone_is_the_unet_groups_other_name(given, expected):
    from sdlight.hydra_utils import spelled_out

    assert spelled_out(["-m", given]) == ["-m", expected]


def test_the_cli_takes_model_backbone(tmp_path):
    """Through the entry point: the alias composes as the group, after the experiment's own choice too."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli_helpers import run_cli

    out = run_cli("train", ["model/backbone=mmdit_tiny", "+experiment=quickstart_ldm", "--cfg", "job",
                            "--package", "model.unet"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: sdlight.nn.mmdit.MMDiT" in out.stdout
