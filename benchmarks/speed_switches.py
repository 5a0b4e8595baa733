"""Each speed switch alone and all together, on one UNet training step (forward, backward, AdamW step), against
diffusers' UNet at the same architecture and weights, alternated in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.speed_switches --unet tiny --batch 64
    OMP_NUM_THREADS=1 python -m benchmarks.speed_switches --vae kl_f4_tiny --batch 16   # VAE forward + backward

Switches: ``onednn`` (sdlight's linear layers on oneDNN's matmul instead of MKL's sgemm, float32 CPU),
``channels_last`` (memory format of weights and inputs), ``foreach`` / ``fused`` AdamW, ``compile`` (torch.compile
through inductor: CPU C++ / GPU Triton), ``checkpoint`` (activation checkpointing; saves memory, costs time).
``eager`` is none of them; ``defaults`` is what the stages do on a CPU (``onednn+fused``). SDPA is always on
(``F.scaled_dot_product_attention`` in both implementations).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (alternate, build_unet, build_vae, diffusers_unet, diffusers_vae, rel_error)
from sdlight.nn.linear import set_onednn_linear


def flag_set(variant: str) -> set[str]:
    flags = set(variant.split("+"))
    return flags | {"onednn", "fused"} if "defaults" in flags else flags


def with_linear_kernel(flags: set[str], step):
    """The step with sdlight's linear layers on oneDNN or not (a process-wide switch, set before each run)."""
    def run():
        set_onednn_linear("onednn" in flags)
        step()
    return run


def switched(model: torch.nn.Module, parts: list[torch.nn.Module], flags: set[str], x: torch.Tensor):
    """The model, its input and an AdamW with the switches in ``flags`` applied (compile: each of ``parts``)."""
    if "channels_last" in flags:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach="foreach" in flags or None,
                            fused="fused" in flags or None)
    if "compile" in flags:
        for part in parts:
            part.compile(dynamic=False)  # as sdlight.nn.speed.speed_up
    return model, x, opt


def unet_steps(name: str, batch: int, device: torch.device, variants: list[str]) -> dict:
    ours_ref, params = build_unet(name)
    theirs = diffusers_unet(ours_ref, params).to(device)
    size, ctx_dim = params["image_size"], params["context_dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, params["in_channels"], size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g).to(device)

    def make(variant: str):
        flags = flag_set(variant)
        model, _ = build_unet(name, use_checkpoint="checkpoint" in flags)
        model, xin, opt = switched(model.to(device), [model], flags, x)

        def step():
            out = model(xin, t, context=ctx)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return with_linear_kernel(flags, step), model

    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=ctx).sample
    steps = {}
    for v in variants:
        fn, model = make(v)
        with torch.no_grad():
            err = rel_error(model(x, t, context=ctx), ref)
        print(f"  {v}: rel. error vs diffusers {err:.1e}", flush=True)
        steps[v] = fn
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def diffusers_step():
        theirs(x, t, encoder_hidden_states=ctx).sample.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps["diffusers"] = diffusers_step
    return steps


def vae_steps(name: str, batch: int, device: torch.device, variants: list[str]) -> dict:
    ours_ref, params = build_vae(name)
    theirs = diffusers_vae(ours_ref, params).to(device)
    res = params["resolution"]
    x = torch.randn(batch, params["in_channels"], res, res, generator=torch.Generator().manual_seed(1)).to(device)

    def make(variant: str):
        flags = flag_set(variant)
        model, _ = build_vae(name)
        model.set_gradient_checkpointing("checkpoint" in flags)
        model, xin, opt = switched(model.to(device), [model.encoder, model.decoder], flags, x)

        def step():
            rec, post = model(xin, sample_posterior=False)
            (rec.float().abs().mean() + 1e-6 * post.kl().mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step  # no linear layers in the VAE: onednn changes nothing here

    steps = {v: make(v) for v in variants}
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def diffusers_step():
        post = theirs.encode(x).latent_dist
        rec = theirs.decode(post.mode()).sample
        (rec.float().abs().mean() + 1e-6 * post.kl().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps["diffusers"] = diffusers_step
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", default=None, help="a conf/model/unet option")
    ap.add_argument("--vae", default=None, help="a conf/model/autoencoder option without attn_resolutions")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="eager,onednn,fused,defaults,channels_last,foreach,compile,checkpoint,"
                                          "compile+fused")
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = args.variants.split(",")
    if args.vae:
        what, steps = f"VAE {args.vae}", vae_steps(args.vae, args.batch, device, variants)
    else:
        what, steps = f"UNet {args.unet or 'tiny'}", unet_steps(args.unet or "tiny", args.batch, device, variants)
    res = alternate(steps, rounds=args.rounds, iters=args.iters, warmup=2, device=device)
    base = res["diffusers"].median
    print(f"{what}, batch {args.batch}, {device}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds x {args.iters} steps")
    print("| variant | ms/step (median) | fastest round | vs diffusers (medians) | peak MiB |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {1000 * r.median:.1f} | {1000 * min(r.seconds):.1f} | {r.median / base:.2f}x | "
              f"{r.peak_bytes / 2**20:.0f} |")


if __name__ == "__main__":
    main()
