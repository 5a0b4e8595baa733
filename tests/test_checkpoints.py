"""Reading checkpoints safely, extracting autoencoder weights from every released layout, and clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdlight.checkpoints import (CheckpointError, autoencoder_state_dict, load_autoencoder, load_autoencoder_weights,
                                 load_first_stage, read_checkpoint, state_dict_of, strip_prefix)
from sdlight.nn.autoencoder import AutoencoderKL

CONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4, resolution=8)


def vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**CONFIG, **overrides})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class NotATensor:
    pass


def test_read_checkpoint_formats_and_errors(tmp_path):
    t = {"a": torch.arange(3.0)}
    save_file(t, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["state_dict"]["a"], t["a"])
    torch.save({"state_dict": t, "global_step": 5}, tmp_path / "w.ckpt")
    assert read_checkpoint(tmp_path / "w.ckpt")["global_step"] == 5

    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint: neither a torch.save file nor .safetensors"):
        read_checkpoint(tmp_path / "broken.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(64)}}, tmp_path / "whole.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:200])  # a zip cut short
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        read_checkpoint(tmp_path / "truncated.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dict"):
        read_checkpoint(tmp_path / "list.pt")
    # arbitrary pickled objects are never executed or rebuilt (weights_only=True)
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": t, "obj": NotATensor()}, f)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        read_checkpoint(tmp_path / "evil.ckpt")


def test_state_dict_helpers():
    x = torch.zeros(1)
    assert state_dict_of({"state_dict": {"a": x, "b": 3}}) == {"a": x}
    assert state_dict_of({"a": x, "epoch": 1}) == {"a": x}  # bare state dicts
    assert strip_prefix({"p.a": x, "q.b": x}, "p.") == {"a": x}
    assert strip_prefix({"a": x}, "p.") == {"a": x}
    full = {"first_stage_model.encoder.w": x, "first_stage_model.loss.logvar": x, "model.diffusion_model.w": x,
            "cond_stage_model.w": x}
    assert autoencoder_state_dict(full) == {"encoder.w": x}
    ours = {"encoder.w": x, "decoder.w": x, "quant_conv.w": x, "post_quant_conv.w": x, "loss.logvar": x,
            "loss.discriminator.main.0.weight": x}
    assert set(autoencoder_state_dict(ours)) == {"encoder.w", "decoder.w", "quant_conv.w", "post_quant_conv.w"}


@pytest.mark.parametrize("layout", ["full_sd_ckpt", "vae_ckpt_with_loss", "bare_safetensors", "prefixed_safetensors"])
def test_load_autoencoder_weights_from_released_layouts(tmp_path, layout):
    source = vae(seed=1)
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout == "full_sd_ckpt":
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in sd.items()},
                                   "model.diffusion_model.out.0.weight": torch.ones(2)}}, path)
    elif layout == "vae_ckpt_with_loss":
        path = tmp_path / "vae.ckpt"
        torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(()),
                                   "loss.perceptual_loss.lin0.model.1.weight": torch.ones(1, 64, 1, 1)}}, path)
    elif layout == "bare_safetensors":
        path = tmp_path / "vae.safetensors"
        save_file({**sd, "loss.logvar": torch.zeros(())}, str(path))
    else:
        path = tmp_path / "sd.safetensors"
        save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, str(path))
    target = vae(seed=2)
    load_autoencoder_weights(target, path)
    assert_same_weights(target, source)


def test_load_autoencoder_weights_errors(tmp_path):
    target = vae()
    save_file({"loss.logvar": torch.zeros(())}, str(tmp_path / "loss_only.safetensors"))
    with pytest.raises(CheckpointError, match="has no autoencoder weights"):
        load_autoencoder_weights(target, tmp_path / "loss_only.safetensors")
    save_file({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(CheckpointError, match="diffusers layout"):
        load_autoencoder_weights(target, tmp_path / "diffusers.safetensors")

    wider = vae(z_channels=8)
    torch.save({"state_dict": wider.state_dict()}, tmp_path / "wider.ckpt")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_autoencoder_weights(target, tmp_path / "wider.ckpt")
    msg = str(err.value)
    assert "missing 0 []" in msg and "unexpected 0 []" in msg
    assert "encoder.conv_out.weight: (16, 64, 3, 3) vs (8, 64, 3, 3)" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded

    partial = {k: v for k, v in vae().state_dict().items() if not k.startswith("decoder.mid.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing \d+ \['decoder.mid"):
        load_autoencoder_weights(target, tmp_path / "partial.pt")


def test_load_autoencoder_and_first_stage(tmp_path):
    source = vae(seed=3, ch_mult=[1, 1])
    path = tmp_path / "ours.ckpt"
    torch.save({"state_dict": {**source.state_dict(), "loss.logvar": torch.zeros(())},
                "hyper_parameters": {"autoencoder_config": dict(source.config)}}, path)
    rebuilt = load_autoencoder(path)
    assert rebuilt.config == source.config
    assert_same_weights(rebuilt, source)
    assert_same_weights(load_first_stage(path), source)

    released = tmp_path / "released.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(released))
    with pytest.raises(CheckpointError, match="not an sdlight autoencoder checkpoint"):
        load_autoencoder(released)
    into = vae(seed=4, ch_mult=[1, 1])
    assert load_first_stage(released, into) is into
    assert_same_weights(into, source)
