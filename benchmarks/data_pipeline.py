"""Real-data loading throughput: decode + resize + crop + batch, in images/s, for 0, 1 and 2 DataLoader workers.

    python benchmarks/data_pipeline.py                                  # 512 JPEGs of 256 px, folder and shards
    python benchmarks/data_pipeline.py --images 64 --batches 4 --workers 0   # a quick check

It writes its own JPEGs (random smooth images at --source-size, default 256 px, quality 90) to a temporary folder
and the same images as shards with sdlight.make_shards, then times whole epochs of data=folder and
data=webdataset at --image-size after one warm-up batch per loader. Run it on an idle machine: other processes
change the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlight.data.folder import FolderDataModule
from sdlight.data.shards import WebDataModule
from sdlight.make_shards import make_shards


def write_jpegs(root: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random images (upsampled noise), closer to photos' JPEG sizes than white noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        path = root / f"{i // 100:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small.resize((size, size), Image.BICUBIC).save(path, "JPEG", quality=90)
        path.with_suffix(".txt").write_text(f"image number {i}")


def time_loader(dm, batches: int) -> float:
    """Images per second over ``batches`` batches after one warm-up batch (worker start-up excluded)."""
    dm.setup()
    it = iter(dm.train_dataloader())
    next(it)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (one per core when workers share the machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_jpegs(folder, args.images, args.source_size)
        summary = make_shards(folder, shards, maxcount=max(1, args.images // 8), progress=False)
        urls = str(shards / f"shard-{{000000..{len(summary.shards) - 1:06d}}}.tar")
        print(f"{args.images} JPEGs of {args.source_size} px -> {args.image_size} px crops, batch {args.batch_size}, "
              f"{args.batches} timed batches, torch threads {args.threads}")
        print(f"{'source':<12}{'workers':>8}{'images/s':>12}")
        common = dict(image_size=args.image_size, batch_size=args.batch_size, train_size=args.images)
        for workers in args.workers:
            dm = FolderDataModule(root=str(folder), val_fraction=0.0, crop="random", num_workers=workers, **common)
            print(f"{'folder':<12}{workers:>8}{time_loader(dm, args.batches):>12.1f}")
            dm = WebDataModule(urls=urls, val_urls=urls, val_size=1, shuffle_buffer=256, num_workers=workers,
                               **common)
            print(f"{'webdataset':<12}{workers:>8}{time_loader(dm, args.batches):>12.1f}")


if __name__ == "__main__":
    main()
