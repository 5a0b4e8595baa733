"""Aspect-ratio buckets: lists of (height, width) training sizes, the bucket of an image, its cover-resize.

With ``data.buckets`` set, an image is not cropped to a square: it goes to the bucket whose aspect ratio is
nearest its own (by log ratio), is resized to cover the bucket (both sides >= the bucket's, aspect kept) and
cropped to it (center, or random as the square crop). Every batch holds images of one bucket (see
sdlight.data.bucket_sampler), as in SD-XL, kohya-ss sd-scripts and NovelAI's bucketing.

Two lists, both with sides that are multiples of ``step`` and areas close to ``image_size²``:

- ``sdxl``: SD-XL's published 41 buckets at 1024² (appendix of the SD-XL report, 512x2048 ... 1024x1024 ...
  2048x512, sides in steps of 64), each side scaled by image_size / 1024 and rounded to a multiple of ``step``
  (duplicates that rounding makes are merged). At 512, 256 and 128 px with the default step the list is SD-XL's
  exactly, halved, quartered, divided by eight.
- ``auto``: for every side ``a`` that is a multiple of ``step``, the largest ``b`` (a multiple of ``step``) with
  a·b <= image_size², in both orientations, up to ``max_ratio`` between the long and the short side
  (kohya-ss's ``make_buckets`` rule).

``step`` defaults to 64 x image_size / 1024 rounded to a multiple of 8 (the VAE's factor), at least 8: the
proportion of SD-XL's grid. A UNet that halves its latent n times needs sides that are multiples of 8 x 2^n
(64 for SD 1.x / 2.x's three halvings): set ``data.bucket_step`` to that when the default is finer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sdlight.errors import UsageError

Bucket = tuple[int, int]  # (height, width)

# SD-XL's buckets at 1024² with height <= width; the list is these and their transposes
_SDXL_WIDE: tuple[Bucket, ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024))

BUCKET_LISTS = ("sdxl", "auto")
EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90°: width and height swap on display


def default_step(image_size: int) -> int:
    """64 at 1024 px, in proportion below and above, rounded to a multiple of 8 and at least 8."""
    return max(8, round(64 * image_size / 1024 / 8) * 8)


def _sorted(buckets: set[Bucket]) -> list[Bucket]:
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))  # wide to tall


def sdxl_buckets(image_size: int = 1024, step: int | None = None) -> list[Bucket]:
    """SD-XL's bucket list scaled to ``image_size`` (sides rounded to multiples of ``step``), wide to tall."""
    step = step or default_step(image_size)
    scale = image_size / 1024

    def side(v: int) -> int:
        return max(step, round(v * scale / step) * step)

    return _sorted({(side(h), side(w)) for b in _SDXL_WIDE for h, w in (b, b[::-1])})


def auto_buckets(image_size: int, step: int | None = None, max_ratio: float = 4.0) -> list[Bucket]:
    """Every (a, largest b with a·b <= image_size²) in both orientations, sides multiples of ``step``, the long
    side at most ``max_ratio`` times the short one; wide to tall."""
    step = step or default_step(image_size)
    area = image_size * image_size
    out: set[Bucket] = set()
    for a in range(step, area // step + 1, step):
        b = area // a // step * step
        if b >= step and max(a, b) <= max_ratio * min(a, b):
            out |= {(a, b), (b, a)}
    if not out:
        raise UsageError(f"data.bucket_step={step} is too coarse for data.image_size={image_size}: no bucket fits")
    return _sorted(out)


def choose_buckets(name: str | None, image_size: int, step: int | None = None) -> list[Bucket] | None:
    """The bucket list that ``data.buckets`` names (None: no buckets, square crops); a UsageError otherwise."""
    if name is None:
        return None
    if name not in BUCKET_LISTS:
        raise UsageError(f"data.buckets={name}: must be sdxl, auto or null")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 8 or step % 8):
        raise UsageError(f"data.bucket_step={step}: must be a multiple of 8 (the autoencoder's factor) or null")
    return sdxl_buckets(image_size, step) if name == "sdxl" else auto_buckets(image_size, step)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's in log scale (a tie goes to the larger area)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(height: int, width: int, bucket: Bucket) -> Bucket:
    """(height, width) of the image resized, aspect kept, so that it covers ``bucket``: the smallest such."""
    scale = max(bucket[0] / height, bucket[1] / width)
    return max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale))


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: as stored) without decoding pixels: a PNG's getexif() loads the whole image, so
    only an eXIf chunk met before the pixel data is read there."""
    if img.format == "PNG":
        data = img.info.get("exif")
        if not data:
            return 1
        exif = Image.Exif()
        exif.load(data)
        return int(exif.get(EXIF_ORIENTATION, 1) or 1)
    return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)


def displayed_size(source: str | Path | bytes | Image.Image) -> Bucket:
    """(height, width) of an image as displayed (EXIF orientation 5-8 swap them), from its header alone."""
    if isinstance(source, Image.Image):
        w, h = source.size
        return (w, h) if orientation(source) in TRANSPOSING else (h, w)
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
        w, h = img.size
        return (w, h) if orientation(img) in TRANSPOSING else (h, w)


def size_or_none(source: str | Path | bytes) -> Bucket | None:
    """``displayed_size``, or None for a file whose header does not read (it fails again when loaded, and is
    replaced and counted there, as every broken image)."""
    try:
        return displayed_size(source)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
