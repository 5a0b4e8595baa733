"""GPU suite: SD-1.5, SD-2-base, SD-XL UNet and SD3-medium MMDiT training at 256² and 512² in bf16, eager and
compiled, and 50-step sampling.

    bash benchmarks/gpu.sh                      # = python -m benchmarks.gpu; writes benchmarks/gpu_results.md
    python -m benchmarks.gpu --device cpu --configs tiny --resolutions 64 --iters 1 --sample-steps 2 --no-compile

For each backbone (``conf/model/unet/sd15``, ``sd21``: SD 2 base and 768 share the UNet; ``sdxl`` with its
2816-wide vector; ``mmdit_sd3_medium`` on 16-channel latents with SD3's 333 context tokens and pooled vector) and
resolution: images/s of a training step (forward + backward + fused AdamW step, bf16 autocast over float32
weights, 77-token contexts for the UNets; a step that runs out of memory is a row saying so),
model FLOPs utilisation against the card's *measured* bf16 matmul peak (an 8192² matmul, not the datasheet), and
peak memory; then 50 DDIM steps with classifier-free guidance (both branches in one batch) at 512², in it/s.
Compiled runs come last and are skipped (marked so in the table) when the longest one so far would overrun the
time budget (default 7 min), so the suite finishes unattended in under 8 minutes on one H100-class GPU. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from functools import partial
from pathlib import Path

import torch

BATCH = {256: 32, 512: 8, 64: 2}  # per resolution: fits SD-sized UNets in 80 GB without checkpointing


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def build(config: str, device: torch.device):
    """The backbone of ``conf/model/unet/<config>.yaml`` (UNet, MMDiT or DiT) and its constructor arguments."""
    from hydra.utils import get_class

    from benchmarks.common import config as read_config

    text = read_config("unet", config, keep_target=True)
    cls = get_class(text.pop("_target_"))
    params = {k: v for k, v in text.items() if not k.startswith("_")} | {"use_checkpoint": False}
    params.pop("use_fp16", None)
    torch.manual_seed(0)
    return cls(**params).to(device), params


def inputs(params: dict, b: int, lat: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Random latents (the backbone's channels) and its conditions: a context of 77 tokens (SD3: 77 CLIP + 256
    T5 tokens), and the vector input of a backbone that has one (SD-XL's 2816, SD3's pooled 2048)."""
    x = torch.randn(b, params["in_channels"], lat, lat, device=device)
    tokens = 333 if "pos_embed_max_size" in params else 77
    cond = {"context": torch.randn(b, tokens, params["context_dim"], device=device)}
    vector = params.get("adm_in_channels") or params.get("pooled_dim")
    if vector:
        cond["y"] = torch.randn(b, vector, device=device)
    return x, cond


def train_figures(config: str, res: int, compiled: bool, args, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    unet, params = build(config, device)
    b, lat = args.batch or BATCH.get(res, 8), res // 8
    x, cond = inputs(params, b, lat, device)
    t = torch.randint(0, 1000, (b,), device=device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast():
        unet(x[:1], t[:1], **{k: v[:1] for k, v in cond.items()})
    flops_per_image = 3 * counter.get_total_flops()  # forward + backward ≈ 3 forwards
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    if compiled:
        unet.compile(dynamic=False)  # as sdlight.nn.speed.speed_up

    def step():
        with autocast():
            loss = (unet(x, t, **cond).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_memory(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    ips = b * args.iters / (time.perf_counter() - start)
    out = dict(batch=b, ips=ips, tflops=ips * flops_per_image / 1e12, peak=peak_gib(device), warm=warm,
               params=sum(p.numel() for p in unet.parameters()) / 1e6)
    del unet, opt
    return out


def sampling_its(config: str, res: int, args, device: torch.device) -> float:
    from sdlight.diffusion import NoiseSchedule, cfg_denoiser
    from sdlight.diffusion.samplers import sample_ddim

    unet, params = build(config, device)
    unet.eval()
    x, cond = inputs(params, args.sample_batch, res // 8, device)
    denoise = cfg_denoiser(lambda x, t, c: unet(x, t, **c), cond, {k: torch.zeros_like(v) for k, v in cond.items()},
                           7.5)
    schedule = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)  # the step's cost, whatever the process
    with torch.autocast(device.type, dtype=torch.bfloat16):
        sample_ddim(denoise, x, schedule, steps=2)  # warm-up
        sync(device)
        start = time.perf_counter()
        sample_ddim(denoise, x, schedule, steps=args.sample_steps)
        sync(device)
    return args.sample_steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="sd15,sd21,sdxl,mmdit_sd3_medium")
    ap.add_argument("--resolutions", default="256,512")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 at 256², 8 at 512²")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; compiled runs beyond it are skipped")
    ap.add_argument("--out", default=str(Path(__file__).with_name("gpu_results.md")))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device visible: the GPU suite measures nothing here (run it on a machine with a GPU; "
              "`--device cpu --configs tiny --resolutions 64 --no-compile` checks the script itself).")
        return 0
    began = time.perf_counter()
    configs, resolutions = args.configs.split(","), [int(r) for r in args.resolutions.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = matmul_peak_tflops(device) if device.type == "cuda" else matmul_peak_tflops(device, n=512, iters=2)
    print(f"{name}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows, sample_rows = [], []

    def train_row(config: str, res: int, compiled: bool) -> None:
        torch._dynamo.reset()
        try:
            f = train_figures(config, res, compiled, args, device)
        except torch.OutOfMemoryError:
            rows.append(f"| {config} | {res}² | {'compiled' if compiled else 'eager'} | "
                        f"{args.batch or BATCH.get(res, 8)} | out of memory | | | |")
            print(rows[-1], flush=True)
            reset_memory(device)
            return
        rows.append(f"| {config} ({f['params']:.0f} M) | {res}² | {'compiled' if compiled else 'eager'} | "
                    f"{f['batch']} | {f['ips']:.1f} | {f['tflops']:.0f} | {100 * f['tflops'] / peak:.1f} % | "
                    f"{f['peak']:.1f} |")
        print(rows[-1], f"(warm-up {f['warm']:.0f} s)", flush=True)

    for config in configs:
        for res in resolutions:
            train_row(config, res, False)
    for config in configs:
        res = max(resolutions)
        its = sampling_its(config, res, args, device)
        sample_rows.append(f"| {config} | {res}² | {args.sample_batch} | {its:.1f} |")
        print(sample_rows[-1], flush=True)
    # compiled runs last: each costs its compilation (1-2 min for an SD UNet) on top of an eager run's time, so
    # one is started only when the longest so far still fits in the budget
    longest = 150.0
    for config in ([] if args.no_compile else configs):
        for res in resolutions:
            elapsed = time.perf_counter() - began
            if elapsed + longest > args.budget:
                rows.append(f"| {config} | {res}² | compiled | — | skipped: time budget ({elapsed:.0f} s used) "
                            "| | | |")
                continue
            start = time.perf_counter()
            train_row(config, res, True)
            longest = max(longest, time.perf_counter() - start)
    text = "\n".join([
        f"{datetime.date.today()}, {name}, torch {torch.__version__}, bf16 autocast, measured bf16 peak "
        f"{peak:.0f} TFLOP/s, {time.perf_counter() - began:.0f} s in all", "",
        "| backbone | resolution | mode | batch | images/s | TFLOP/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"{args.sample_steps}-step DDIM with classifier-free guidance (both branches in one batch), eager:", "",
        "| backbone | resolution | batch | it/s |", "|---|---|---|---|", *sample_rows, ""])
    Path(args.out).write_text(text)
    print("\n" + text + f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
