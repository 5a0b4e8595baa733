"""model.init_from with an SD-XL single file (generative-models layout): a fake one written from tiny random parts
loads into a fresh model, which then gives the same contexts, vectors and UNet outputs."""

import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from sdlight.checkpoints import CheckpointError
from sdlight.convert import open_clip_to_hf
from sdlight.pretrained import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_stage1_checkpoint  # noqa: E402

PROMPTS = ["a red circle in the center", "a blue square"]


def sdxl_single_file(net, path: Path, drop: str | None = None) -> Path:
    """``net``'s weights as SD-XL's files hold them: the UNet and VAE in CompVis names, the first text tower as
    Hugging Face's CLIPTextModel (``conditioner.embedders.0.transformer.text_model.*``, position_ids included), the
    second in open_clip names with its logit_scale (``conditioner.embedders.1.model.*``)."""
    towers = net.cond_stage_model.embedders[0].towers
    sd = {f"model.diffusion_model.{k}": v for k, v in net.model.diffusion_model.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in net.first_stage_model.state_dict().items()})
    clip_l = {k.removeprefix("model."): v for k, v in towers[0].state_dict().items()}
    layers = len(towers[0].model.transformer.resblocks)
    prefix = "conditioner.embedders.0.transformer.text_model."
    sd.update({"conditioner.embedders.0." + k: v
               for k, v in open_clip_to_hf(clip_l, layers, "transformer.text_model.").items()})
    sd[prefix + "embeddings.position_ids"] = torch.arange(clip_l["positional_embedding"].shape[0])[None]
    sd.update({f"conditioner.embedders.1.{k}": v for k, v in towers[1].state_dict().items()})
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    if drop is not None:
        sd = {k: v for k, v in sd.items() if drop not in k}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture()
def models(train_cfg, tmp_path):
    cfg = train_cfg(["+experiment=quickstart_sdxl",
                     f"model.first_stage.ckpt={random_stage1_checkpoint(tmp_path / 'vae.ckpt')}"])

    def build(seed):
        torch.manual_seed(seed)
        return instantiate(cfg.model).net.eval()
    return build(1), build(2)


def outputs(net):
    values = net.condition_values({"text": PROMPTS, "original_size": [[48, 32], [32, 32]]})
    cond = net.cond_stage_model(values)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        out = net.model(x, torch.tensor([10, 900]), **cond)
    return cond["context"], cond["y"], out


def test_sdxl_single_file_loads_and_gives_the_same_outputs(models, tmp_path):
    source, fresh = models
    path = sdxl_single_file(source, tmp_path / "sd_xl_tiny.safetensors")
    before = outputs(fresh)
    assert (before[0] - outputs(source)[0]).abs().max() > 1e-2  # two different random models to begin with
    loaded = load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    n_text = sum(1 for _ in source.cond_stage_model.state_dict())
    assert loaded.lines[-1] == f"text encoders: {n_text} tensors (SD-XL layout)" and loaded.scale_factor is None
    for ours, theirs in zip(outputs(fresh), outputs(source)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("drop,needle", [("encoder.layers.1.mlp.fc1.weight", "resblocks.1.mlp.c_fc.weight"),
                                         ("embedders.1.model.text_projection", "towers.1.model.text_projection")])
def test_missing_tower_weights_are_named(models, tmp_path, drop, needle):
    source, fresh = models
    path = sdxl_single_file(source, tmp_path / "broken.safetensors", drop=drop)
    with pytest.raises(CheckpointError, match="SD-XL conditioner does not fit") as err:
        load_pretrained(path, fresh.model.diffusion_model, fresh.first_stage_model, fresh.cond_stage_model)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_init_from_through_the_config(train_cfg, tmp_path, models):
    source, _ = models
    path = sdxl_single_file(source, tmp_path / "sd_xl_tiny.safetensors")
    vae = random_stage1_checkpoint(tmp_path / "vae2.ckpt", seed=3)
    cfg = train_cfg(["+experiment=quickstart_sdxl", f"model.first_stage.ckpt={vae}", f"model.init_from={path}"])
    torch.manual_seed(5)
    stage = instantiate(cfg.model)
    for ours, theirs in zip(outputs(stage.net.eval()), outputs(source)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
