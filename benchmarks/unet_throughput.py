"""UNet training throughput: sdlight's UNetModel against diffusers' UNet2DConditionModel at equal architecture.

    python -m benchmarks.unet_throughput --config tiny --batch 16 --iters 10            # CPU
    python -m benchmarks.unet_throughput --config sd15 --batch 8 --device cuda --dtype bf16

Both networks get the same weights (ours converted with diffusers' own SD converter) and the same inputs; the
script checks the outputs agree before timing forward+backward, and reports samples/s, the peak memory (CUDA),
and for CUDA an estimate of model FLOP utilisation (MFU) from a counted forward (torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import build_unet, diffusers_unet

PEAK_TFLOPS = {"bf16": {"H100": 989.0, "H200": 989.0, "A100": 312.0}, "fp32": {"H100": 67.0, "A100": 19.5}}


def timed(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, cudnn autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="a conf/model/unet option: tiny, sd15, sd21")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--gpu-name", default="H100", help="for the MFU estimate")
    args = ap.parse_args()
    device = torch.device(args.device)
    ours, params = build_unet(args.config)  # randomised: zero-initialised layers would make the check vacuous
    size, ctx_dim = params["image_size"], params["context_dim"]
    theirs = diffusers_unet(ours, params)
    x = torch.randn(args.batch, ours.config["in_channels"], size, size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, 77, ctx_dim, device=device)
    ours, theirs = ours.to(device), theirs.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    with torch.no_grad(), autocast:
        a, b = ours(x, t, context=ctx), theirs(x, t, encoder_hidden_states=ctx).sample
    rel = ((a.float() - b.float()).norm() / b.float().norm()).item()

    def step(model, call):
        def run():
            with autocast:
                out = call(model)
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    results = {}
    for name, model, call in [("sdlight", ours, lambda m: m(x, t, context=ctx)),
                              ("diffusers", theirs, lambda m: m(x, t, encoder_hidden_states=ctx).sample)]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(step(model, call), args.iters, device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[name] = (args.batch / sec, mem)

    flops = None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
            ours(x, t, context=ctx)
        flops = 3 * counter.get_total_flops() / args.batch  # forward + backward ≈ 3× forward
    except Exception:  # flop counting is best-effort
        pass

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"config={args.config} params={params:.1f}M batch={args.batch} device={device} dtype={args.dtype} "
          f"rel_err_vs_diffusers={rel:.2e}")
    for name, (ips, mem) in results.items():
        line = f"  {name:9s} {ips:8.2f} samples/s"
        if device.type == "cuda":
            line += f"  peak {mem:.2f} GiB"
            peak = PEAK_TFLOPS.get(args.dtype, {}).get(args.gpu_name)
            if flops and peak:
                line += f"  MFU {100 * ips * flops / (peak * 1e12):.1f}%"
        print(line)
    if flops:
        print(f"  train FLOPs/sample ≈ {flops / 1e9:.2f} GFLOP")


if __name__ == "__main__":
    main()
