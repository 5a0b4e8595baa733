"""``nn.Linear`` that runs on oneDNN's matmul on the CPU, where that is the faster kernel.

A float32 ``F.linear`` on the CPU goes to MKL's sgemm. On some processors MKL leaves speed on the table (it picks
its code path by vendor: on the AMD EPYC of BENCHMARKS.md its AVX2 path ran at half the speed of oneDNN's AVX-512
matmul, forward + backward of the UNet's linear layers in 0.5-0.8x the time); on others the two are even (another
AMD EPYC, Intel Xeons with MKL's own AVX-512 / AMX paths). The processor's name does not tell which, so the
default is measured once per machine: the first float32 CPU forward times both kernels at the UNets' layer shapes
(~0.2 s) and takes oneDNN only when it is clearly faster (by 15 %); the choice is kept in
``~/.cache/sdlight/linear_kernel.json`` (``$SDLIGHT_CACHE``), per processor, torch version and thread count, so a
machine always computes with the same kernel (a resumed run gives the same numbers).
``SDLIGHT_ONEDNN_LINEAR=1`` / ``=0`` or :func:`set_onednn_linear` override it.

The math is the same float32 matmul in another summation order (~1e-7 relative). The oneDNN path is taken only
where it is the same computation: float32 CPU tensors, outside CPU autocast and ``torch.compile`` (inductor picks
its own kernels). Everywhere else — CUDA, half precision, tensor subclasses — it is plain ``F.linear``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

log = logging.getLogger("sdlight")
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PLAIN = (Tensor, nn.Parameter)
# (tokens, in, out) of transformer layers of the quickstart and mid-size UNets (BENCHMARKS.md)
PROBE_SHAPES = ((4096, 64, 512), (1024, 128, 1024), (512, 1024, 256))
MIN_GAIN = 0.85  # oneDNN's time over MKL's at which it becomes the default


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first processor's vendor, model name and instruction-set flags (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    fields = [re.search(rf"^{key}\s*:(.*)$", text, re.M) for key in ("vendor_id", "model name", "flags")]
    return " | ".join(f.group(1).strip() for f in fields if f)


def time_kernels(shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES, reps: int = 3) -> tuple[float, float]:
    """Seconds of forward + backward at ``shapes`` with MKL (``F.linear``) and with oneDNN, each the best of
    ``reps`` alternated rounds."""
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        return _time_kernels(shapes, reps)


def _time_kernels(shapes: tuple[tuple[int, int, int], ...], reps: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    best = {F.linear: float("inf"), _OneDNNLinear.apply: float("inf")}
    cases = [(torch.randn(m, k, generator=g, requires_grad=True), torch.randn(n, k, generator=g, requires_grad=True),
              torch.randn(m, n, generator=g)) for m, k, n in shapes]
    for _ in range(reps + 1):  # the first round warms both up
        for fn in best:
            start = time.perf_counter()
            for x, w, grad in cases:
                torch.autograd.grad(fn(x, w, None), (x, w), grad)
            best[fn] = min(best[fn], time.perf_counter() - start) if _ else best[fn]
    return best[F.linear], best[_OneDNNLinear.apply]


def _cache_file() -> Path:
    return Path(os.environ.get("SDLIGHT_CACHE") or Path.home() / ".cache" / "sdlight") / "linear_kernel.json"


def onednn_linear_default() -> bool:
    """Whether oneDNN is this machine's faster float32 CPU linear kernel: the cached verdict for this processor,
    torch version and thread count, else measured now (`time_kernels`) and cached."""
    if not _ONEDNN:
        return False
    key = hashlib.sha256(f"{cpu_description()}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return bool(cached[key]["onednn"])
    mkl, onednn = time_kernels()
    choice = onednn < MIN_GAIN * mkl
    log.info(f"linear layers: oneDNN {1e3 * onednn:.1f} ms against MKL {1e3 * mkl:.1f} ms on this CPU: "
             f"{'oneDNN' if choice else 'MKL'} from now on (kept in {path}; SDLIGHT_ONEDNN_LINEAR=0/1 overrides)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**cached, key: {"onednn": choice, "mkl_s": mkl, "onednn_s": onednn,
                                                   "cpu": cpu_description()}}, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: measured again next time
        pass
    return choice


_setting = os.environ.get("SDLIGHT_ONEDNN_LINEAR", "").strip()
_enabled: bool | None = (_setting != "0") if _setting else None  # None: decided at the first use


def set_onednn_linear(enabled: bool | None) -> bool | None:
    """Turn the oneDNN CPU path on or off for every :class:`Linear` (None: this machine's default); returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, None if enabled is None else bool(enabled)
    return previous


def onednn_linear_active() -> bool:
    """Whether :class:`Linear` layers take oneDNN's matmul for float32 CPU inputs (enabled and available)."""
    global _enabled
    if _enabled is None:
        _enabled = onednn_linear_default()
    return _enabled and _ONEDNN


def _matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ weight (N, K)^T + bias, x contiguous; weight may be a transposed view (oneDNN reads its strides,
    while it would copy a strided x)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _matmul(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True) gets a clear error, not a wrong gradient
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        # contiguous: a gradient may come expanded (stride 0, from a sum or mean), which oneDNN runs ~100x slower
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx = g W: a linear layer with weight W^T
            grad_x = _matmul(g2, weight.t(), None).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            # dL/dW = g^T x. oneDNN copies a transposed *input* (not a transposed weight), so the smaller of g and
            # x goes in as the input: W^T's product (x^T g) when x is the narrower one.
            if x2.shape[1] <= g2.shape[1]:
                grad_w = _matmul(x2.t().contiguous(), g2.t(), None).t()
            else:
                grad_w = _matmul(g2.t().contiguous(), x2.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def _takes_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and type(x) in _PLAIN and type(weight) in _PLAIN and x.layout == torch.strided and x.numel() > 0
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in _PLAIN))
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
        and onednn_linear_active()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN's matmul for float32 CPU tensors (see the module docstring)."""
    if _takes_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose float32 CPU forward runs on oneDNN where that is
    the faster kernel (decided when the first one is built, not inside a forward pass)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        onednn_linear_active()

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
