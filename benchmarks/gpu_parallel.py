"""Multi-GPU scaling of a training step: DDP and FSDP2 (``fully_shard`` per block, as ``trainer=fsdp`` shards) on
1 and N GPUs — images/s in all and per GPU, scaling efficiency against one GPU, peak memory per GPU.

    python -m benchmarks.gpu_parallel                       # every visible GPU (fewer than 2: says so, exits 0)
    python -m benchmarks.gpu_parallel --configs sd15 --resolution 512 --batch 8
    python -m benchmarks.gpu_parallel --device cpu --world 2 --configs tiny --resolution 64 --iters 1   # gloo

Each process runs the step of ``benchmarks/gpu.py`` (bf16 autocast over float32 weights, fused AdamW on CUDA) on
its own batch of ``--batch`` (the global batch grows with the world, as in data-parallel training); the gradients
are all-reduced (DDP) or reduce-scattered (FSDP2) as in training.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, mode: str, config: str, args, results) -> None:
    from benchmarks.gpu import build, inputs, peak_gib, reset_memory, sync
    from sdlight.stages.sharding import sharding_units

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model, params = build(config, device)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for unit in sharding_units(model):  # each block, then the backbone itself
                fully_shard(unit, mesh=mesh)
        b = args.batch
        x, cond = inputs(params, b, args.resolution // 8, device)
        t = torch.randint(0, 1000, (b,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
        autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16)

        def step() -> None:
            with autocast():
                loss = (model(x, t, **cond).float() - x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_memory(device)
        for _ in range(args.warmup):
            step()
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync(device)
        seconds = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        if rank == 0:
            results.put((b * world * args.iters / seconds.item(), peak_gib(device)))
    finally:
        dist.destroy_process_group()


def measure(world: int, mode: str, config: str, args) -> tuple[float, float]:
    """(images/s over all ranks, peak GiB of rank 0)."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world, _free_port(), mode, config, args, results), nprocs=world, join=True)
    return results.get()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--world", type=int, default=None, help="processes (default: every visible GPU)")
    ap.add_argument("--configs", default="sd15,mmdit_sd3_medium")
    ap.add_argument("--modes", default="ddp,fsdp")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).with_name("gpu_parallel_results.md")))
    args = ap.parse_args(argv)
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    world = args.world or available
    if world < 2 or world > available:
        print(f"{available} {'GPU' if args.device == 'cuda' else 'CPU'}(s) visible: the multi-GPU suite needs 2 "
              "or more (on one GPU, benchmarks/gpu.sh measures the single-device figures).")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (gloo)"
    rows = []
    for config in args.configs.split(","):
        for mode in args.modes.split(","):
            single, single_mem = measure(1, mode, config, args)
            many, many_mem = measure(world, mode, config, args)
            rows.append(f"| {config} | {mode} | {args.resolution}² | {args.batch} | {single:.1f} | {world} | "
                        f"{many:.1f} | {many / world:.1f} | {100 * many / (world * single):.0f} % | "
                        f"{single_mem:.1f} | {many_mem:.1f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        f"{datetime.date.today()}, {world} x {name}, torch {torch.__version__}, bf16 autocast, {args.iters} steps",
        "", "| backbone | mode | resolution | batch / GPU | 1 GPU img/s | GPUs | img/s | img/s per GPU | scaling | "
        "peak GiB (1) | peak GiB / GPU (N) |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
    Path(args.out).write_text(text)
    print("\n" + text + f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
