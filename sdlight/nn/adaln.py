"""adaLN's two element-wise steps, shared by the transformer backbones (MMDiT, DiT, the patch mixer).

Each is one fused ``addcmul`` instead of a multiply and an add: one pass over the tokens and one saved tensor
fewer, forward and backward (measured: ``python -m benchmarks.run --benches mmdit,dit``, BENCHMARKS.md). The result
equals the two-op form up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` for tokens x (B, L, D) and per-sample shift, scale (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """The gated residual ``x + gate * update`` for tokens x, update (B, L, D) and a per-sample gate (B, D)."""
    return torch.addcmul(x, gate.unsqueeze(1), update)
