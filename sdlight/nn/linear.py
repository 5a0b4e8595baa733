"""``nn.Linear`` that runs on oneDNN's matmul on the CPU.

A float32 ``F.linear`` on the CPU goes to MKL's sgemm. MKL picks its code path by the processor's vendor: on AMD
processors it takes its AVX2 path and reaches about half of what the cores can do, while oneDNN (the library that
already runs PyTorch's CPU convolutions) uses AVX-512 there: forward + backward of the UNet's linear layers in
0.5-0.8x the time (BENCHMARKS.md, "Linear layers: MKL against oneDNN"). On Intel processors MKL has AVX-512 and
AMX paths of its own and the gain is gone (BENCHMARKS.md, per processor family).
The math is the same float32 matmul in another summation order (~1e-7 relative).

So the oneDNN path is on by default where MKL would leave AVX-512 unused: x86 processors with AVX-512 that are not
Intel's (read from /proc/cpuinfo once, at import: the same choice for the whole run, hence the same numbers on
resume). ``SDLIGHT_ONEDNN_LINEAR=1`` / ``=0`` or :func:`set_onednn_linear` override it. It is taken only where it
is the same computation: float32 CPU tensors, outside CPU autocast and ``torch.compile`` (inductor picks its own
kernels). Everywhere else — CUDA, half precision, tensor subclasses — it is plain ``F.linear``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor_and_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The first processor's ``vendor_id`` and instruction-set ``flags`` from ``cpuinfo`` (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "", frozenset()
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    return (vendor.group(1) if vendor else ""), frozenset(flags.group(1).split() if flags else ())


def onednn_linear_default(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether MKL would leave this CPU's AVX-512 unused: an x86 processor with AVX-512 not made by Intel."""
    vendor, flags = cpu_vendor_and_flags(cpuinfo)
    return bool(vendor) and vendor != "GenuineIntel" and "avx512f" in flags


_setting = os.environ.get("SDLIGHT_ONEDNN_LINEAR", "").strip()
_enabled = _setting != "0" if _setting else onednn_linear_default()
_PLAIN = (Tensor, nn.Parameter)


def set_onednn_linear(enabled: bool) -> bool:
    """Turn the oneDNN CPU path on or off for every :class:`Linear`; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def onednn_linear_active() -> bool:
    """Whether :class:`Linear` layers take oneDNN's matmul for float32 CPU inputs (enabled and available)."""
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
        _enabled and _ONEDNN
        and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and type(x) in _PLAIN and type(weight) in _PLAIN and x.layout == torch.strided and x.numel() > 0
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in _PLAIN))
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN's matmul for float32 CPU tensors (see the module docstring)."""
    if _takes_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose float32 CPU forward runs on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
