"""``data=latents data.root=DIR``: stage 2 from a latent cache written by ``python -m sdlight.encode``.

A cache is a folder of webdataset shards, ``train-NNNNNN.tar`` and ``val-NNNNNN.tar``, and ``manifest.json``
(the autoencoder's content hash and config, image size, latent shape, storage dtype, the data config it was made
from, counts). Each sample holds:

- ``KEY.latent``: the posterior's mean then its std, ``(2, C, h, w)`` raw bytes in the manifest's dtype
  (no pickle, nothing to execute; a wrong length marks the sample broken);
- ``KEY.json``: ``{"text", "label"[, "attributes"], "source", "latent_shape"[, "original_size", "crop_coords",
  "target_size"]}``, the conditions as the image data gave them, the latent's (C, h, w) and SD-XL's
  micro-conditioning when the images had it;
- ``KEY.context`` (``encode.text=true``): a frozen text encoder's ``(L, D)`` context, raw bytes.

Reading reuses data=webdataset entirely (resampled shards, ``with_epoch``, split_by_node/worker, a fixed
validation set, broken samples counted); only what a sample turns into differs. Batches carry ``latent_mean``,
``latent_std`` (and ``context``) in place of ``image``, next to ``text`` / ``label`` / ``attributes``.

A cache encoded with aspect-ratio buckets (``data.buckets``, format version 2) holds each image at its bucket, so
latents differ in shape (each record's ``latent_shape``; the manifest's is the square one); batches then gather
latents of one shape (sdlight.data.bucket_sampler).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlight.data.shards import WebDataModule
from sdlight.errors import UsageError

log = logging.getLogger("sdlight")

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "sdlight.latents", 2  # 2: per-record latent shapes (buckets); a cache without stays 1
MICRO_CONDITIONING = ("original_size", "crop_coords", "target_size")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype={name}: the cache stores float16, bfloat16 or float32")
    return DTYPES[name]


def to_bytes(tensor: Tensor, dtype: torch.dtype) -> bytes:
    return tensor.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> Tensor:
    expected = dtype.itemsize * int(torch.Size(shape).numel())
    if len(data) != expected:
        raise ValueError(f"{what}: {len(data)} bytes, expected {expected} ({tuple(shape)} {dtype})")
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def latent_record(key: str, mean: Tensor, std: Tensor, conditions: Mapping[str, Any], dtype: torch.dtype,
                  context: Tensor | None = None) -> dict[str, Any]:
    """One cache sample for webdataset's TarWriter: ``mean`` / ``std`` (C, h, w), conditions, optional context."""
    record = {"__key__": key, "latent": to_bytes(torch.stack([mean, std]), dtype),
              "json": json.dumps(dict(conditions)).encode("utf-8")}
    if context is not None:
        record["context"] = to_bytes(context, dtype)
    return record


class LatentSample:
    """A raw cache sample → ``{latent_mean, latent_std, text, label[, attributes][, context], key}`` (tensors
    in the storage dtype: the stage widens them). Raises ValueError for a broken sample."""

    def __init__(self, latent_shape: tuple[int, int, int], dtype: torch.dtype,
                 context_shape: tuple[int, int] | None = None):
        self.latent_shape, self.dtype, self.context_shape = tuple(latent_shape), dtype, context_shape

    def __call__(self, sample: dict) -> dict:
        name = f"{os.path.basename(str(sample.get('__url__', '?')))}:{sample.get('__key__', '?')}"
        if "latent" not in sample or "json" not in sample:
            raise ValueError(f"{name}: no latent or json")
        meta = json.loads(sample["json"].decode("utf-8"))
        shape = tuple(meta.get("latent_shape", self.latent_shape))
        mean, std = from_bytes(sample["latent"], self.dtype, (2, *shape), f"{name}.latent")
        item = {"latent_mean": mean, "latent_std": std, "text": str(meta.get("text", "")),
                "label": int(meta.get("label", -1)), "key": sample["__key__"]}
        item.update({k: torch.tensor(meta[k]) for k in MICRO_CONDITIONING if k in meta})
        if "attributes" in meta:
            item["attributes"] = torch.tensor(meta["attributes"])
        if self.context_shape is not None:
            if "context" not in sample:
                raise ValueError(f"{name}: no context")
            item["context"] = from_bytes(sample["context"], self.dtype, self.context_shape, f"{name}.context")
        return item


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The cache's manifest, with ``root`` added; a UsageError when there is none (or not a cache's)."""
    path = Path(root).expanduser() / MANIFEST
    if not path.is_file():
        if (path.parent / "progress.json").is_file():
            raise UsageError(f"data.root={root}: an unfinished latent cache (no {MANIFEST} yet): run the same "
                             "python -m sdlight.encode command again to finish it")
        raise UsageError(f"data.root={root}: no {MANIFEST}, so not a latent cache; write one with "
                         "python -m sdlight.encode ckpt=STAGE1.ckpt data=... out=DIR")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(f"{path}: not a latent cache this sdlight reads (format {manifest.get('format')} "
                         f"v{manifest.get('format_version')}, expected {FORMAT} v{FORMAT_VERSION})")
    manifest["root"] = str(root)
    return manifest


class LatentsDataModule(WebDataModule):
    """Cached posteriors for stage 2. ``train_size`` (samples per epoch) defaults to the cache's count;
    ``image_size``, if given, must be the cache's (the model's latent size follows it).

    ``first_stage_ckpt`` is only named in the error when the model's autoencoder is not the cache's (the
    stage compares content hashes at setup, see sdlight.models.latents).
    """

    has_images = False  # callbacks that need real images (FID statistics) skip, saying why
    max_default_workers = 2  # a cached sample is read, not decoded: few workers keep up

    def __init__(self, root: str, image_size: int | None = None, train_size: int | None = None,
                 val_size: int | None = None, shuffle_buffer: int = 1000, resampled: bool = True, seed: int = 0,
                 first_stage_ckpt: str | None = None, buckets: str | None = None, **kwargs):
        self.manifest = read_manifest(root)
        cached_buckets = self.manifest.get("buckets") or {}
        encoded_with = cached_buckets.get("name")
        if buckets is not None and buckets != encoded_with:
            raise UsageError(f"data.buckets={buckets} but data.root={root} was encoded with data.buckets="
                             f"{encoded_with or 'null'}: leave data.buckets=null (the cache's), or encode the images "
                             f"again with data.buckets={buckets}")
        cached = int(self.manifest["image_size"])
        if image_size is not None and int(image_size) != cached:
            raise UsageError(f"data.image_size={image_size} but data.root={root} holds latents of {cached} px "
                             f"images: set data.image_size={cached} (or encode the data at {image_size} px)")
        splits = self.manifest["splits"]
        shards = [str(Path(root) / s) for s in splits["train"]["shards"]]
        if not shards:
            raise UsageError(f"data.root={root}: the cache has no training samples")
        val = [str(Path(root) / s) for s in splits.get("val", {}).get("shards", [])]
        if not val:  # holding out the head of a small cache could leave training nothing; validate on it instead
            log.warning("data: the cache %s has no val split: validation reads training samples", root)
            val, val_size = shards, val_size if val_size is not None else min(256, splits["train"]["samples"])
        super().__init__(urls=shards, val_urls=val, shuffle_buffer=shuffle_buffer, resampled=resampled,
                         seed=seed, image_size=cached,
                         train_size=train_size if train_size is not None else int(splits["train"]["samples"]),
                         val_size=val_size, **kwargs)
        self.root, self.first_stage_ckpt = root, first_stage_ckpt
        if cached_buckets:  # batches of one latent shape
            self.buckets, self.bucket_list = encoded_with, [tuple(b) for b in cached_buckets["sizes"]]
        text = self.manifest.get("text_encoder")
        self._sample = LatentSample(tuple(self.manifest["latent_shape"]), storage_dtype(self.manifest["dtype"]),
                                    tuple(text["context_shape"]) if text else None)

    def sample_loader(self, split: str) -> Callable[[dict], dict]:
        return self._sample

    def count_samples(self) -> int:
        return int(self.manifest["splits"]["train"]["samples"])

    def check_training_left(self) -> None:
        """Stops a run whose cache holds fewer training samples than one batch on every rank (its validation
        share was set aside when the cache was encoded)."""
        need, batch = self.one_batch()
        held = int(self.manifest["splits"].get("val", {}).get("samples", 0))
        if self.count_samples() < need:
            raise UsageError(f"data.root={self.root} holds {self.count_samples()} training samples (and {held} for "
                             f"validation), fewer than {batch}: lower data.batch_size, or encode the cache with a "
                             "smaller validation share of the image data (its data.val_size or data.val_fraction)")
