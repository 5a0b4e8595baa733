"""Procedural text-to-image data: coloured shapes on a plain background, with captions, labels and attributes.

Every sample is a pure function of ``(seed, split, index)``, so the data needs no download, is identical on every
machine and every worker, and train / val are disjoint by construction (a hash of its pixels puts each image in
exactly one split). ``describe`` recovers the attributes from pixels alone: it is the offline
oracle that scores whether generated samples follow their prompts.
"""

from __future__ import annotations

import colorsys
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from sdlight.pixels import from_pil, to_uint8

SHAPES = ("circle", "square", "triangle", "diamond")
# How ``describe`` tells shapes apart: the fill ratio of the bounding box, and how far the centroid sits below
# the box centre (in box heights; a triangle with its apex up has 1/6, the others 0). At 32 px the measured
# fill ratios are: circle 0.73-0.81, square 1.0, triangle 0.50-0.56 (offset >= 0.14), diamond 0.49-0.51.
_SIGNATURE = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 1 / 6), "diamond": (0.5, 0.0)}
COLOURS = {  # saturated colours, >= 30 degrees apart in hue
    "red": (220, 20, 20),
    "orange": (240, 130, 0),
    "yellow": (230, 220, 0),
    "green": (20, 180, 40),
    "blue": (30, 60, 230),
    "purple": (140, 30, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLS)
_POSITION_PHRASE = {"middle center": "in the center", "middle left": "at the left", "middle right": "at the right",
                    "top center": "at the top", "bottom center": "at the bottom"}

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
_VAL_BUCKET = 10  # one parameter set in ten belongs to val


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str

    def caption(self) -> str:
        parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.shape} {_POSITION_PHRASE.get(s.position, 'at the ' + s.position)}"
                 for s in self.shapes]
        return " and ".join(parts) + f" on a {self.background} background"


def attribute_vocab_sizes(max_shapes: int = 1) -> list[int]:
    """Vocabulary size of each attribute slot: (shape, colour, position) per shape, then background.

    Slots of the second and later shapes have one extra value meaning "absent".
    """
    sizes: list[int] = []
    for k in range(max_shapes):
        extra = 0 if k == 0 else 1
        sizes += [len(SHAPES) + extra, len(COLOURS) + extra, len(POSITIONS) + extra]
    return sizes + [len(BACKGROUNDS)]


def scene_attributes(scene: Scene, max_shapes: int = 1) -> list[int]:
    ids: list[int] = []
    for k in range(max_shapes):
        if k < len(scene.shapes):
            s = scene.shapes[k]
            ids += [SHAPES.index(s.shape), COLOUR_NAMES.index(s.colour), POSITIONS.index(s.position)]
        else:
            ids += [len(SHAPES), len(COLOURS), len(POSITIONS)]
    return ids + [BACKGROUND_NAMES.index(scene.background)]


def scene_label(scene: Scene) -> int:
    """Class id of the first shape: shape × colour (24 classes)."""
    s = scene.shapes[0]
    return SHAPES.index(s.shape) * len(COLOURS) + COLOUR_NAMES.index(s.colour)


NUM_CLASSES = len(SHAPES) * len(COLOURS)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill: tuple[int, int, int]):
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx - h, cy + h), (cx + h, cy + h), (cx, cy - h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, image_size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """Draws a scene; ``rng`` jitters size and position inside the grid cell (no jitter without it)."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for s in scene.shapes:
        row, col = s.position.split()
        size = cell * rng.uniform(0.7, 0.9)
        slack = (cell - size) / 2
        cx = (COLS.index(col) + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (ROWS.index(row) + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        _draw(draw, s.shape, cx, cy, size, COLOURS[s.colour])
    return img


def _random_scene(rng: random.Random, max_shapes: int) -> Scene:
    n = rng.randint(1, max_shapes)
    colours = rng.sample(COLOUR_NAMES, n)  # distinct colours keep shapes separable for ``describe``
    positions = rng.sample(POSITIONS, n)
    shapes = tuple(ShapeSpec(rng.choice(SHAPES), c, p) for c, p in zip(colours, positions))
    return Scene(shapes, rng.choice(BACKGROUND_NAMES))


def _split_of(img: Image.Image) -> str:
    # hashing the pixels (not the parameters, which can render alike) makes no image belong to both splits
    digest = hashlib.blake2b(img.tobytes(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") % _VAL_BUCKET == 0 else "train"


def make_sample(index: int, split: str, seed: int = 0, max_shapes: int = 1, image_size: int = 32):
    """The ``index``-th sample of ``split``: (PIL image, scene). Deterministic; rejection keeps splits disjoint."""
    for attempt in range(1000):
        rng = random.Random(f"{seed}/{split}/{index}/{attempt}")
        scene = _random_scene(rng, max_shapes)
        img = render(scene, image_size, rng)
        if _split_of(img) == split:
            return img, scene
    raise RuntimeError("could not draw a sample for this split")  # probability ~0.9**1000


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return from_pil(img)


class ShapesDataset(Dataset):
    """``length`` samples of one split; each item is ``{image, text, label, attributes}``."""

    def __init__(self, split: str = "train", length: int = 10000, image_size: int = 32, max_shapes: int = 1,
                 seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if max_shapes not in (1, 2):
            raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
        self.split, self.length, self.image_size = split, length, image_size
        self.max_shapes, self.seed = max_shapes, seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return make_sample(index, self.split, self.seed, self.max_shapes, self.image_size)[1]

    def __getitem__(self, index: int) -> dict:
        img, scene = make_sample(index, self.split, self.seed, self.max_shapes, self.image_size)
        return {
            "image": _to_tensor(img),
            "text": scene.caption(),
            "label": scene_label(scene),
            "attributes": torch.tensor(scene_attributes(scene, self.max_shapes)),
        }


# ----------------------------------------------------------------------------------------------- the oracle
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b)
    return np.minimum(d, 1 - d)


def _hue(rgb: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) of an (H, W, 3) float image, vectorised (colorsys's formula)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    span = np.maximum(mx - mn, 1e-6)
    rc, gc, bc = (mx - r) / span, (mx - g) / span, (mx - b) / span
    hue = np.where(r == mx, bc - gc, np.where(g == mx, 2.0 + rc - bc, 4.0 + gc - rc))
    return (hue / 6.0) % 1.0


def _to_uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
        return to_uint8(x).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    return arr.astype(np.uint8)


def _regions(image, min_pixels: int) -> tuple[str, list[tuple[str, np.ndarray]], tuple[int, int]]:
    """(background name, [(colour name, pixel mask)] of each palette colour covering ``min_pixels`` or more,
    (H, W)): saturated pixels by nearest palette hue, the background by the level of the unsaturated ones."""
    rgb = _to_uint8(image).astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    coloured = (sat > 0.5) & (mx > 0.35)
    grey = ~coloured
    bg_level = float(np.median(mx[grey])) if grey.any() else 0.5
    background = min(BACKGROUNDS, key=lambda n: abs(BACKGROUNDS[n][0] / 255 - bg_level))
    names, hue = list(_PALETTE_HUES), _hue(rgb, mx, mn)
    nearest = np.stack([_hue_distance(hue, _PALETTE_HUES[n]) for n in names]).argmin(0)
    masks = [(name, coloured & (nearest == k)) for k, name in enumerate(names)]
    return background, [(n, m) for n, m in masks if int(m.sum()) >= min_pixels], rgb.shape[:2]


def geometry(image, min_pixels: int = 4) -> tuple[float, float, float] | None:
    """(linear size, centroid x, centroid y) of the largest coloured shape in pixels (size: the square root of its
    area), or None when there is none: what the data's jitter varies within a grid cell."""
    _, regions, _ = _regions(image, min_pixels)
    if not regions:
        return None
    mask = max((m for _, m in regions), key=lambda m: int(m.sum()))
    ys, xs = np.nonzero(mask)
    return float(np.sqrt(len(xs))), float(xs.mean()), float(ys.mean())


def spread(groups: Sequence[Sequence[tuple[float, float, float] | None]]) -> dict[str, float]:
    """The mean within-group standard deviation of size and of the centroid offset (x and y pooled), over groups of
    the geometries of images sharing one scene; None entries (no shape found) are left out, and groups with fewer
    than two shapes."""
    sizes, offsets = [], []
    for group in groups:
        found = np.array([g for g in group if g is not None], dtype=np.float64)
        if len(found) < 2:
            continue
        sizes.append(found[:, 0].std(ddof=1))
        offsets.append(np.sqrt((found[:, 1].var(ddof=1) + found[:, 2].var(ddof=1)) / 2))
    if not sizes:
        raise ValueError("no group has two images with a shape in them")
    return {"size": float(np.mean(sizes)), "offset": float(np.mean(offsets)), "groups": len(sizes)}


def data_geometries(scene: Scene, n: int, image_size: int = 32, seed: int = 0) -> list:
    """The geometries of ``n`` renderings of ``scene`` with the data's jitter (other draws of its sizes and
    offsets): the spread a model's samples of this scene's caption would have if as diverse as the data."""
    return [geometry(render(scene, image_size, random.Random(f"diversity/{seed}/{k}"))) for k in range(n)]


def describe(image, max_shapes: int = 1, min_pixels: int = 4) -> Scene:
    """Recovers a scene from pixels: background by the unsaturated pixels, colour by dominant hue, shape by the
    fill ratio of its bounding box, position by its centroid's grid cell.

    ``image`` is a (3, H, W) tensor in [-1, 1], a PIL image, or an (H, W, 3) uint8 array. At most ``max_shapes``
    shapes are reported, the largest first; colours covering fewer than ``min_pixels`` pixels are ignored.
    """
    background, regions, (h, w) = _regions(image, min_pixels)
    found = []
    for name, mask in regions:
        count = int(mask.sum())
        ys, xs = np.nonzero(mask)
        height = ys.max() - ys.min() + 1
        fill = count / (height * (xs.max() - xs.min() + 1))
        drop = (ys.mean() - (ys.max() + ys.min()) / 2) / height
        # the centroid offset is weighted up: its range is a third of the fill ratio's
        shape = min(SHAPES, key=lambda s: (_SIGNATURE[s][0] - fill) ** 2 + (3 * (_SIGNATURE[s][1] - drop)) ** 2)
        row = ROWS[min(int(3 * (ys.mean() + 0.5) / h), 2)]  # +0.5: pixel centres
        col = COLS[min(int(3 * (xs.mean() + 0.5) / w), 2)]
        found.append((count, ShapeSpec(shape, name, f"{row} {col}")))
    found.sort(key=lambda t: -t[0])
    return Scene(tuple(s for _, s in found[:max_shapes]), background)
