"""One image pipeline for every real-data source: bytes or a file → RGB → resized, cropped tensor in [-1, 1].

The folder and the shard datamodules both call :class:`ImageTransform`, so an image gives the same tensor
whichever way it was stored.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlight.data.buckets import TRANSPOSING, Bucket, cover_size, displayed_size, nearest_bucket, orientation
from sdlight.pixels import from_pil

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class BadImage(ValueError):
    """An input that is not a usable image (unreadable, truncated, empty, too small); the loaders count it."""


SOURCE_SIZE = "sdlight_source_size"


def open_image(source: str | Path | bytes, draft: int | None = None) -> Image.Image:
    """Decodes a file or encoded bytes fully (a truncated file fails here, not later in a worker's transform).

    ``draft``: a JPEG may be decoded at a reduced scale whose sides stay >= draft (several times faster for
    large photos that are resized down anyway).

    Raises BadImage with the reason for anything that is not a whole image.
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImage("empty (0 bytes)")
        stream = io.BytesIO(source)
    else:
        if Path(source).stat().st_size == 0:
            raise BadImage("empty (0 bytes)")
        stream = source
    try:
        img = Image.open(stream)
        img.seek(0)  # animated GIF / multi-page TIFF: the first frame
        img.info[SOURCE_SIZE] = img.size  # (w, h) of the file, which a draft below may shrink
        if draft and img.format == "JPEG":
            img.draft(img.mode, (draft, draft))
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, EXIF orientation applied; transparency is composited on white (an
    RGBA logo on black would otherwise teach the model black backgrounds)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


class ImageTransform:
    """Resizes the short side to ``image_size``, then crops a square (center or random), optionally flips.

    With ``buckets`` ((height, width) list, sdlight.data.buckets), the image is resized to cover the bucket nearest
    its aspect ratio and cropped to that bucket instead of a square.

    Images whose short side is below ``min_size`` are rejected (BadImage); smaller ones that pass are upscaled.
    Horizontal flips are off by default: they contradict captions that say left or right.
    """

    def __init__(self, image_size: int, crop: str = "center", flip: bool = False, min_size: int = 0,
                 buckets: list[Bucket] | None = None):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size, self.crop, self.flip, self.min_size = image_size, crop, flip, min_size
        self.buckets = buckets

    def __call__(self, source: str | Path | bytes | Image.Image) -> torch.Tensor:
        """(3, image_size, image_size) float in [-1, 1] (the bucket's size with buckets); raises BadImage for an
        unusable input."""
        return self.with_geometry(source)[0]

    def bucket_of(self, source: str | Path | bytes | Image.Image) -> Bucket:
        """The bucket of an image, from its header (BadImage when that does not read)."""
        assert self.buckets is not None
        try:
            return nearest_bucket(*displayed_size(source), self.buckets)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise BadImage(f"{type(exc).__name__}: {exc}") from None

    def with_geometry(self, source: str | Path | bytes | Image.Image,
                      bucket: Bucket | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image as :meth:`__call__` gives it, and SD-XL's micro-conditioning entries: ``original_size``, the
        source's (height, width) as displayed, before resizing, and ``crop_coords``, the crop's (top, left) corner
        in the resized image (long tensors of shape (2,); a flip leaves them as they are, as in SD-XL). With
        buckets also ``target_size``, the bucket's (height, width); ``bucket``: the one the caller already knows
        (else it is read from the header)."""
        if self.buckets is not None:
            th, tw = bucket or self.bucket_of(source)
        else:
            th = tw = self.image_size
        img = source if isinstance(source, Image.Image) else \
            open_image(source, draft=max(th, tw, self.min_size))
        w, h = img.info.get(SOURCE_SIZE, img.size)
        if orientation(img) in TRANSPOSING:  # the size as displayed, in the frame the crop is taken in
            w, h = h, w
        img = to_rgb(img)
        if min(w, h) < max(1, self.min_size):
            raise BadImage(f"too small: {w}x{h} < min_size {self.min_size}")
        # the draft may have shrunk the pixels: resize from what was decoded, report the file's own size
        dw, dh = img.size
        nh, nw = cover_size(dh, dw, (th, tw))
        if (nw, nh) != (dw, dh):
            # reducing_gap: a fast box pre-shrink for large downscales, then a proper bicubic filter
            scale = max(th / dh, tw / dw)
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
        if self.crop == "random":
            left, top = random.randint(0, nw - tw), random.randint(0, nh - th)
        else:
            left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
        if self.flip and random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        geometry = {"original_size": torch.tensor([h, w]), "crop_coords": torch.tensor([top, left])}
        if self.buckets is not None:
            geometry["target_size"] = torch.tensor([th, tw])
        return from_pil(img), geometry
