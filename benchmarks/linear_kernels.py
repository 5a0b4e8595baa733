"""Linear layers on the CPU: ``F.linear`` (MKL's sgemm) against ``sdlight.nn.linear`` (oneDNN's matmul), forward
and forward + backward, at the shapes of the quickstart and mid-size UNets' transformer layers, alternated.

    python -m benchmarks.linear_kernels
    OMP_NUM_THREADS=1 python -m benchmarks.linear_kernels --rounds 9
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

from benchmarks.common import alternate
from benchmarks.run import machine
from sdlight.nn.linear import linear, onednn_linear_active, set_onednn_linear

# (tokens, in, out) of the transformer layers: the quickstart UNet at batch 64 (64 channels at 8x8 latents, 128 at
# 4x4, 77-token contexts of width 64) and the mid-size one at batch 8 (256 channels at 8x8, 512 at 4x4, contexts of
# width 256): q/k/v/out, the GEGLU projection (8x) and the feed-forward's way back (4x)
SHAPES = [(4096, 64, 64), (4096, 64, 512), (4096, 256, 64), (4928, 64, 64), (1024, 128, 128), (1024, 128, 1024),
          (1024, 512, 128), (512, 256, 256), (512, 256, 2048), (512, 1024, 256), (616, 256, 512), (128, 512, 512),
          (128, 512, 4096), (128, 2048, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    set_onednn_linear(True)  # the comparison, whatever this machine's default
    if not onednn_linear_active():
        raise SystemExit("this torch build has no oneDNN linear: nothing to compare")
    print(f"{datetime.date.today()}, {machine(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.iters}\n")
    print("| tokens x in → out | MKL fwd ms | oneDNN fwd ms | fwd ratio | MKL fwd+bwd ms | oneDNN fwd+bwd ms | "
          "fwd+bwd ratio | oneDNN GFLOP/s (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        x = torch.randn(m, k, generator=g, requires_grad=True)
        w = torch.randn(n, k, generator=g, requires_grad=True)
        b = torch.randn(n, generator=g, requires_grad=True)
        with torch.no_grad():
            fwd = alternate({"mkl": lambda: F.linear(x, w, b), "onednn": lambda: linear(x, w, b)},
                            rounds=args.rounds, iters=args.iters)
        grad = torch.randn(m, n, generator=g)  # a dense upstream gradient, as inside a network

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), grad)
        both = alternate({"mkl": fwd_bwd(F.linear), "onednn": fwd_bwd(linear)}, rounds=args.rounds,
                         iters=args.iters)
        f_mkl, f_dnn = fwd["mkl"].median, fwd["onednn"].median
        b_mkl, b_dnn = both["mkl"].median, both["onednn"].median
        print(f"| {m} x {k} → {n} | {1e3 * f_mkl:.3f} | {1e3 * f_dnn:.3f} | **{f_dnn / f_mkl:.2f}x** | "
              f"{1e3 * b_mkl:.3f} | {1e3 * b_dnn:.3f} | **{b_dnn / b_mkl:.2f}x** | {6 * m * k * n / b_dnn / 1e9:.0f} |")


if __name__ == "__main__":
    main()
