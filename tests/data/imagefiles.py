"""Real image files for the data tests: several formats, sizes and modes (imported by tests/data/test_*.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L

import numpy as np
from PIL import Image

# (name, PIL mode, size) of the good images of the test folders: every format and several modes
GOOD_IMAGES = [("a.jpg", "RGB", (48, 40)), ("b.png", "RGBA", (40, 64)), ("c.webp", "RGB", (36, 36)),
               ("d.bmp", "L", (50, 34)), ("e.tif", "CMYK", (40, 40)), ("f.gif", "P", (44, 33)),
               ("g.jpeg", "RGB", (20, 12)), ("h.png", "I;16", (40, 40)), ("i.png", "LA", (33, 40)),
               ("j.jpg", "RGB", (200, 100))]


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 40), fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
    elif mode == "P":
        img = rgb.quantize(16)
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".gif": "GIF"}


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(mode, size, FORMATS[path.suffix.lower()], seed))
    return path


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 5) -> Path:
    """Good images under root/<class>/ with sidecar captions "a <class> number <i>", cycling through every
    format and mode of GOOD_IMAGES; returns root."""
    for c, cls in enumerate(classes):
        for i in range(per_class):
            name, mode, size = GOOD_IMAGES[(c * per_class + i) % len(GOOD_IMAGES)]
            path = write_image(root / cls / f"{i}_{name}", mode, size, seed=c * 100 + i)
            path.with_suffix(".txt").write_text(f"a {cls} number {i}\n")
    return root


def under_trainer(datamodule: L.LightningDataModule) -> L.LightningDataModule:
    """``datamodule`` attached to a one-process CPU Trainer, as fit() attaches it before setup("fit")."""
    datamodule.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    return datamodule


class KeyRecorder(L.Callback):
    """Writes the sample keys each rank trained on to out/rank<N>.json (DDP tests; importable in spawned ranks)."""

    def __init__(self, out: str):
        self.out, self.keys = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["key"])

    def on_train_epoch_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


def write_shards(out: Path, n: int, maxcount: int = 10, size: tuple[int, int] = (40, 36), start: int = 0,
                 prefix: str = "s") -> list[Path]:
    """n good samples in the img2dataset layout (image keys cycling jpg / png / webp / jpeg, txt, json, cls)
    written by webdataset's own ShardWriter; returns the shard paths."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    kinds = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")]
    with wds.ShardWriter(str(out / f"{prefix}-%04d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i in range(start, start + n):
            ext, fmt = kinds[i % len(kinds)]
            sink.write({"__key__": f"{i:06d}", ext: image_bytes("RGB", size, fmt, seed=i), "txt": f"caption {i}",
                        "json": {"index": i}, "cls": i % 3})
    return sorted(out.glob(f"{prefix}-*.tar"))


def cut_shard_set(out: Path, n: int = 103, per_shard: int = 26) -> str:
    """``n`` good samples in shards of ``per_shard`` (write_shards), the last shard cut in half; returns their brace
    pattern (out/s-{0000..000K}.tar)."""
    shards = write_shards(out, n, maxcount=per_shard)
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    return f"{out}/s-{{0000..{len(shards) - 1:04d}}}.tar"


# (width, height) of the photographs of the bucket tests: wide, tall, square, 4:3
PHOTO_SIZES = [(96, 48), (48, 96), (64, 64), (80, 60)]


def rotated_jpeg(path: Path, size: tuple[int, int] = (96, 48), orientation: int = 6, seed: int = 0) -> Path:
    """A JPEG stored ``size`` (w, h) whose EXIF orientation turns it by 90° on display (orientations 5-8)."""
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.save(path, "JPEG", exif=exif.tobytes())
    return path


def make_photos(root: Path) -> Path:
    """Four images of each of PHOTO_SIZES (jpg and png, named WxH_i) and two rotated JPEGs (shown 48 wide, 96
    tall), each with a sidecar caption; returns root."""
    for k, (w, h) in enumerate(PHOTO_SIZES):
        for i in range(4):
            write_image(root / f"{w}x{h}_{i}.{'jpg' if i % 2 else 'png'}", "RGB", (w, h), seed=10 * k + i)
    for i in range(2):
        rotated_jpeg(root / f"rotated_{i}.jpg", seed=100 + i)
    for p in root.iterdir():
        p.with_suffix(".txt").write_text(f"photo {p.stem}")
    return root
