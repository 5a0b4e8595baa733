"""Deferred patch masking on MMDiT and DiT: without a mask the backbones compute what they computed before (plus
the mixer, when given); a masked pass sends only the kept tokens through the main blocks, its dropped patches get
no gradient but through the mixer and count nowhere in the loss; the mask comes from the step's keyed draws; eval
and sampling use every token; short training runs go; a UNet refuses the options in one line."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from sdlight.checkpoints import load_latent_diffusion
from sdlight.diffusion import Draws, RectifiedFlow, sample_euler
from sdlight.diffusion.draw import KeyedDraws
from sdlight.diffusion.weighting import diffusion_loss
from sdlight.errors import UsageError
from sdlight.models.latent_diffusion import build_latent_diffusion
from sdlight.nn.dit import DiT
from sdlight.nn.mmdit import MMDiT
from sdlight.nn.token_masking import MixerBlock, draw_token_keep, patch_elements
from sdlight.nn.unet import timestep_embedding

from tests.conftest import compose_train, random_stage1_checkpoint
from tests.entry.cli_helpers import assert_one_line, run_cli
from tests.stages.conftest import CONTEXT_DIM, shapes_batch, tiny_conditioning, tiny_vae

BACKBONES = {
    "mmdit": partial(MMDiT, patch_size=2, in_channels=4, depth=2, num_heads=2, hidden=32, pos_embed_max_size=8,
                     context_dim=16, pooled_dim=8),
    "dit": partial(DiT, input_size=8, patch_size=2, in_channels=4, depth=2, hidden=32, num_heads=2, context_dim=16),
}


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random: adaLN-Zero would otherwise make the mixer the identity and the output zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def inputs(kind: str, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    kwargs = {"t": torch.rand(batch, generator=g) * 1000, "context": torch.randn(batch, 3, 16, generator=g)}
    if kind == "mmdit":
        kwargs["y"] = torch.randn(batch, 8, generator=g)
    return x, kwargs


def reference(net: torch.nn.Module, x: torch.Tensor, t, context, y=None, mixer: bool = False) -> torch.Tensor:
    """The backbone's forward written out without masking: embed, (mixer blocks,) main blocks, output."""
    if isinstance(net, MMDiT):
        h = net.x_embedder(x) + net.cropped_pos_embed(8, 8)
        c = net.t_embedder(timestep_embedding(t, 256)) + net.y_embedder(y)
        for block in net.patch_mixer if mixer else ():
            h = block(h, c)
        ctx = net.context_embedder(context)
        for block in net.joint_blocks:
            ctx, h = block(ctx, h, c)
    else:
        h = net.x_embedder(x) + net.pos_embed
        c = net.t_embedder(timestep_embedding(t, 256))
        t0, ctx = net.t_block(c), net.y_embedder(context)
        for block in net.patch_mixer if mixer else ():
            h = block(h, c)
        for block in net.blocks:
            h = block(h, ctx, t0, None)
    return net.unpatchify(net.final_layer(h, c), 8, 8)


def main_blocks(net: torch.nn.Module) -> torch.nn.ModuleList:
    return net.joint_blocks if isinstance(net, MMDiT) else net.blocks


def count_tokens(net: torch.nn.Module) -> list[int]:
    """The number of image tokens each call's first main block sees."""
    seen: list[int] = []
    image = 1 if isinstance(net, MMDiT) else 0  # a joint block takes (context, x, c)
    main_blocks(net)[0].register_forward_pre_hook(lambda m, args: seen.append(args[image].shape[1]))
    return seen


@pytest.mark.parametrize("kind", BACKBONES)
def test_without_a_mask_the_output_is_todays_and_the_mixer_runs_first(kind):
    torch.manual_seed(0)
    plain = randomized(BACKBONES[kind]())
    assert not any(k.startswith("patch_mixer") for k in plain.state_dict())  # released files still load strict
    x, kw = inputs(kind)
    expected = reference(plain, x, **kw)
    assert torch.equal(plain(x, **kw), expected)
    off = BACKBONES[kind](mask_ratio=0.5)  # masking set, nothing passed (eval): every token, the same numbers
    off.load_state_dict(plain.state_dict())
    assert torch.equal(off(x, **kw), expected)
    mixed = randomized(BACKBONES[kind](mixer_depth=2, mask_ratio=0.5))
    assert {k.split(".")[1] for k in mixed.state_dict() if k.startswith("patch_mixer.")} == {"0", "1"}
    out = mixed(x, **kw)
    assert torch.equal(out, reference(mixed, x, **kw, mixer=True))
    assert not torch.allclose(out, reference(mixed, x, **kw))  # the mixer does change the output
    everything = torch.ones(2, 16, dtype=torch.bool)
    assert torch.equal(mixed(x, **kw, token_keep=everything), out)


def test_the_mixer_block_is_adaln_attention_and_mlp():
    torch.manual_seed(0)
    block = randomized(MixerBlock(16, 2))
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    mods = [m[:, None] for m in block.adaLN_modulation(c).chunk(6, dim=1)]
    norm = lambda h: (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    q, k, v = block.qkv(norm(x) * (1 + mods[1]) + mods[0]).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    attn = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 5, 16)
    h = x + mods[2] * block.proj(attn)
    mlp = block.fc2(torch.nn.functional.gelu(block.fc1(norm(h) * (1 + mods[4]) + mods[3]), approximate="tanh"))
    torch.testing.assert_close(block(x, c), h + mods[5] * mlp, rtol=1e-5, atol=1e-5)
    fresh = BACKBONES["dit"](mixer_depth=1).patch_mixer
    assert not fresh[0].adaLN_modulation[-1].weight.any()  # adaLN-Zero: the mixer starts as the identity


@pytest.mark.parametrize("kind", BACKBONES)
def test_a_masked_pass_uses_only_the_kept_tokens(kind):
    torch.manual_seed(0)
    net = randomized(BACKBONES[kind](mask_ratio=0.5))
    seen = count_tokens(net)
    x, kw = inputs(kind)
    keep = draw_token_keep(Draws(torch.Generator().manual_seed(3)), 0.5, 2, (4, 4))
    assert keep.sum(1).tolist() == [8, 8] and not torch.equal(keep[0], keep[1])
    x.requires_grad_(True)
    out = net(x, **kw, token_keep=keep)
    assert seen == [8]  # (1 - 0.5) of the 16 tokens
    elements = patch_elements(keep, 2, out.shape)
    assert torch.equal(out == 0, elements == 0)  # the dropped patches, and only they, are empty
    out.square().sum().backward()
    assert not x.grad[elements == 0].any() and x.grad[elements == 1].abs().min() > 0
    # with a mixer, the dropped tokens' inputs reach the kept ones before the drop (their only path)
    mixed = randomized(BACKBONES[kind](mask_ratio=0.5, mixer_depth=1))
    x.grad = None
    mixed(x, **kw, token_keep=keep).square().sum().backward()
    assert x.grad[elements == 0].abs().min() > 0


def test_the_masked_loss_is_the_mean_over_kept_elements():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    keep = draw_token_keep(Draws(g), 0.75, 3, (4, 4))
    elements = patch_elements(keep, 2, pred.shape)
    assert elements.sum().item() == 3 * 4 * (2 * 2) * 4  # 4 kept patches of 2x2 pixels x 4 channels per sample
    weight = torch.tensor([1.0, 0.5, 2.0])
    expected = torch.stack([(pred[i] - target[i])[elements[i] == 1].square().mean() for i in range(3)]) * weight
    loss = diffusion_loss(pred, target, weight, "l2", elements)
    torch.testing.assert_close(loss, expected)
    changed = torch.where(elements == 1, target, target + 5.0)
    assert torch.equal(diffusion_loss(pred, changed, weight, "l2", elements), loss)
    assert not torch.allclose(diffusion_loss(pred, changed, weight), diffusion_loss(pred, target, weight))


@pytest.mark.parametrize("kind", BACKBONES)
def test_the_loss_ignores_the_dropped_patches_targets(kind):
    """The same noised input with other targets at the dropped patches: rectified flow's target noise - x0 moves by
    -d / t when x0 moves by d and the noise by -d (1 - t) / t."""
    torch.manual_seed(0)
    net = randomized(BACKBONES[kind](mask_ratio=0.5, mixer_depth=1))
    x0, kw = inputs(kind)
    keep = draw_token_keep(Draws(torch.Generator().manual_seed(3)), 0.5, 2, (4, 4))
    elements = patch_elements(keep, 2, x0.shape)
    noise, levels = torch.randn_like(x0), torch.tensor([0.5, 0.25])
    d = (1 - elements) * 0.5
    t = levels.view(-1, 1, 1, 1)
    x0_b, noise_b = x0 + d, noise - d * (1 - t) / t
    objective, network = RectifiedFlow(), lambda x, t: net(x, t, kw["context"], kw.get("y"), token_keep=keep)
    loss = objective.losses(network, x0, levels, noise, element_weight=elements)
    torch.testing.assert_close(objective.losses(network, x0_b, levels, noise_b, element_weight=elements), loss,
                               rtol=1e-5, atol=1e-6)
    whole = lambda x, t: net(x, t, kw["context"], kw.get("y"))  # noqa: E731
    assert not torch.allclose(objective.losses(whole, x0_b, levels, noise_b), objective.losses(whole, x0, levels, noise))


def masked_ldm(kind: str, mask_ratio: float = 0.75):
    """A text model on 16 px (4x4 latents); patches of 1 latent pixel: 16 image tokens."""
    torch.manual_seed(0)
    common = dict(patch_size=1, out_channels=4, depth=2, num_heads=2, hidden=32, context_dim=CONTEXT_DIM,
                  mask_ratio=mask_ratio, mixer_depth=1)
    unet = (partial(MMDiT, pos_embed_max_size=8, pooled_dim=None, **common) if kind == "mmdit" else
            partial(DiT, input_size=4, **common))
    return build_latent_diffusion(unet=unet, first_stage=tiny_vae(), conditioning=tiny_conditioning("text"),
                                  objective=RectifiedFlow(), prediction_type=None, loss_type=None, loss_weighting=None,
                                  snr_gamma=None, image_size=16, scale_factor=0.5,
                                  sampler=partial(sample_euler, steps=2))


def kept_masks(model) -> list:
    masks: list = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("token_keep")), with_kwargs=True)
    return masks


def rows(batch: dict, index: list[int]) -> dict:
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index] for k, v in batch.items()}


@pytest.mark.parametrize("kind", BACKBONES)
def test_training_steps_drop_tokens_eval_and_sampling_keep_them_all(kind):
    model = masked_ldm(kind)
    seen, masks, weights = count_tokens(model.model.diffusion_model), kept_masks(model), []
    losses_of = model.objective.losses
    model.objective.losses = lambda *a, **kw: weights.append(kw.get("element_weight")) or losses_of(*a, **kw)
    batch = shapes_batch(4)
    losses, _ = model.train().losses(batch, Draws(torch.Generator().manual_seed(0)))
    losses.mean().backward()
    assert seen == [4] and masks[0].shape == (4, 16) and masks[0].sum(1).tolist() == [4] * 4  # 16 - 12 dropped
    assert torch.equal(weights[0], masks[0].view(4, 1, 4, 4).float().expand(4, 4, 4, 4))  # the loss: kept patches
    assert torch.isfinite(losses).all()
    model.eval().losses(batch, Draws(torch.Generator().manual_seed(0)))  # validation: all tokens, no mask
    model.generate(["a red circle"], steps=2, generator=torch.Generator().manual_seed(0))
    assert seen[1:] == [16] * (len(seen) - 1) and len(seen) > 2 and masks[1:] == [None] * (len(masks) - 1)
    assert weights[1] is None


def test_the_mask_is_keyed_by_seed_step_and_sample():
    model = masked_ldm("mmdit", mask_ratio=0.5).train()
    masks, batch = kept_masks(model), shapes_batch(4)
    model.losses(batch, KeyedDraws(7, 3, [4, 9, 2, 5]))
    for share in ([4, 2], [9, 5]):  # two ranks' shares of the same global batch
        model.losses(rows(batch, [0, 2] if share == [4, 2] else [1, 3]), KeyedDraws(7, 3, share))
    whole, first, second = masks
    assert torch.equal(whole[[0, 2]], first) and torch.equal(whole[[1, 3]], second)
    assert len({tuple(m.tolist()) for m in whole}) == 4  # each sample its own
    model.losses(batch, KeyedDraws(7, 4, [4, 9, 2, 5]))
    assert not torch.equal(masks[-1], whole)  # another step, another mask


def test_the_options_are_checked_in_one_line():
    with pytest.raises(UsageError, match=r"model.unet.mask_ratio=1.0: .* in \[0, 1\)"):
        BACKBONES["mmdit"](mask_ratio=1.0)
    with pytest.raises(UsageError, match="model.unet.mixer_depth=-1"):
        BACKBONES["dit"](mixer_depth=-1)


@pytest.mark.parametrize("unet", ["mmdit_tiny", "dit_tiny"])
def test_a_short_masked_training_run(tmp_path, unet):
    from sdlight.train import train

    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    cfg = compose_train(["+experiment=quickstart_ldm", f"model/unet={unet}", "model/objective=rectified_flow",
                         "model.unet.mask_ratio=0.5", "model.unet.mixer_depth=1", "trainer.max_steps=3",
                         "data.train_size=64", "data.val_size=8", "logger=none", f"model.first_stage.ckpt={vae}",
                         "model.sample_every_n_steps=0", "~callbacks.rich_progress_bar"], tmp_path)
    metrics, objects = train(cfg)
    backbone = objects["model"].net.model.diffusion_model
    assert backbone.mask_ratio == 0.5 and len(backbone.patch_mixer) == 1
    assert objects["trainer"].global_step == 3 and math.isfinite(float(metrics["train/loss"]))
    rebuilt, _ = load_latent_diffusion(tmp_path / "checkpoints" / "last.ckpt")  # the mixer's weights come back
    assert rebuilt.model.diffusion_model.mask_ratio == 0.5 and len(rebuilt.model.diffusion_model.patch_mixer) == 1


def test_a_unet_refuses_masking_in_one_line(tmp_path):
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    out = run_cli("train", ["+experiment=quickstart_ldm", "logger=none", f"model.first_stage.ckpt={vae}",
                            "+model.unet.mask_ratio=0.5"], tmp_path)
    assert_one_line(out, "model.unet.mask_ratio=0.5", "no image tokens")
