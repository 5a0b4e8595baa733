"""``data=folder``: every image under a directory, with captions and optional class labels.

Captions, first match wins: a sidecar ``NAME.txt`` next to ``NAME.jpg``; a ``metadata.jsonl`` at the root
(``file_name`` + ``text``, the diffusers image-folder convention); a ``captions.csv`` at the root (same columns).
Class labels (``label_from="folder"``): the first sub-folder's name, as torchvision's ImageFolder.

A broken image never stops training: the item is replaced by the next readable one (so every batch and every
rank keeps its size, and DDP ranks stay in step) and the replacement is counted (sdlight.data.skips).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from sdlight.data.base import ImageDataModule, leaving
from sdlight.data.bucket_sampler import bucket_counts
from sdlight.data.buckets import Bucket, choose_buckets, nearest_bucket, size_or_none
from sdlight.data.skips import MAX_EXAMPLES, ReplacingDataset, collate_counting_skips
from sdlight.data.transforms import IMAGE_EXTENSIONS, BadImage, ImageTransform
from sdlight.errors import UsageError

log = logging.getLogger("sdlight")

METADATA_FILES = ("metadata.jsonl", "captions.csv")


@dataclass(frozen=True)
class ImageRecord:
    """One image file: its path relative to the root, its caption (or the sidecar holding it) and label."""

    rel: str
    text: str | None = None
    text_file: str | None = None
    label: int = -1


@dataclass
class FolderScan:
    records: list[ImageRecord]
    classes: list[str]
    skipped: list[str]  # "what: why" for items dropped while listing (no caption, caption without image, ...)
    found: int          # images + caption entries looked at


def split_of(rel: str, val_fraction: float) -> str:
    """"val" for a stable ``val_fraction`` of relative paths (by hash: adding files never moves others)."""
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _table_captions(root: Path) -> dict[str, str]:
    """file_name → caption from metadata.jsonl or captions.csv at the root (columns text or caption)."""
    captions: dict[str, str] = {}
    jsonl, table = root / METADATA_FILES[0], root / METADATA_FILES[1]
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file_name"])] = str(row.get("text", row.get("caption")) or "")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("%s line %d: %s (skipped)", jsonl, n, exc)
    elif table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("file_name"):
                    captions[row["file_name"]] = row.get("text", row.get("caption")) or ""
    return {os.path.normpath(k).replace(os.sep, "/"): v for k, v in captions.items()}


def scan_folder(root: str | Path, missing_caption: str = "skip", label_from: str | None = None,
                classes: list[str] | None = None) -> FolderScan:
    """Lists the images under ``root`` (sorted, recursive) with their captions and labels.

    A folder with no caption at all (no sidecar, no table) gives empty captions: there is nothing to pair, and
    a VAE or a class-conditioned model needs none. ``classes``: the class list of another split (val_root).
    """
    if missing_caption not in ("skip", "empty"):
        raise UsageError(f"data.missing_caption={missing_caption}: must be skip or empty")
    if label_from not in (None, "folder"):
        raise UsageError(f"data.label_from={label_from}: must be null or folder")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.root={root}: no such directory")
    images, sidecars = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS and not name.startswith("."):
                images.append(rel)
            elif ext == ".txt":
                sidecars.add(rel)
    images.sort()
    table = _table_captions(root)
    has_captions = bool(sidecars or table)
    if classes is None and label_from == "folder":
        classes = sorted({r.split("/", 1)[0] for r in images if "/" in r})
    class_ids = {c: i for i, c in enumerate(classes or [])}

    records, skipped, used_captions = [], [], set()
    for rel in images:
        stem = os.path.splitext(rel)[0]
        label = -1
        if label_from == "folder":
            top = rel.split("/", 1)[0] if "/" in rel else None
            if top not in class_ids:
                skipped.append(f"{rel}: no class folder" if top is None else f"{rel}: class {top!r} not in train")
                continue
            label = class_ids[top]
        if f"{stem}.txt" in sidecars:
            used_captions.add(f"{stem}.txt")
            records.append(ImageRecord(rel, text_file=f"{stem}.txt", label=label))
        elif rel in table:
            records.append(ImageRecord(rel, text=table[rel], label=label))
        elif missing_caption == "empty" or not has_captions:
            records.append(ImageRecord(rel, text="", label=label))
        else:
            skipped.append(f"{rel}: no caption (data.missing_caption=empty keeps it)")
    orphans = sorted((sidecars - used_captions) | (set(table) - set(images)))
    skipped += [f"{o}: caption without an image" for o in orphans]
    return FolderScan(records, list(classes or []), skipped, len(images) + len(orphans))


def read_sizes(paths: list[Path], threads: int = 8) -> list[Bucket | None]:
    """Each image's (height, width) as displayed, from its header only (None where it does not read); threads,
    as the reads wait on the disk (or the network) rather than on the CPU."""
    if len(paths) < 64:
        return [size_or_none(p) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(size_or_none, paths, chunksize=64))


class ImageFolderDataset(ReplacingDataset):
    """Items ``{image, text, label, key, original_size, crop_coords}`` from a list of records (the last two for
    SD-XL's micro-conditioning); a broken file is replaced by the next good one.

    With the transform's buckets, ``sizes`` are the files' (height, width) (read from their headers when not
    given) and ``bucket_of`` gives each item's bucket; items then carry ``target_size`` too."""

    errors = (BadImage, OSError, UnicodeError)

    def __init__(self, root: str | Path, records: list[ImageRecord], transform: ImageTransform,
                 sizes: list[Bucket] | None = None):
        self.root, self.records, self.transform = Path(root), records, transform
        self.sizes = sizes
        buckets = transform.buckets
        if buckets is not None:
            if sizes is None:  # an unreadable header: the square bucket, where it is replaced when read
                self.sizes = sizes = [hw or (1, 1) for hw in read_sizes([self.root / r.rel for r in records])]
            self.bucket_of = [nearest_bucket(*hw, buckets) for hw in sizes]

    def __len__(self) -> int:
        return len(self.records)

    def name(self, index: int) -> str:
        return self.records[index].rel

    def load(self, index: int) -> dict:
        rec = self.records[index]
        bucket = self.bucket_of[index] if self.bucket_of is not None else None
        image, geometry = self.transform.with_geometry(self.root / rec.rel, bucket)
        text = rec.text
        if rec.text_file is not None:
            text = (self.root / rec.text_file).read_text(encoding="utf-8", errors="replace").strip()
        return {"image": image, "text": text, "label": rec.label, "key": rec.rel, **geometry}


class FolderDataModule(ImageDataModule):
    """``data=folder data.root=DIR``: images under ``root``, split by path hash (``val_fraction``) or given a
    separate ``val_root``. ``num_classes`` is known after setup() when ``label_from="folder"``."""

    counts_skips = True
    collate_fn = staticmethod(collate_counting_skips)

    def __init__(self, root: str, val_root: str | None = None, val_fraction: float = 0.05,
                 label_from: str | None = None, missing_caption: str = "skip", crop: str = "center",
                 flip: bool = False, min_size: int = 0, buckets: str | None = None, bucket_step: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.buckets = buckets
        self.bucket_list = choose_buckets(buckets, self.image_size, bucket_step)
        if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise UsageError(f"data.val_fraction={val_fraction}: must be a number in [0, 1)")
        self.root, self.val_root, self.val_fraction = root, val_root, val_fraction
        self.label_from, self.missing_caption = label_from, missing_caption
        self.crop, self.flip, self.min_size = crop, flip, min_size
        self.classes: list[str] = []
        self._scans: dict[str, FolderScan] | None = None

    @property
    def num_classes(self) -> int:
        self._scan()
        return len(self.classes)

    def _scan(self) -> dict[str, FolderScan]:
        if self._scans is None:
            train = scan_folder(self.root, self.missing_caption, self.label_from)
            self.classes = train.classes
            if self.val_root:
                val = scan_folder(self.val_root, self.missing_caption, self.label_from, classes=train.classes)
            else:
                val = FolderScan([r for r in train.records if split_of(r.rel, self.val_fraction) == "val"],
                                 train.classes, [], 0)
                train.records = [r for r in train.records if split_of(r.rel, self.val_fraction) == "train"]
                if self.val_fraction > 0 and not val.records and len(train.records) > 1:
                    # a tiny folder whose hashes all fell on "train": the lowest hash goes to val, still stable
                    first = min(train.records, key=lambda r: hashlib.sha1(r.rel.encode("utf-8")).digest())
                    train.records.remove(first)
                    val.records.append(first)
            self._scans = {"train": train, "val": val}
            skipped = train.skipped + val.skipped
            self.skips.add(len(skipped), train.found + val.found, skipped, reported=True)
            if skipped:
                log.warning("data: %d files under %s left out while listing, e.g. %s", len(skipped), self.root,
                            "; ".join(skipped[:MAX_EXAMPLES]))
            self.skips.check(len(skipped), train.found + val.found, final=True)
            if not train.records and (self.val_root or not val.records):  # else the split took them (setup says so)
                raise UsageError(f"data.root={self.root}: no usable images (extensions {IMAGE_EXTENSIONS})")
        return self._scans

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit") and not self.val_root:
            self.check_training_left()
        super().setup(stage)

    def check_training_left(self) -> None:
        """Stops a run whose ``val_fraction`` leaves fewer training images than one batch on every rank."""
        need, batch = self.one_batch()
        train, val = (len(self._scan()[split].records) for split in ("train", "val"))
        if val and train < need:
            raise UsageError(f"data.val_fraction={self.val_fraction} holds out {val} of the {train + val} usable "
                             f"images under data.root={self.root}, {leaving(train, batch)}: lower data.val_fraction "
                             "(0 trains on all), or give a separate validation folder with data.val_root")

    def build(self, split: str) -> Dataset:
        records = self._scan()[split].records
        if split == "train":  # a train_size cap keeps a spread of the folder, not its first sub-folders
            records = sorted(records, key=lambda r: hashlib.sha1(r.rel.encode("utf-8")).digest())
        if not records and (split == "train" or self.val_root or self.val_fraction > 0):
            log.warning("data: the %s split of %s is empty (val_fraction=%s)", split, self.root, self.val_fraction)
        crop = self.crop if split == "train" else "center"
        transform = ImageTransform(self.image_size, crop=crop, flip=self.flip and split == "train",
                                   min_size=self.min_size, buckets=self.bucket_list)
        root = self.root if split == "train" or not self.val_root else self.val_root
        if self.bucket_list is None:
            return ImageFolderDataset(root, records, transform)
        records, sizes = self._sized(root, records)
        dataset = ImageFolderDataset(root, records, transform, sizes)
        if records:
            log.info("data: %s images per bucket (data.buckets=%s): %s", split, self.buckets,
                     bucket_counts(dataset.bucket_of or []))
        return dataset

    def _sized(self, root: str, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[Bucket]]:
        """The records whose image header reads, with their sizes: a file without a size has no bucket, so it is
        left out (and counted as skipped) here rather than met in a batch of a bucket it cannot fill."""
        sizes = read_sizes([Path(root) / r.rel for r in records])
        bad = [f"{r.rel}: the image header does not read" for r, hw in zip(records, sizes) if hw is None]
        if bad:
            self.skips.add(len(bad), 0, bad, reported=True)
            log.warning("data: %d images under %s left out (no size to choose a bucket by), e.g. %s", len(bad),
                        root, "; ".join(bad[:MAX_EXAMPLES]))
        kept = [(r, hw) for r, hw in zip(records, sizes) if hw is not None]
        return [r for r, _ in kept], [hw for _, hw in kept]
