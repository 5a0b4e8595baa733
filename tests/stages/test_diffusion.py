"""LatentDiffusion under a real Lightning Trainer: the scale factor, the frozen first stage, the training loss
against closed forms, conditioning dropout, the EMA, generation with guidance, checkpoints, validation logs, the
NaN guard, and the experiment configs."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sdlight.checkpoints import CheckpointError, load_autoencoder, load_first_stage
from sdlight.data.shapes import ShapesDataset
from sdlight.diffusion.samplers import sample_ddim
from sdlight.optim import warmup_cosine
from sdlight.diffusion import DDPM, Draws, NoiseSchedule
from sdlight.diffusion.draw import mixed_seed
from sdlight.stages.diffusion import SCALE_FACTOR_SEED, LatentDiffusion
from sdlight.train import train

from .conftest import CONTEXT_DIM, SIZE, shapes_batch, shapes_loader, tiny_ldm, tiny_trainer, tiny_vae

T = 1000
# the linear DDPM schedule of tiny_ldm, written out: beta_t evenly spaced in [1e-4, 2e-2]
ALPHA_BAR = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, T, dtype=torch.float64), dim=0)


def quickstart(vae_ckpt: Path, callbacks: bool = True) -> list[str]:
    """quickstart_ldm at the smallest settings that still go through every piece."""
    return ["+experiment=quickstart_ldm", f"model.first_stage.ckpt={vae_ckpt}", "data.train_size=16",
            "data.val_size=8", "data.batch_size=8", "model.unet.model_channels=32", "model.conditioning.width=32",
            "model.conditioning.heads=2", "model.conditioning.max_length=16", "model.sample_every_n_steps=0",
            "model.scale_factor_batches=2", "logger=csv", "trainer.num_sanity_val_steps=0"] + (
        ["callbacks=default", "~callbacks.rich_progress_bar", "~callbacks.model_summary"] if callbacks
        else ["callbacks=none"])


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ema_tensors(module: LatentDiffusion) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module.model_ema.module for p in (*m.parameters(), *m.buffers())]


def live_tensors(module: LatentDiffusion) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module._ema_parts for p in (*m.parameters(), *m.buffers())]


class FixedDraws(Draws):
    """The given noise levels and noise; the posterior sample from ``generator``."""

    def __init__(self, generator: torch.Generator, levels: torch.Tensor, noise: torch.Tensor):
        super().__init__(generator)
        self.levels, self.noise, self.normals = levels, noise, 0

    def integers(self, high, shape, device=None):
        return self.levels.to(device)

    def normal(self, shape, device=None, dtype=None):
        self.normals += 1  # the posterior sample first, then the noise
        return super().normal(shape, device, dtype) if self.normals == 1 else self.noise.to(device)


class UNetSpy:
    """Records the inputs and output of every forward of the UNet (inside the wrapper)."""

    def __init__(self, module: LatentDiffusion):
        self.calls: list[dict] = []
        unet = module.net.model.diffusion_model
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, unet, args, kwargs, out):
        self.calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone(),
                           "context": None if kwargs.get("context") is None else kwargs["context"].detach().clone(),
                           "out": out.detach().clone(), "weight": unet.out[-1].weight.detach().clone(),
                           "training": unet.training})


# ------------------------------------------------------------------------------------------ 1. scale factor
def independent_scale_factor(vae: torch.nn.Module, batches: list[torch.Tensor], seed: int) -> float:
    """1 / std of posterior samples in float64; the noise is drawn from the same seeded generator, in order."""
    vae64 = copy.deepcopy(vae).double().eval()
    gen = torch.Generator().manual_seed(seed)
    zs = []
    with torch.no_grad():
        for x in batches:
            mean, logvar = vae64.quant_conv(vae64.encoder(x.double())).chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32).double()
            zs.append(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps)
    return 1.0 / torch.cat([z.flatten() for z in zs]).std().item()


def test_scale_factor_estimate_matches_float64_posterior_samples(tmp_path):
    """Posterior *samples* (what training sees) of the first scale_factor_batches batches, from a seeded
    generator: deterministic, and the global RNG is left as it was (same t and noise as a fixed-factor run)."""
    loader = shapes_loader(20, 4, shuffle=False)
    module = tiny_ldm(scale_factor=None, scale_factor_batches=3)
    seen = []
    hook = module.net.model.diffusion_model.register_forward_pre_hook(
        lambda m, args: seen.append((float(module.net.scale_factor), args[1].clone())))
    L.seed_everything(3)
    tiny_trainer(tmp_path, max_steps=1).fit(module, loader)
    hook.remove()
    batches = [b["image"] for b, _ in zip(loader, range(3))]
    expected = independent_scale_factor(module.net.first_stage_model, batches, SCALE_FACTOR_SEED)
    assert float(module.net.scale_factor) == pytest.approx(expected, rel=1e-5)
    assert seen[0][0] == pytest.approx(expected, rel=1e-6)  # estimated before the first training step
    assert not 0.9 < expected < 1.1  # a random VAE's latents are not unit-variance: the estimate did something

    fixed = tiny_ldm(scale_factor=0.3)
    fixed_seen = []
    fixed.net.model.diffusion_model.register_forward_pre_hook(lambda m, args: fixed_seen.append(args[1].clone()))
    L.seed_everything(3)
    tiny_trainer(tmp_path, max_steps=1).fit(fixed, loader)
    torch.testing.assert_close(seen[0][1], fixed_seen[0])  # the estimate drew nothing from the global RNG


def test_fixed_scale_factor_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setattr(LatentDiffusion, "estimate_scale_factor",
                        lambda self: pytest.fail("a fixed scale_factor must not be estimated"))
    module = tiny_ldm(scale_factor=0.18215)
    x = shapes_batch()["image"]
    expected = 0.18215 * module.net.first_stage_model.encode(x).mode()
    torch.testing.assert_close(module.net.encode_images(x, sample=False), expected)
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(module.net.decode_latents(z), module.net.first_stage_model.decode(z / 0.18215).clamp(-1, 1))
    tiny_trainer(tmp_path, max_steps=2).fit(module, shapes_loader(8, 4))
    assert module.net.scale_factor == torch.tensor(0.18215)  # float32, bit for bit


def test_scale_factor_is_stored_and_kept_on_resume(train_cfg, vae_ckpt, tmp_path, monkeypatch):
    cfg = train_cfg(quickstart(vae_ckpt) + ["trainer.max_epochs=1"])
    _, objects = train(cfg)
    estimated = float(objects["model"].net.scale_factor)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # loads: hyperparameters are primitive
    assert float(ckpt["state_dict"]["scale_factor"]) == estimated and estimated != 1.0

    calls = []
    monkeypatch.setattr(LatentDiffusion, "estimate_scale_factor", lambda self: calls.append(1) or 1.0)
    cfg2 = train_cfg(quickstart(vae_ckpt, callbacks=False) + ["trainer.max_epochs=2", f"ckpt_path={last}"])
    _, objects2 = train(cfg2)
    assert calls == []
    assert float(objects2["model"].net.scale_factor) == estimated
    assert objects2["trainer"].global_step == 2 * objects["trainer"].global_step  # resumed, not restarted


def test_scale_factor_is_pooled_over_ranks_under_ddp_sim(train_cfg, vae_ckpt, tmp_path):
    n, batch = 32, 8
    cfg = train_cfg(quickstart(vae_ckpt) + [
        "trainer=ddp_sim", "trainer.max_steps=1", "+trainer.limit_val_batches=0",
        f"data.train_size={n}", f"data.batch_size={batch}", "model.scale_factor_batches=8"])
    train(cfg)
    got = float(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["scale_factor"])
    # each rank: its DistributedSampler share (shuffled with seed 0, the run's seed); each sample's posterior noise
    # keyed by (SCALE_FACTOR_SEED, step 0, its index), whichever rank draws it
    data = ShapesDataset("train", n, image_size=32)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    vae = load_autoencoder(vae_ckpt)
    zs_std = []
    for rank in (0, 1):
        idx = perm[rank::2]
        batches = [torch.stack([data[i]["image"] for i in idx[s:s + batch]]) for s in range(0, len(idx), batch)]
        zs_std.append((batches, SCALE_FACTOR_SEED + rank))
    # pooled: the std of the union of both ranks' samples
    vae64 = copy.deepcopy(vae).double().eval()
    pooled = []
    with torch.no_grad():
        for i in perm:
            mean, logvar = vae64.quant_conv(vae64.encoder(data[i]["image"][None].double())).chunk(2, dim=1)
            g = torch.Generator().manual_seed(mixed_seed(SCALE_FACTOR_SEED, 0, i))
            eps = torch.randn(mean.shape[1:], generator=g, dtype=torch.float32).double()
            pooled.append((mean[0] + torch.exp(0.5 * logvar[0].clamp(-30, 20)) * eps).flatten())
    expected = 1.0 / torch.cat(pooled).std().item()
    rank0_only = independent_scale_factor(vae, zs_std[0][0], SCALE_FACTOR_SEED)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(rank0_only - expected) > 1e-4 * expected  # rank 0 alone would give a different value


# ------------------------------------------------------------------------------------------- 2. first stage
def test_missing_first_stage_checkpoint(train_cfg, tmp_path):
    import hydra

    cfg = train_cfg(["+experiment=quickstart_ldm"])  # the default path: no quickstart VAE trained here
    with pytest.raises(InstantiationException) as info:
        hydra.utils.instantiate(cfg.model)
    assert isinstance(info.value.__cause__, CheckpointError)
    assert "no such file" in str(info.value) and "quickstart/vae/checkpoints/last.ckpt" in str(info.value)
    cfg = train_cfg(["model=ldm"])  # no path at all
    with pytest.raises(MissingMandatoryValue, match="model.first_stage.ckpt"):
        hydra.utils.instantiate(cfg.model)


def test_first_stage_checkpoint_of_the_wrong_kind(tmp_path):
    ldm = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)},
                "hyper_parameters": {"prediction_type": "eps"}}, ldm)
    with pytest.raises(CheckpointError, match=r"not an sdlight autoencoder checkpoint.*autoencoder_config"):
        load_first_stage(ldm)
    no_weights = tmp_path / "no-weights.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)},
                "hyper_parameters": {"autoencoder_config": tiny_vae().config}}, no_weights)
    with pytest.raises(CheckpointError, match=r"no autoencoder weights \(no encoder\.\*/decoder\.\* keys\)"):
        load_first_stage(no_weights)


def test_first_stage_is_frozen_in_eval_mode_and_not_optimized(tmp_path, vae_ckpt):
    vae = load_first_stage(vae_ckpt)
    vae.train()  # whatever mode it comes in, the module puts it in eval
    module = tiny_ldm(first_stage=vae)
    before = state(module.net.first_stage_model)
    assert not any(p.requires_grad for p in module.net.first_stage_model.parameters())

    class Check(L.Callback):
        def __init__(self):
            self.modes, self.grads = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append([m.training for m in pl_module.net.first_stage_model.modules()])

        def on_after_backward(self, trainer, pl_module):
            self.grads.append([p.grad for p in pl_module.net.first_stage_model.parameters()])

    check = Check()
    trainer = tiny_trainer(tmp_path, max_steps=3, callbacks=[check], limit_val_batches=1)
    trainer.fit(module, shapes_loader(12, 4), shapes_loader(4, 4, split="val"))
    assert len(check.modes) == 3 and not any(any(m) for m in check.modes)  # eval even after validation
    assert all(g is None for gs in check.grads for g in gs)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.net.first_stage_model.parameters()}
    assert not optimized & {id(p) for p in module.model_ema.parameters()}
    assert optimized == {id(p) for p in [*module.net.model.parameters(), *module.net.cond_stage_model.parameters()]}
    after = state(module.net.first_stage_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    module.train()
    assert module.net.model.training and not any(m.training for m in module.net.first_stage_model.modules())


def eval_mode_warnings(tmp_path, module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, max_steps=1).fit(module, shapes_loader(4, 4))
    return [str(w.message) for w in caught if "module(s) in eval mode" in str(w.message)]


def test_eval_mode_warning_is_silenced_only_for_the_frozen_parts(tmp_path):
    assert eval_mode_warnings(tmp_path, tiny_ldm()) == []  # the frozen VAE is in eval mode on purpose
    module = tiny_ldm()
    module.net.cond_stage_model.eval()  # a trainable part left in eval mode: Lightning must still say so
    n = sum(1 for m in module.modules() if not m.training)
    assert n > sum(1 for _ in module.net.first_stage_model.modules())
    found = eval_mode_warnings(tmp_path, module)
    assert len(found) == 1 and found[0].startswith(f"Found {n} module(s)"), found


# ------------------------------------------------------------------------------------ 3. loss and dropout
def expected_loss(out, z, noise, t, prediction_type, weighting, gamma=5.0):
    """Per-sample loss from the closed forms, float64."""
    a = ALPHA_BAR[t].view(-1, 1, 1, 1)
    z, noise, out = z.double(), noise.double(), out.double()
    target = {"eps": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * z, "x0": z}[prediction_type]
    snr = (a / (1 - a)).flatten()
    min_snr = snr.clamp(max=gamma)
    weight = {"simple": torch.ones_like(snr),
              "min_snr": {"eps": min_snr / snr, "v": min_snr / (snr + 1), "x0": min_snr}[prediction_type]}[weighting]
    return weight * (out - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_loss_matches_closed_form(prediction_type, weighting):
    module = tiny_ldm(prediction_type=prediction_type, loss_weighting=weighting, snr_gamma=5.0, scale_factor=0.7)
    batch = shapes_batch(4)
    t = torch.tensor([0, 40, 500, 999])  # snr from ~1e4 (capped by min_snr) to ~4e-5
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    got, got_t = module.net.losses(batch, FixedDraws(torch.Generator().manual_seed(2), t, noise))
    assert torch.equal(got_t, t)
    with torch.no_grad():
        vae, unet = module.net.first_stage_model, module.net.model.diffusion_model
        posterior = vae.encode(batch["image"])
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(2))
        z = 0.7 * (posterior.mean + posterior.std * eps)
        a = ALPHA_BAR[t].view(-1, 1, 1, 1).float()
        out = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, context=module.net.cond_stage_model.single(batch["text"]))
    torch.testing.assert_close(got.double(), expected_loss(out, z, noise, t, prediction_type, weighting),
                               rtol=1e-5, atol=1e-7)
    if weighting == "min_snr" and prediction_type == "eps":
        assert got[0] < 0.01 * expected_loss(out, z, noise, t, "eps", "simple")[0]  # the cap did bite


def test_training_step_loss_and_noise_are_consistent(tmp_path):
    """Through the Trainer: the logged loss is the closed-form loss of what the UNet saw, and the noise that
    x_t implies is standard normal."""
    module = tiny_ldm(prediction_type="v", loss_weighting="min_snr")
    spy, latents, losses = UNetSpy(module), [], []
    encode = module.net.encode_images
    module.net.encode_images = lambda *a, **k: latents.append(encode(*a, **k)) or latents[-1]

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    tiny_trainer(tmp_path, max_steps=2, callbacks=[Losses()]).fit(module, shapes_loader(8, 4))
    noises = []
    for call, z, loss in zip(spy.calls, latents, losses):
        a = ALPHA_BAR[call["t"]].view(-1, 1, 1, 1)
        noise = (call["x"].double() - a.sqrt() * z.double()) / (1 - a).sqrt()
        noises.append(noise)
        expected = expected_loss(call["out"], z, noise, call["t"], "v", "min_snr").mean()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    noise = torch.cat(noises)
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


def test_bf16_mixed_precision_trains_with_float32_weights_and_latents(tmp_path):
    """`precision=bf16-mixed` (what trainer=gpu/ddp/fsdp use; CPU autocast here): the UNet computes in bf16, the
    weights, their EMA and the latents stay float32, and the loss agrees with the float32 loss to bf16 accuracy."""
    module = tiny_ldm(prediction_type="v")
    batch = shapes_batch(4)
    with torch.no_grad():
        want = module.net.losses(batch, torch.Generator().manual_seed(0))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module.net.losses(batch, torch.Generator().manual_seed(0))[0]
            assert module.net.encode_images(batch["image"]).dtype == torch.float32
    assert got.dtype == torch.float32
    assert not torch.equal(got, want)  # autocast did change the arithmetic ...
    torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3)  # ... only by bf16 rounding

    unet, dtypes = module.net.model.diffusion_model, []
    unet.input_blocks[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    before = copy.deepcopy(module.net.model.state_dict())
    tiny_trainer(tmp_path, max_steps=3, precision="bf16-mixed").fit(module, shapes_loader(12, 4))
    assert dtypes == [torch.bfloat16] * 3  # inside the UNet (its output is cast back to the input's float32)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.dtype == torch.float32 for p in module.model_ema.parameters())
    assert any(not torch.equal(before[k], v) for k, v in module.net.model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in module.net.model.parameters())
    assert module.guard.skips == 0


@pytest.mark.parametrize("kind", ["text", "class", "attributes"])
def test_condition_dropout_reaches_the_unet(tmp_path, kind):
    contexts = {}
    for p in (0.0, 1.0):
        module = tiny_ldm(kind, p_uncond=p)
        enc = copy.deepcopy(module.net.cond_stage_model.single)  # as it was before the optimizer step
        spy = UNetSpy(module)
        tiny_trainer(tmp_path, max_steps=1).fit(module, shapes_loader(4, 4))
        values = shapes_batch(4)[module.condition_keys[0]]
        with torch.no_grad():
            want = enc(enc.null_like(values) if p == 1.0 else values)
        torch.testing.assert_close(spy.calls[0]["context"], want)
        contexts[p] = spy.calls[0]["context"]
    assert not torch.allclose(contexts[0.0], contexts[1.0])  # the null condition differs from the real ones


# ---------------------------------------------------------------------------------------------------- 4. EMA
def test_ema_holds_only_the_trainable_parts():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from sdlight.conditioning import OpenCLIPTextEncoder

    module = tiny_ldm("text")
    keys = module.model_ema.module.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"0", "1"}  # the UNet wrapper and the learned text encoder
    n_trainable = sum(p.numel() for p in [*module.net.model.parameters(), *module.net.cond_stage_model.parameters()])
    assert sum(p.numel() for p in module.model_ema.module.parameters()) == n_trainable
    assert not any("encoder.down" in k or "decoder." in k for k in keys)

    torch.manual_seed(0)
    clip = CLIP(16, CLIPVisionCfg(image_size=16, layers=1, width=32, head_width=16, patch_size=8),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=CONTEXT_DIM, heads=2, layers=2))
    frozen = tiny_ldm(OpenCLIPTextEncoder(arch="ViT-B-32", layer="penultimate", max_length=16, model=clip))
    keys = frozen.model_ema.module.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"0"} and all(k.startswith("0.diffusion_model.") for k in keys)
    assert sum(p.numel() for p in frozen.model_ema.module.parameters()) == \
        sum(p.numel() for p in frozen.net.model.parameters())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in frozen.state_dict()


class StepRecorder(L.Callback):
    """Live weights of the EMA'd parts after every optimizer step."""

    def __init__(self):
        self.after_step, self.last_step = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.after_step.append([t.double() for t in live_tensors(pl_module)])


def closed_form_ema(history: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """e_1 = w_1;  e_k = d_k e_{k-1} + (1 - d_k) w_k with d_k = min(decay, k / (9 + k))."""
    ema = [w.clone() for w in history[0]]
    for k, weights in enumerate(history[1:], start=2):
        d = min(decay, k / (9 + k))
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights)]
    return ema


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_equals_closed_form_warmup_average(tmp_path, accumulate):
    decay = 0.25  # the warm-up ramp 2/11, 3/12, then the cap: both branches of min() are used
    module = tiny_ldm("attributes", ema_decay=decay, lr=2e-2)  # integer buffers (null ids) ride along
    rec = StepRecorder()
    tiny_trainer(tmp_path, max_steps=4, accumulate_grad_batches=accumulate, callbacks=[rec]).fit(
        module, shapes_loader(4 * 4 * accumulate, 4))
    assert len(rec.after_step) == 4 and int(module.model_ema.n_averaged) == 4
    expected = closed_form_ema(rec.after_step, decay)
    got = ema_tensors(module)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.double(), e.to(g.dtype).double(), rtol=1e-5, atol=1e-7)
    live = live_tensors(module)
    assert max((g - w).abs().max() for g, w in zip(got, live) if g.is_floating_point()) > 1e-3


def test_cosine_schedule_spans_the_run(tmp_path):
    module = tiny_ldm("text", lr_scheduler=partial(warmup_cosine, warmup_steps=1))
    tiny_trainer(tmp_path, max_epochs=2).fit(module, shapes_loader(12, 4))  # 6 optimizer steps
    scheduler = module.lr_schedulers()
    assert scheduler.lr_lambdas[0].total_steps == 6 and scheduler.last_epoch == 6
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to the end


def test_validation_and_generate_use_ema_and_restore_live_weights(tmp_path):
    module = tiny_ldm(ema_decay=0.5, lr=2e-2)
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=1.0)
    trainer.fit(module, shapes_loader(12, 4), shapes_loader(4, 4, split="val"))
    ema_w = module.model_ema.module[0].diffusion_model.out[-1].weight.detach().clone()
    live = live_tensors(module)
    assert not torch.allclose(ema_w, live[[n for n, _ in module.net.model.named_parameters()].index(
        "diffusion_model.out.2.weight")])

    spy = UNetSpy(module)
    trainer.validate(module, shapes_loader(4, 4, split="val"), verbose=False)
    module.generate(["a red circle"], steps=2, use_ema=True)
    module.generate(["a red circle"], steps=2, use_ema=False)
    assert len(spy.calls) == 1 + 2 + 2
    for call in spy.calls[:3]:
        torch.testing.assert_close(call["weight"], ema_w, rtol=0, atol=0)
        assert not call["training"]
    for call in spy.calls[3:]:
        assert not torch.allclose(call["weight"], ema_w)
    for a, b in zip(live, live_tensors(module)):
        assert torch.equal(a, b)  # the live weights came back exactly


# ----------------------------------------------------------------------------------------------- 5. generate
def run_sampler(module, denoise, x_T, steps=3):
    return sample_ddim(denoise, x_T, module.net.objective.schedule, steps=steps, prediction_type=module.net.objective.prediction_type)


def test_generate_is_deterministic_for_a_fixed_generator():
    module = tiny_ldm(sampler=partial(sample_ddim, steps=3, eta=1.0))  # eta 1: noise at every step
    prompts = ["a red circle in the center on a white background", "a blue square at the top on a black background"]
    a = module.generate(prompts, generator=torch.Generator().manual_seed(0))
    b = module.generate(prompts, generator=torch.Generator().manual_seed(0))
    c = module.generate(prompts, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, SIZE, SIZE) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guidance_matches_two_separate_denoiser_calls(scale):
    # float64: one batched pass of [uncond; cond] and two separate passes agree to rounding (~1e-15 per op),
    # which float32's batch-size-dependent kernels do not promise on every CPU
    module = tiny_ldm().double()
    prompts = ["a red circle", "a green triangle at the top"]
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = module.generate(prompts, guidance_scale=scale, x_T=x_T, return_latents=True, use_ema=False)
    unet, enc = module.net.model.diffusion_model, module.net.cond_stage_model.single
    with torch.no_grad():
        cond, null = enc(prompts), enc(["", ""])

        def denoise(x, t):
            c = unet(x, t, context=cond)
            if scale == 1.0:
                return c
            u = unet(x, t, context=null)
            return u + scale * (c - u)

        want = run_sampler(module, denoise, x_T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if scale != 1.0:
        plain = module.generate(prompts, guidance_scale=1.0, x_T=x_T, return_latents=True, use_ema=False)
        assert not torch.allclose(got, plain, atol=1e-3)


def test_negative_prompts_replace_the_null_condition():
    module = tiny_ldm().double()  # float64, as above
    prompts, negative = ["a red circle", "a blue square"], ["a green circle", "a yellow square"]
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = module.generate(prompts, guidance_scale=3.0, negative=negative, x_T=x_T, return_latents=True)
    unet, enc = module.net.model.diffusion_model, module.net.cond_stage_model.single
    with torch.no_grad():
        cond, neg = enc(prompts), enc(negative)

        def denoise(x, t):
            u = unet(x, t, context=neg)
            return u + 3.0 * (unet(x, t, context=cond) - u)

        want = run_sampler(module, denoise, x_T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with_null = module.generate(prompts, guidance_scale=3.0, x_T=x_T, return_latents=True)
    assert not torch.allclose(got, with_null, atol=1e-3)


def test_generate_unconditional_and_argument_errors():
    module = tiny_ldm("none")
    images = module.generate(num_samples=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, SIZE, SIZE) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="unconditional"):
        module.generate(["a red circle"])
    with pytest.raises(ValueError, match="num_samples"):
        module.generate()
    text = tiny_ldm("text")
    with pytest.raises(ValueError, match=r"conditioned on \['text'\]"):
        text.generate(num_samples=2)
    with pytest.raises(ValueError, match="one sample per condition"):
        text.generate(["a", "b"], num_samples=3)
    assert text.generate("a red circle", steps=1).shape == (1, 3, SIZE, SIZE)  # one prompt as a string


@pytest.mark.parametrize("kind", ["class", "attributes"])
def test_generate_with_labels_and_attributes(kind):
    module = tiny_ldm(kind).double()  # float64, as above
    values = [3, 17] if kind == "class" else [[0, 1, 4, 2], [3, 5, 0, 1]]
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from_list = module.generate(values, x_T=x_T, return_latents=True)
    from_tensor = module.generate(torch.tensor(values), x_T=x_T, return_latents=True)
    torch.testing.assert_close(from_list, from_tensor)
    enc, unet = module.net.cond_stage_model.single, module.net.model.diffusion_model
    with torch.no_grad():
        cond, null = enc(torch.tensor(values)), enc(enc.null_like(torch.tensor(values)))

        def denoise(x, t):
            u = unet(x, t, context=null)
            return u + module.net.guidance_scale * (unet(x, t, context=cond) - u)

        want = run_sampler(module, denoise, x_T)
    torch.testing.assert_close(from_list, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["class", "attributes", "none"])
def test_train_fast_dev_run_every_conditioning(train_cfg, vae_ckpt, tmp_path, kind):
    overrides = [f"model/conditioning={kind}", "+debug=fdr", "trainer.detect_anomaly=false",
                 "model.sample_every_n_steps=1", "model.sampler.steps=2", "model.num_log_samples=3"]
    if kind == "class":
        overrides += ["model.conditioning.num_classes=24", "model.log_conditions=[0,7,23]"]
    if kind == "attributes":
        overrides += ["model.log_conditions=[[0,1,4,2],[3,5,0,1],[1,2,3,0]]"]
    if kind == "none":
        overrides += ["model.unet.context_dim=null", "model.unet.use_spatial_transformer=false",
                      "model.log_conditions=null"]
    base = [o for o in quickstart(vae_ckpt, callbacks=False) if not o.startswith("model.conditioning.")]
    metrics, objects = train(train_cfg(base + overrides))
    model = objects["model"]
    assert model.condition_keys == {"class": ["label"], "attributes": ["attributes"], "none": []}[kind]
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    grids = list((tmp_path / "images").glob("samples_*.png"))
    assert len(grids) == 1  # the sample grid of step 1


# ------------------------------------------------------------------------------ 6. checkpoint keys and hparams
def primitive(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and primitive(v) for k, v in value.items())
    if isinstance(value, list):
        return all(primitive(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_checkpoint_keys_are_compvis_and_load_weights_only(tmp_path):
    module = tiny_ldm(scale_factor=None)
    trainer = tiny_trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(module, shapes_loader(4, 4))
    path = tmp_path / "ldm.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model", "model_ema",
                                              "scale_factor", "shift_factor"}
    for key in ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.0.0.in_layers.0.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.conv_in.weight", "first_stage_model.quant_conv.weight",
                "first_stage_model.post_quant_conv.weight", "first_stage_model.decoder.conv_out.weight"]:
        assert key in sd, key
    assert all(not k.startswith("model.") or k.startswith("model.diffusion_model.") for k in sd)
    assert sd["scale_factor"].shape == () and float(sd["scale_factor"]) == float(module.net.scale_factor)
    assert primitive(ckpt["hyper_parameters"])
    hp = ckpt["hyper_parameters"]
    assert hp["unet_config"]["context_dim"] == CONTEXT_DIM and hp["first_stage_config"]["ch_mult"] == [1, 2, 2]
    assert hp["condition_key"] == "text" and hp["prediction_type"] == "eps"
    # the weights load into a fresh module with every key accounted for
    fresh = tiny_ldm(seed=1)
    fresh.load_state_dict(sd, strict=True)
    assert float(fresh.net.scale_factor) == float(module.net.scale_factor)


# ------------------------------------------------------------------------------------------ 7. val and NaNs
def test_validation_logs_loss_and_timestep_buckets(tmp_path):
    module = tiny_ldm(timestep_buckets=4)
    val = shapes_loader(16, 8, split="val")
    trainer = tiny_trainer(tmp_path, limit_val_batches=None)
    metrics = trainer.validate(module, val, verbose=False)[0]
    names = module.net.objective.bucket_names(4)
    assert names == ["val/loss_t0000-0249", "val/loss_t0250-0499", "val/loss_t0500-0749", "val/loss_t0750-0999"]
    # recomputed: the same seeded generators per batch, grouped by the closed-form bucket of each t
    sums, counts, all_losses = torch.zeros(4, dtype=torch.float64), torch.zeros(4), []
    with torch.no_grad():
        for i, batch in enumerate(val):
            losses, t = module.net.losses(batch, torch.Generator().manual_seed(1000 + i))
            all_losses.append(losses)
            for loss, step in zip(losses.tolist(), t.tolist()):
                sums[step // 250] += loss
                counts[step // 250] += 1
    assert metrics["val/loss"] == pytest.approx(torch.cat(all_losses).mean().item(), rel=1e-5)
    for k, name in enumerate(names):
        if counts[k]:
            assert metrics[name] == pytest.approx((sums[k] / counts[k]).item(), rel=1e-5)
        else:
            assert name not in metrics
    assert sum(name in metrics for name in names) >= 2
    again = trainer.validate(module, val, verbose=False)[0]
    assert again == metrics  # fixed noise and timesteps: the same numbers on every evaluation
    assert DDPM(NoiseSchedule.make("linear", 10)).bucket_names(3) == [
        "val/loss_t0000-0003", "val/loss_t0004-0006", "val/loss_t0007-0009"]


class NaNImages(torch.utils.data.Dataset):
    def __init__(self, n: int, nan_at: tuple[int, ...]):
        self.data, self.nan_at = ShapesDataset("train", n, image_size=SIZE), nan_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        if i in self.nan_at:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = tiny_ldm()
    rec = StepRecorder()
    trainer = tiny_trainer(tmp_path, callbacks=[rec], logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(NaNImages(12, nan_at=(5,)), batch_size=4))
    assert module.guard.skips == 1 and module.guard.in_a_row == 0
    # Lightning still counts the step of the skipped batch, but nothing moved and the EMA was not updated
    assert len(rec.after_step) == 3 and int(module.model_ema.n_averaged) == 2
    assert all(torch.equal(a, b) for a, b in zip(rec.after_step[0], rec.after_step[1]))
    assert not all(torch.equal(a, b) for a, b in zip(rec.after_step[1], rec.after_step[2]))
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    assert [float(r["train/nonfinite_skips"]) for r in rows if r.get("train/nonfinite_skips")] == [0.0, 1.0, 1.0]


def test_consecutive_nonfinite_losses_raise(tmp_path):
    module = tiny_ldm(max_nonfinite_steps=3)
    loader = torch.utils.data.DataLoader(NaNImages(20, nan_at=(1, 4, 8, 12)), batch_size=4)
    with pytest.raises(FloatingPointError, match=r"3 non-finite losses in a row \(max_nonfinite_steps=3\)"):
        tiny_trainer(tmp_path).fit(module, loader)
    assert module.guard.skips == 3


# ------------------------------------------------------------------------------------------------ 8. configs
@pytest.mark.parametrize("experiment", ["quickstart_ldm", "digits_ldm", "sd15", "sd21"])
def test_experiment_configs_compose(train_cfg, experiment):
    import open_clip

    cfg = train_cfg([f"+experiment={experiment}", "model.first_stage.ckpt=/nowhere/vae.ckpt"])
    OmegaConf.resolve(cfg)
    model = cfg.model
    assert model._target_ == "sdlight.stages.diffusion.LatentDiffusion"
    assert model.image_size == cfg.data.image_size
    unet, cond = model.unet, model.conditioning
    f = 2 ** (len(model.first_stage.autoencoder.ch_mult) - 1) if model.first_stage.autoencoder else 4
    assert cfg.data.image_size % (f * 2 ** (len(unet.channel_mult) - 1)) == 0  # latents divide through the UNet
    if cond._target_.endswith("OpenCLIPTextEncoder"):
        width = open_clip.get_model_config(cond.arch)["text_cfg"]["width"]
        assert unet.context_dim == width
    elif not cond._target_.endswith("NoConditioning"):
        assert unet.context_dim == cond.get("context_dim", cond.get("embed_dim"))
    if experiment in ("sd15", "sd21"):
        assert model.scale_factor == 0.18215 and model.first_stage.autoencoder.embed_dim == 4
        assert model.prediction_type == ("v" if experiment == "sd21" else "eps")
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("experiment", ["quickstart_ldm", "digits_ldm"])
def test_cpu_experiments_instantiate(train_cfg, vae_ckpt, experiment):
    import hydra

    cfg = train_cfg([f"+experiment={experiment}", f"model.first_stage.ckpt={vae_ckpt}"])
    model = hydra.utils.instantiate(cfg.model)
    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert isinstance(model, LatentDiffusion) and model.net.latent_shape == (4, 8, 8)
    assert model.condition_keys == (["text"] if experiment == "quickstart_ldm" else ["label"])
    assert model.condition_keys[0] in batch
    with torch.no_grad():
        losses, _ = model.net.losses({k: v[:2] for k, v in batch.items()})
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    images = model.generate(model.log_conditions[:2], steps=2)
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_option_reaches_every_unet_block(train_cfg, vae_ckpt, enabled):
    from hydra.utils import instantiate

    from sdlight.nn.attention import BasicTransformerBlock
    from sdlight.nn.unet import ResBlock

    # the quickstart UNet config says use_checkpoint: false; the option overrides it either way
    cfg = train_cfg(quickstart(vae_ckpt) + [f"model.gradient_checkpointing={enabled}",
                                            f"model.unet.use_checkpoint={not enabled}"])
    unet = instantiate(cfg.model).net.model.diffusion_model
    flags = [m.use_checkpoint if isinstance(m, ResBlock) else m.checkpoint for m in unet.modules()
             if isinstance(m, (ResBlock, BasicTransformerBlock))]
    assert len(flags) > 4 and set(flags) == {enabled}
