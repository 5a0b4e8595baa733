"""The stages' speed switches (compile, channels_last, VAE gradient checkpointing) train to the same weights.

Training uses SGD: Adam's first step moves every weight by ~lr whatever the gradient's size, so rounding noise in
a near-zero gradient would move a weight as much as a real difference would.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from .conftest import shapes_loader, tiny_ldm, tiny_trainer
from .test_autoencoder import loader, make_module


def trained_ldm(tmp_path, **switches) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = tiny_ldm(optimizer=partial(torch.optim.SGD, lr=0.5), **switches)
    tiny_trainer(tmp_path, max_steps=2).fit(module, shapes_loader(8, 4))
    return {k: v.detach().clone() for k, v in module.net.model.state_dict().items()}


def vae_gradients(**switches) -> dict[str, torch.Tensor]:
    """Reconstruction, KL and the gradients of the stage's generator loss for one batch, switches applied by the
    stage (compile at setup)."""
    module = make_module(**switches)
    module.setup("fit")
    x = next(iter(loader(4, 4)))["image"]
    rec, posterior = module.autoencoder(x, sample_posterior=False)
    loss, log = module.loss(x, rec, posterior, part="generator", global_step=0,
                            last_layer=module.autoencoder.get_last_layer(), split="train")
    assert log["train/d_weight"] > 0  # the adaptive weight ran: two more backward passes through the decoder
    loss.backward()
    grads = {f"grad.{k}": p.grad.clone() for k, p in module.autoencoder.named_parameters()}
    return {"rec": rec.detach(), "kl": posterior.kl().detach(), **grads}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding in another summation order: each tensor within 1e-4 of its largest value,
    plus 1e-5 of the largest value of all (a gradient that is zero in exact arithmetic, e.g. of a bias followed by
    a GroupNorm, is pure rounding noise of that scale)."""
    assert a.keys() == b.keys()  # the switches leave parameter names, hence checkpoints, as they were
    scale = max(v.abs().max().item() for v in a.values())
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= 1e-4 * a[k].abs().max().item() + 1e-5 * scale, (k, diff)


def test_switches_change_the_training_at_all(tmp_path):
    # the comparisons below could not fail if training left the weights alone
    module = tiny_ldm()
    before = {k: v.clone() for k, v in module.net.model.state_dict().items()}
    after = trained_ldm(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ldm_channels_last_trains_to_the_same_weights(tmp_path):
    module = tiny_ldm(channels_last=True)
    conv = module.net.model.diffusion_model.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_close(trained_ldm(tmp_path), trained_ldm(tmp_path, channels_last=True))


def test_vae_gradient_checkpointing_and_channels_last_give_the_same_gradients():
    module = make_module(gradient_checkpointing=True)
    assert module.autoencoder.encoder.gradient_checkpointing and module.autoencoder.decoder.gradient_checkpointing
    reference = vae_gradients(channels_last=False)
    assert_close(reference, vae_gradients(gradient_checkpointing=True, channels_last=False))
    assert_close(reference, vae_gradients(channels_last=True))


@pytest.mark.parametrize("setting, nhwc", [(None, True), (False, False), (True, True)])
def test_vae_channels_last_by_default_when_training_on_a_cpu(tmp_path, setting, nhwc):
    module = make_module(channels_last=setting)
    conv = module.autoencoder.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == bool(setting)  # not before setup
    tiny_trainer(tmp_path, max_steps=1).fit(module, loader(4, 4))
    assert conv.is_contiguous(memory_format=torch.channels_last) == nhwc and not (nhwc and conv.is_contiguous())


def test_compile_is_applied_at_setup_and_keeps_the_checkpoint_keys(tmp_path):
    module = tiny_ldm(compile=True)
    keys = set(module.state_dict())
    unet = module.net.model.diffusion_model
    assert getattr(unet, "_compiled_call_impl", None) is None  # not before setup: ddp_spawn pickles the module
    module.setup("fit")
    assert unet._compiled_call_impl is not None
    assert module.net.first_stage_model.encoder._compiled_call_impl is not None
    assert module.net.first_stage_model.decoder._compiled_call_impl is not None
    assert set(module.state_dict()) == keys
    vae = make_module(compile=True)
    vae.setup("fit")
    assert vae.autoencoder.encoder._compiled_call_impl is not None
    assert vae.autoencoder.decoder._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_ldm_trains_to_the_same_weights(tmp_path):
    # through the Trainer: the first batch also counts FLOPs (FlopCounterMode) around the compiled UNet
    assert_close(trained_ldm(tmp_path), trained_ldm(tmp_path, compile=True))


@pytest.mark.slow
def test_compiled_vae_gives_the_same_gradients():
    assert_close(vae_gradients(), vae_gradients(compile=True))
