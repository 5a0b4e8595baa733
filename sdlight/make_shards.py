"""Folder → webdataset shards: ``python -m sdlight.make_shards src=DIR out=DIR [maxcount=10000 maxsize=1e9]``.

Writes the img2dataset layout that ``data=webdataset`` reads: ``KEY.jpg|png|webp`` (JPEG, PNG and WebP files
keep their bytes; BMP, TIFF and GIF are re-encoded as PNG; ``image_size`` re-encodes every image as a JPEG
resized to that short side), ``KEY.txt`` (caption), ``KEY.json`` (source path, size, class) and ``KEY.cls``
(with ``label_from=folder``). Captions and labels follow data=folder's rules. Broken files are skipped and
counted; a summary says what was written.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import webdataset as wds
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from sdlight.data.folder import scan_folder
from sdlight.data.skips import MAX_EXAMPLES
from sdlight.data.transforms import BadImage, open_image, to_rgb
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors

log = logging.getLogger("sdlight")
register_resolvers()

KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats data=webdataset reads as they are


@dataclass
class ShardSummary:
    written: int = 0
    skipped: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def encode(path: Path, image_size: int | None, quality: int) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (width, height)) for one image file; raises BadImage when it is not a whole image."""
    img = open_image(path)  # decodes fully: truncated files are caught here, not in training
    if image_size is None and img.format in KEEP:  # EXIF stays in the bytes; readers apply it
        return KEEP[img.format], path.read_bytes(), img.size
    img = to_rgb(img)
    buf = io.BytesIO()
    if image_size is not None:
        scale = image_size / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        img.save(buf, "JPEG", quality=quality)
        return "jpg", buf.getvalue(), img.size
    img.save(buf, "PNG")
    return "png", buf.getvalue(), img.size


def make_shards(src: str | Path, out: str | Path, maxcount: int = 10000, maxsize: float = 1e9,
                prefix: str = "shard", label_from: str | None = None, missing_caption: str = "skip",
                image_size: int | None = None, quality: int = 95, progress: bool = True) -> ShardSummary:
    """Writes every image under ``src`` with its caption to ``out/{prefix}-NNNNNN.tar``; returns the summary
    (also written to ``out/summary.json``)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    scan = scan_folder(src, missing_caption, label_from)
    out.mkdir(parents=True, exist_ok=True)
    summary = ShardSummary(skipped=len(scan.skipped), skipped_examples=scan.skipped[:MAX_EXAMPLES],
                           classes=scan.classes)
    pattern = str(out / f"{prefix}-%06d.tar")
    # an integer mtime: a float one costs every tar member a 1 KiB pax header
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=int(time.time())) as sink:
        for rec in tqdm(scan.records, desc="make_shards", unit="img", disable=not progress):
            try:
                ext, data, (w, h) = encode(src / rec.rel, image_size, quality)
                text = rec.text if rec.text_file is None else \
                    (src / rec.text_file).read_text(encoding="utf-8", errors="replace").strip()
            except (BadImage, OSError) as exc:
                summary.skipped += 1
                if len(summary.skipped_examples) < MAX_EXAMPLES:
                    summary.skipped_examples.append(f"{rec.rel}: {exc}")
                continue
            sample = {"__key__": f"{summary.written:09d}", ext: data, "txt": text,
                      "json": {"file_name": rec.rel, "width": w, "height": h}}
            if rec.label >= 0:
                sample["cls"] = rec.label
                sample["json"]["class"] = scan.classes[rec.label]
            sink.write(sample)
            summary.written += 1
        summary.shards = [Path(pattern % i).name for i in range(sink.shard)] if summary.written else []
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="make_shards")
def main(cfg: DictConfig) -> None:
    with user_errors():
        summary = make_shards(cfg.src, cfg.out, maxcount=cfg.maxcount, maxsize=cfg.maxsize, prefix=cfg.prefix,
                              label_from=cfg.label_from, missing_caption=cfg.missing_caption,
                              image_size=cfg.image_size, quality=cfg.quality, progress=cfg.progress)
    n = len(summary.shards)
    urls = f"{Path(cfg.out)}/{cfg.prefix}-{{000000..{n - 1:06d}}}.tar" if n else "(none)"
    log.info(f"Wrote {summary.written} samples to {n} shards in {cfg.out}, skipped {summary.skipped}"
             + (f" (first: {'; '.join(summary.skipped_examples)})" if summary.skipped else ""))
    log.info(f"Train on them with: data=webdataset 'data.urls=\"{urls}\"'")


if __name__ == "__main__":
    main()
