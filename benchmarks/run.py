"""All CPU/GPU benchmarks against diffusers in one process, one table: sdlight's time per step over diffusers' at the
same architecture and weights (below 1: sdlight is faster), A/B alternated, and the peak memory per sample.

    OMP_NUM_THREADS=1 python -m benchmarks.run                        # quickstart and mid size, CPU
    OMP_NUM_THREADS=1 python -m benchmarks.run --sizes quickstart --rounds 3
    python -m benchmarks.run --device cuda --dtype bf16
    python -m benchmarks.run --sizes quickstart --benches unet --profile 12   # where each side's step goes, by op
    python -m benchmarks.run --benches unet --gradient-checkpointing       # memory against time, both sides

Benchmarks (each ours vs diffusers, same weights: ours converted with diffusers' converters for SD files):
- ``unet``: UNet forward + backward + AdamW step on random latents and contexts.
- ``mmdit`` / ``dit``: the same step for SD3's MMDiT and PixArt-α's DiT against ``SD3Transformer2DModel`` /
  ``PixArtTransformer2DModel`` (weights through sdlight's export mapping).
- ``vae``: one stage-1 batch: generator loss (L1 + LPIPS with a random-init VGG trunk + KL + PatchGAN with the
  adaptive weight) and its step with the discriminator frozen, then the discriminator's loss and step; the same
  loss networks for both. diffusers ships no stage-1 loss: its side computes CompVis' ``LPIPSWithDiscriminator``
  way (``single_backward=False``: LPIPS and the discriminator back-propagated twice), sdlight's as its stage does
  (once; ``--two-pass-loss`` for CompVis' way on both sides).
- ``stage2``: one stage-2 step end to end: the next shapes batch, VAE encoding, text encoding (the same learned
  text encoder), noising, eps loss, backward, AdamW step, EMA update (diffusers: ``EMAModel``).
- ``ddim``: 50 DDIM steps with classifier-free guidance (scale 3, both branches in one batch) and decoding.

The ``sdlight`` side runs as its stages do: on a CPU its linear layers on oneDNN's matmul where that is this
processor's default (``sdlight.nn.linear``: measured once per machine) and a fused AdamW for float32 weights
(``sdlight.optim.build_optimizer``), the VAE NHWC in the stage-1
step (``channels_last: null``), which ``--no-onednn-linear``, ``--no-fused`` and ``--vae-nchw`` turn off, plus the
switches given (``--compile``, ``--channels-last``); diffusers runs as its training scripts do (eager, default
AdamW). Peak memory: CUDA's max allocated, or on a CPU the
resident set's rise during the timed steps (sampled; an estimate), divided by the batch.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import (alternate, build_unet, build_vae, config, diffusers_unet, diffusers_vae, randomize_,
                               rel_error)
from sdlight.nn.linear import onednn_linear_active, set_onednn_linear
from sdlight.nn.speed import speed_up
from sdlight.optim import build_optimizer

SIZES = {
    # the quickstart: 32 px shapes, kl_f4_tiny VAE (8x8x4 latents), the tiny UNet, the learned text encoder
    "quickstart": dict(vae=dict(), unet=dict(), unet_batch=64, vae_batch=16, sample_batch=8,
                       mmdit=dict(), dit=dict(), latent=8),
    # mid: 128 px through an f=8 VAE (16x16x4 latents), a 128-channel UNet with mult 1-2-4
    "mid": dict(vae=dict(ch=64, ch_mult=[1, 2, 4, 4], resolution=128),
                unet=dict(image_size=16, model_channels=128, channel_mult=[1, 2, 4], attention_resolutions=[2, 4],
                          num_head_channels=64, context_dim=256),
                unet_batch=8, vae_batch=4, sample_batch=4,
                # transformers on the same 16x16x4 latents: 64 tokens of 2x2 patches, 384 wide, 6 blocks
                mmdit=dict(depth=6, num_heads=6, hidden=384, pos_embed_max_size=32, context_dim=256, pooled_dim=256),
                dit=dict(input_size=16, depth=6, num_heads=6, hidden=384, context_dim=256), latent=16),
}


def our_switches(modules, opt_kwargs: dict, args) -> None:
    speed_up(modules, compile=args.compile, channels_last=args.channels_last)
    if args.no_fused:
        opt_kwargs["fused"] = False  # an explicit choice: torch's default kernel


# --------------------------------------------------------------------------------------------------- unet step
def bench_unet(size: dict, args, device: torch.device):
    ours, params = build_unet(**size["unet"])
    theirs = diffusers_unet(ours, params).to(device)
    ours = ours.to(device)
    b, g = size["unet_batch"], torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, params["image_size"], params["image_size"], generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    ctx = torch.randn(b, 77, params["context_dim"], generator=g).to(device)
    with torch.no_grad():
        err = rel_error(ours(x, t, context=ctx), theirs(x, t, encoder_hidden_states=ctx).sample)
    kw: dict = {}
    our_switches([ours], kw, args)
    if args.gradient_checkpointing:  # both sides: every block recomputed in the backward pass
        ours.set_gradient_checkpointing(True)
        theirs.enable_gradient_checkpointing()
    def step(model, call, opt):
        def run():
            out = call(model)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    return err, b, {
        "sdlight": step(ours, lambda m: m(x, t, context=ctx),
                        build_optimizer(partial(torch.optim.AdamW, lr=1e-4, **kw), ours.parameters())),
        "diffusers": step(theirs, lambda m: m(x, t, encoder_hidden_states=ctx).sample,
                          torch.optim.AdamW(theirs.parameters(), 1e-4)),
    }


# ------------------------------------------------------------------------------------- transformer backbones
def bench_transformer(kind: str, size: dict, args, device: torch.device):
    """MMDiT (SD3) or DiT (PixArt-α) forward + backward + AdamW step against diffusers' SD3Transformer2DModel /
    PixArtTransformer2DModel with the same weights (sdlight's export mapping)."""
    import diffusers

    from sdlight.convert_transformer import diffusers_transformer
    from sdlight.nn.dit import DiT
    from sdlight.nn.mmdit import MMDiT

    params = {**config("unet", f"{kind}_tiny"), **size[kind], "use_checkpoint": False}
    torch.manual_seed(0)
    ours = randomize_((MMDiT if kind == "mmdit" else DiT)(**params))
    weights, cfg = diffusers_transformer(ours, size["latent"])
    theirs = getattr(diffusers, cfg["_class_name"]).from_config({k: v for k, v in cfg.items() if k[0] != "_"})
    theirs.load_state_dict(weights, strict=True)
    ours, theirs = ours.to(device), theirs.to(device)
    b, g, side = size["unet_batch"], torch.Generator().manual_seed(1), size["latent"]
    x = torch.randn(b, 4, side, side, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 1000).to(device)  # sigma · 1000 (rectified flow), or DDPM's timesteps
    ctx = torch.randn(b, 77, params["context_dim"], generator=g).to(device)
    if kind == "mmdit":
        y = torch.randn(b, params["pooled_dim"], generator=g).to(device)
        call_ours = lambda m: m(x, t, context=ctx, y=y)  # noqa: E731
        call_theirs = lambda m: m(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,  # noqa: E731
                                  return_dict=False)[0]
    else:
        call_ours = lambda m: m(x, t, context=ctx)  # noqa: E731
        call_theirs = lambda m: m(x, encoder_hidden_states=ctx, timestep=t, return_dict=False,  # noqa: E731
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})[0]
    with torch.no_grad():
        err = rel_error(call_ours(ours), call_theirs(theirs))
    kw: dict = {}
    our_switches([ours], kw, args)
    if args.gradient_checkpointing:
        ours.set_gradient_checkpointing(True)
        theirs.enable_gradient_checkpointing()

    def step(model, call, opt):
        def run():
            call(model).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    return err, b, {
        "sdlight": step(ours, call_ours, build_optimizer(partial(torch.optim.AdamW, lr=1e-4, **kw), ours.parameters())),
        "diffusers": step(theirs, call_theirs, torch.optim.AdamW(theirs.parameters(), 1e-4)),
    }


# ---------------------------------------------------------------------------------------------------- vae step
def bench_vae(size: dict, args, device: torch.device):
    from sdlight.losses import LPIPS, AutoencoderLoss
    from sdlight.nn.discriminator import NLayerDiscriminator
    from sdlight.nn.speed import allow_retained_graphs

    ours, params = build_vae(**size["vae"])
    theirs = diffusers_vae(ours, params).to(device)
    ours = ours.to(device)
    b, res = size["vae_batch"], params["resolution"]
    x = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1

    def loss_module(single_backward: bool):
        torch.manual_seed(0)  # the same discriminator and LPIPS for both sides
        return AutoencoderLoss(NLayerDiscriminator(3, ndf=64, n_layers=3), partial(LPIPS, pretrained=False),
                               perceptual_weight=1.0, disc_start=0, disc_warmup_steps=0,
                               single_backward=single_backward).to(device)

    with torch.no_grad():
        err = rel_error(ours(x, sample_posterior=False)[0], theirs.decode(theirs.encode(x).latent_dist.mode()).sample)
    kw: dict = {}
    if args.compile:
        allow_retained_graphs()  # as the stage does: the adaptive weight differentiates the decoder twice
    our_switches([ours.encoder, ours.decoder], kw, args)
    speed_up([ours], channels_last=device.type == "cpu" and not args.vae_nchw)  # the stage's CPU default (null)

    def step(encode_decode, model, last_layer, make_opt, single_backward):
        loss = loss_module(single_backward)
        opt_g = make_opt(partial(torch.optim.Adam, lr=4.5e-6),
                         list(model.parameters()) + list(loss.generator_parameters()))
        opt_d = make_opt(partial(torch.optim.Adam, lr=4.5e-6), loss.discriminator_parameters())

        def run():
            loss.discriminator.requires_grad_(False)  # as the stage (and CompVis' toggled optimizers): G's step
            rec, post = encode_decode(x)
            loss_g, _ = loss(x, rec, post, part="generator", global_step=1, last_layer=last_layer())
            loss_g.backward()
            loss.discriminator.requires_grad_(True)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            loss_d, _ = loss(x, rec.detach(), post, part="discriminator", global_step=1)
            loss_d.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        return run

    def theirs_fn(img):
        post = theirs.encode(img).latent_dist
        return theirs.decode(post.sample()).sample, post

    return err, b, {
        "sdlight": step(lambda img: ours(img), ours, ours.get_last_layer,
                        lambda factory, params: build_optimizer(partial(factory, **kw), params),
                        single_backward=not args.two_pass_loss),
        # diffusers ships no stage-1 loss: CompVis' LPIPSWithDiscriminator computation (two extra backward passes)
        "diffusers": step(theirs_fn, theirs, lambda: theirs.decoder.conv_out.weight,
                          lambda factory, params: factory(params), single_backward=False),
    }


# ------------------------------------------------------------------------------------------- stage-2 end to end
def latent_diffusion(size: dict, args, device: torch.device):
    from sdlight.conditioning import LearnedTextEncoder
    from sdlight.diffusion import NoiseSchedule
    from sdlight.diffusion.samplers import sample_ddim
    from sdlight.stages.diffusion import LatentDiffusion

    unet, params = build_unet(**size["unet"])
    vae, vae_params = build_vae(**size["vae"])
    torch.manual_seed(0)
    text = randomize_(LearnedTextEncoder(max_length=32, width=128, layers=2, heads=4,
                                         context_dim=params["context_dim"]))
    kw: dict = {"fused": False} if args.no_fused else {}
    module = LatentDiffusion(unet=unet, schedule=NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012),
                             conditioning=text, first_stage=vae, optimizer=partial(torch.optim.AdamW, lr=1e-4, **kw),
                             sampler=partial(sample_ddim, steps=50), scale_factor=0.5, ema_decay=0.9999,
                             image_size=vae_params["resolution"], p_uncond=0.1, compile=args.compile,
                             channels_last=args.channels_last).to(device)
    module.setup("fit")
    return module, params, vae_params


def diffusers_side(module, params: dict, vae_params: dict, device: torch.device):
    from diffusers import DDIMScheduler, DDPMScheduler

    theirs_unet = diffusers_unet(module.net.model.diffusion_model, params).to(device)
    theirs_vae = diffusers_vae(module.net.first_stage_model, vae_params).to(device).requires_grad_(False)
    text = copy.deepcopy(module.net.cond_stage_model.single)  # the text encoder itself: captions → context
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, steps_offset=1, timestep_spacing="leading")
    # sdlight's DDIM ends at alpha_bar = 1 (x0 itself)
    return theirs_unet, theirs_vae, text, DDPMScheduler(**sched), DDIMScheduler(**sched, set_alpha_to_one=True)


def bench_stage2(size: dict, args, device: torch.device):
    from diffusers.training_utils import EMAModel

    from sdlight.data.shapes import ShapesDataset

    module, params, vae_params = latent_diffusion(size, args, device)
    theirs_unet, theirs_vae, text, noise_sched, _ = diffusers_side(module, params, vae_params, device)
    b = size["unet_batch"]
    data = ShapesDataset("train", 100_000, image_size=vae_params["resolution"], seed=0)
    ours_batches = iter(torch.utils.data.DataLoader(data, batch_size=b))
    theirs_batches = iter(torch.utils.data.DataLoader(data, batch_size=b))
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    module.train()

    def ours_step():
        batch = next(ours_batches)
        batch["image"] = batch["image"].to(device)
        module.net.losses(batch, p_uncond=module.p_uncond)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.model_ema.update_parameters(module._ema_parts)

    # as diffusers' train_text_to_image.py: AdamW over UNet and text encoder, EMAModel of the UNet
    trained = list(theirs_unet.parameters()) + list(text.parameters())
    theirs_opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.01)
    ema = EMAModel(theirs_unet.parameters(), decay=0.9999)

    def theirs_step():
        batch = next(theirs_batches)
        with torch.no_grad():
            z = theirs_vae.encode(batch["image"].to(device)).latent_dist.sample() * 0.5
        captions = [c if torch.rand(()) > 0.1 else "" for c in batch["text"]]
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (z.shape[0],), device=device)
        pred = theirs_unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=text(captions)).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)
        ema.step(theirs_unet.parameters())

    return float("nan"), b, {"sdlight": ours_step, "diffusers": theirs_step}


# ------------------------------------------------------------------------------------------------ DDIM-50 + CFG
def bench_ddim(size: dict, args, device: torch.device):
    module, params, vae_params = latent_diffusion(size, args, device)
    module.eval()
    theirs_unet, theirs_vae, text, _, ddim = diffusers_side(module, params, vae_params, device)
    b, scale = size["sample_batch"], 3.0
    prompts = ["a red circle in the center on a white background"] * b
    x_T = torch.randn(b, *module.net.latent_shape, generator=torch.Generator().manual_seed(2)).to(device)

    def ours():
        return module.generate(prompts, steps=50, guidance_scale=scale, x_T=x_T, use_ema=False)

    @torch.no_grad()
    def theirs():
        ctx = text(["" for _ in prompts] + prompts)
        ddim.set_timesteps(50)
        x = x_T.clone()
        for t in ddim.timesteps:
            eps_u, eps_c = theirs_unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = ddim.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
        return theirs_vae.decode(x / 0.5).sample.clamp(-1, 1)

    err = rel_error(ours(), theirs())
    return err, b, {"sdlight": ours, "diffusers": theirs}


BENCHES = {"unet": bench_unet, "mmdit": partial(bench_transformer, "mmdit"), "dit": partial(bench_transformer, "dit"),
           "vae": bench_vae, "stage2": bench_stage2, "ddim": bench_ddim}


def under_bf16(step, device: torch.device):
    """``step`` run under bfloat16 autocast (as ``trainer.precision=bf16-mixed`` runs a training step)."""
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step()
    return run


def op_table(steps: dict, top: int) -> str:
    """Where one step of each side spends its time: self time per op (ms), the ``top`` ops of either side."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    for side, fn in steps.items():
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                per_op.setdefault(e.key, {})[side] = e.self_cpu_time_total / 1e3
    order = sorted(per_op, key=lambda k: -max(per_op[k].values()))[:top]
    lines = ["| op | " + " | ".join(f"{side} ms" for side in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| `{k}` | " + " | ".join(f"{per_op[k].get(side, 0):.1f}" for side in steps) + " |" for k in order]
    totals = {side: sum(v.get(side, 0) for v in per_op.values()) for side in steps}
    lines.append("| all ops | " + " | ".join(f"{totals[side]:.1f}" for side in steps) + " |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="quickstart,mid")
    ap.add_argument("--benches", default=",".join(BENCHES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: every step of both sides under bfloat16 autocast (float32 weights)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="torch's default Adam / AdamW kernel on the CPU too")
    ap.add_argument("--no-onednn-linear", action="store_true", help="sdlight's linear layers on MKL (F.linear)")
    ap.add_argument("--two-pass-loss", action="store_true",
                    help="sdlight's stage-1 loss in CompVis' order (single_backward=False)")
    ap.add_argument("--vae-nchw", action="store_true", help="sdlight's VAE step without channels_last on a CPU")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="the unet benchmark with per-block gradient checkpointing on both sides")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, each side's N most expensive ops in one profiled step (torch.profiler)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.no_onednn_linear:  # else this CPU's default (sdlight.nn.linear); diffusers' layers never take it
        set_onednn_linear(False)
    cpu_defaults = [name for name, on in (("onednn_linear", onednn_linear_active()), ("fused", not args.no_fused),
                                          ("vae_channels_last", not args.vae_nchw)) if on and device.type == "cpu"]
    cpu_defaults += [] if args.two_pass_loss else ["single_backward_loss"]
    switches = cpu_defaults + [s for s in ("compile", "channels_last", "gradient_checkpointing")
                               if getattr(args, s)] or ["none"]
    rows = []
    for size_name in args.sizes.split(","):
        for bench in args.benches.split(","):
            torch._dynamo.reset()  # compiled code of the previous size would make dynamo try symbolic shapes
            err, batch, steps = BENCHES[bench](SIZES[size_name], args, device)
            if args.dtype == "bf16":
                steps = {side: under_bf16(fn, device) for side, fn in steps.items()}
            res = alternate(steps, rounds=args.rounds, iters=args.iters, warmup=2 if args.compile else 1,
                            device=device)
            ours, theirs = res["sdlight"], res["diffusers"]
            # paired by round: each ratio compares two runs seconds apart, under about the same load
            ratios = sorted(a / b for a, b in zip(ours.seconds, theirs.seconds))
            rows.append((size_name, bench, batch, 1000 * ours.median, 1000 * theirs.median,
                         statistics.median(ratios), ratios[0], ratios[-1], ours.peak_bytes / batch / 2**20,
                         theirs.peak_bytes / batch / 2**20, err))
            print(f"{size_name} {bench}: {rows[-1][5]:.2f}x", flush=True)
            if args.profile:
                print(op_table(steps, args.profile), flush=True)
    print(f"\n{datetime.date.today()}, {machine(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.dtype}, sdlight switches: {'+'.join(switches)}, "
          f"{args.rounds} rounds x {args.iters} alternated\n")
    print("| size | benchmark | batch | sdlight ms | diffusers ms | ratio (median of rounds) | range | "
          "sdlight MiB/sample | diffusers MiB/sample | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | **{r[5]:.2f}x** | {r[6]:.2f}-{r[7]:.2f} | "
              f"{r[8]:.1f} | {r[9]:.1f} | {'—' if r[10] != r[10] else f'{r[10]:.1e}'} |")


if __name__ == "__main__":
    main()
