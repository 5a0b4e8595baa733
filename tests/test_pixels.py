"""The one conversion between images in [-1, 1] and 8-bit pixels / PIL images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.pixels import from_pil, from_uint8, to_pil, to_uint8


def test_to_uint8_rounds_to_nearest_and_clamps():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1 / 255, 0.999, 1.0, 2.0])
    # (x + 1) * 127.5 = -63.75, 0, 63.75, 127.5, 128.0, 254.87, 255, 382.5
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 128, 255, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_every_pixel_value_survives_the_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    back = from_uint8(pixels)
    assert back[0] == -1.0 and back[-1] == 1.0
    assert torch.equal(to_uint8(back), pixels)


def test_pil_round_trip_and_shapes():
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    x = from_pil(Image.fromarray(rgb))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    (image,) = to_pil(x[None])
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb)
    assert from_pil(Image.fromarray(rgb[..., 0])).shape == (3, 5, 7)  # greyscale becomes RGB
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_pil(x)
