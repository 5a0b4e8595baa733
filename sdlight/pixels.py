"""Images as tensors in [-1, 1] ↔ 8-bit pixels and PIL images: the one conversion every tool uses.

To 8 bits: ``(x + 1) · 127.5`` rounded to the nearest integer (ties to even, as ``torch.round``), clamped to
[0, 255]. Back: ``p / 127.5 - 1``, so 0 ↔ -1 and 255 ↔ 1 exactly, and pixels survive the round trip.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape; values outside are clamped) as uint8 on the CPU."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(pixels: Tensor | np.ndarray) -> Tensor:
    """8-bit pixels (any shape) as float32 in [-1, 1]."""
    return torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, Tensor) else pixels).float() / 127.5 - 1.0


def to_pil(images: Tensor) -> list[Image.Image]:
    """A batch ``(B, 3, H, W)`` in [-1, 1] as RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]


def from_pil(image: Image.Image) -> Tensor:
    """A PIL image (converted to RGB) as ``(3, H, W)`` in [-1, 1]."""
    return from_uint8(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
