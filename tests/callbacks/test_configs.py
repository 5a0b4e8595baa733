"""The metric callback configs: the documented command-line syntax adds them to the default set, and they
instantiate (without touching any weights) and run through the real train() entry point."""

import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from sdlight.callbacks.adherence import PromptAdherenceCallback
from sdlight.callbacks.clip_score import CLIPScoreCallback
from sdlight.callbacks.fid import FIDCallback
from sdlight.hydra_utils import instantiate_callbacks
from sdlight.weights import WeightsNotFoundError

DEFAULT = {"model_checkpoint", "model_summary", "rich_progress_bar", "lr_monitor", "preemption", "progress_log",
           "rollback"}
TINY_VAE = ["+experiment=quickstart_vae", "data.train_size=16", "data.val_size=8", "data.batch_size=4",
            "trainer.max_epochs=1", "logger=csv", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]


@pytest.mark.parametrize("option,name,cls", [("fid", "fid", FIDCallback), ("kid", "fid", FIDCallback),
                                             ("clip_score", "clip_score", CLIPScoreCallback),
                                             ("adherence", "adherence", PromptAdherenceCallback)])
def test_added_to_the_default_callbacks(train_cfg, tmp_path, option, name, cls):
    cfg = train_cfg([f"callbacks=[default,{option}]"])
    assert set(cfg.callbacks) == DEFAULT | {name}
    callbacks = instantiate_callbacks(cfg.callbacks)
    (callback,) = [c for c in callbacks if isinstance(c, cls)]
    if cls is FIDCallback:
        assert callback.kid_enabled == (option == "kid") and callback.extractor is None  # weights not yet read
        assert callback.cache_dir == Path(cfg.paths.data_dir) / "fid_stats"
        assert callback.num_samples == 10000 and callback.every_n_steps == 5000 and callback.steps == 50
    if cls is PromptAdherenceCallback:
        assert callback.num_samples == 256 and callback.every_n_steps == 500


def test_combinations_and_overrides(train_cfg):
    cfg = train_cfg(["callbacks=[default,fid,kid,adherence]", "callbacks.fid.num_samples=2000"])
    assert set(cfg.callbacks) == DEFAULT | {"fid", "adherence"}
    assert cfg.callbacks.fid.kid is True and cfg.callbacks.fid.num_samples == 2000
    assert cfg.callbacks.fid._target_ == "sdlight.callbacks.fid.FIDCallback"


def test_appending_with_plus_is_refused_by_hydra(train_cfg):
    with pytest.raises(ConfigCompositionException, match="Multiple values for callbacks"):
        train_cfg(["+callbacks=fid"])


def test_train_without_inception_weights_stops_at_setup(train_cfg, tmp_path, monkeypatch):
    from sdlight.train import train

    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "no-weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = train_cfg(TINY_VAE + ["callbacks=[default,fid]"])
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="pt_inception"):
        train(cfg)
    assert time.perf_counter() - start < 30  # no download attempt, no training
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_train_logs_rfid_for_the_autoencoder_with_an_inception_file(train_cfg, tmp_path):
    """The whole path through the CLI config: real AutoencoderModule, real Inception network (random weights)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import NoTrainInceptionV3

    from sdlight.train import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    cfg = train_cfg(TINY_VAE + ["callbacks=[default,kid]", f"callbacks.fid.weights_path={weights}",
                                "callbacks.fid.num_samples=4", "callbacks.fid.batch_size=4",
                                f"callbacks.fid.cache_dir={tmp_path / 'stats'}", "+trainer.limit_train_batches=2",
                                "+trainer.limit_val_batches=1", "optimized_metric=val/rfid"])
    metrics, objects = train(cfg)
    assert torch.isfinite(metrics["val/rfid"]) and float(metrics["val/rfid"]) >= 0
    assert {"val/kid_mean", "val/kid_std"} <= set(metrics)
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 1
    assert not any("inception" in k or k.startswith("net.") for k in objects["model"].state_dict())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("Mixed_7c" in k for k in ckpt["state_dict"])
