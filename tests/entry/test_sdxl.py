"""+experiment=sdxl composes SD-XL base's recipe; +experiment=quickstart_sdxl trains on the CPU and its checkpoint
samples through the CLI from a prompt alone (the sizes fall back on their defaults) or with sizes given."""

import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_helpers import assert_samples_one_image, run_cli  # noqa: E402
from conftest import train_tiny_text_ldm  # noqa: E402


def test_sdxl_experiment_is_sdxl_base(train_cfg):
    cfg = train_cfg(["+experiment=sdxl", "data.root=/images"])
    unet, cond = cfg.model.unet, cfg.model.conditioning
    assert (unet.model_channels, list(unet.channel_mult), list(unet.transformer_depth)) == (320, [1, 2, 4], [1, 2, 10])
    assert (unet.context_dim, unet.num_classes, unet.adm_in_channels) == (2048, "sequential", 2816)
    assert cond._target_ == "sdlight.conditioning.SDXLTextEncoder"
    assert [(t.arch, t.pretrained, t.layer) for t in cond.towers.values()] == [
        ("ViT-L-14-quickgelu", "openai", "penultimate"), ("ViT-bigG-14", "laion2b_s39b_b160k", "penultimate")]
    assert list(cfg.model.conditioners) == ["original_size", "crop_coords", "target_size"]
    assert (cfg.data.image_size, cfg.data.buckets) == (1024, "sdxl")
    assert (cfg.model.schedule.name, cfg.model.schedule.beta_start, cfg.model.schedule.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    assert (cfg.model.prediction_type, cfg.model.optimizer.lr, cfg.model.scale_factor) == ("eps", 1e-4, 0.13025)
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.ema_decay == 0.9999
    assert cfg.trainer.precision == "bf16-mixed"
    shards = train_cfg(["+experiment=sdxl", "data=webdataset", "data.urls=/shards/0.tar"])
    assert shards.data._target_ == "sdlight.data.shards.WebDataModule" and shards.data.buckets == "sdxl"


def test_quickstart_sdxl_trains_and_samples(tmp_path):
    _, objects = train_tiny_text_ldm(tmp_path, ["logger=none"], experiment="quickstart_sdxl")
    net = objects["model"].net
    assert [type(e).__name__ for e in net.cond_stage_model.embedders] == ["SDXLTextEncoder"] + ["SizeEmbedder"] * 3
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert_samples_one_image(ckpt, tmp_path)
    sized = tmp_path / "sized"
    run = run_cli("sample", [f"ckpt={ckpt}", "prompt=a red circle", "+conditions.original_size=[64,48]",
                             "num_samples=1", "steps=2", f"out={sized}", "device=cpu"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(Image.open(sized / "00000.png").text["sdlight"])["condition"] == {
        "text": "a red circle", "original_size": [64, 48]}
