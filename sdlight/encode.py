"""Latent cache: ``python -m sdlight.encode ckpt=STAGE1.ckpt data=folder data.root=IMAGES out=DIR``.

Encodes the train and val splits of any data config once with the frozen autoencoder into webdataset shards
that ``data=latents data.root=DIR`` trains stage 2 from (layout: sdlight.data.latents). Each sample keeps the
posterior's mean and std, not one sample of it, so every epoch still draws a fresh posterior sample as training
on images does; ``text=true`` also stores a frozen text encoder's contexts.

- Images are center-cropped (one crop per image is cached); ``data.flip=true`` is refused: a flip would have to
  be cached as a second latent, and flips contradict captions that say left or right anyway. With
  ``data.buckets``, each image is encoded at its bucket (the batches of the encoder are grouped by shape) and
  each record keeps its latent shape and SD-XL's micro-conditioning (original size, crop corner, bucket).
- Restartable per shard: input position ``i`` always goes to shard ``i // shard_size``; finished shards are
  listed in ``DIR/progress.json`` and skipped when the same command runs again; a shard is written to a
  temporary file and renamed when whole. ``manifest.json`` is written last: its presence marks a finished cache.
- Broken images are skipped and counted, as in training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import sdlight
from sdlight.data.latents import (FORMAT, FORMAT_VERSION, MANIFEST, MICRO_CONDITIONING, LatentsDataModule,
                                  latent_record, storage_dtype)
from sdlight.data.shards import SkipCounting, WebDataModule, count_samples, iter_samples
from sdlight.data.skips import MAX_EXAMPLES, ReplacingDataset
from sdlight.data.transforms import BadImage
from sdlight.errors import UsageError
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors
from sdlight.models.latents import TEXT, is_frozen, text_encoder_sha256, weights_sha256

log = logging.getLogger("sdlight")
register_resolvers()

PROGRESS = "progress.json"
LOADER_ONLY = ("batch_size", "num_workers", "pin_memory", "persistent_workers")  # no effect on the content
Thunk = Callable[[], dict]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one, never half of one


def _load(load: Callable[[Any], dict], name: Callable[[Any], str], arg: Any) -> dict:
    try:
        return load(arg)
    except (BadImage, ValueError, OSError) as exc:
        raise BadImage(f"{name(arg)}: {exc}") from None


class _Loads(Dataset):
    """Runs the loaders of one shard's inputs (in DataLoader workers when asked); a broken input gives its
    reason as a string instead of an item."""

    def __init__(self, thunks: list[Thunk]):
        self.thunks = thunks

    def __len__(self) -> int:
        return len(self.thunks)

    def __getitem__(self, i: int) -> dict | str:
        try:
            return self.thunks[i]()
        except (BadImage, ValueError, OSError) as exc:
            return str(exc)


def split_inputs(dm: Any, split: str) -> tuple[Iterator[Thunk], int | None, SkipCounting | None]:
    """(a loader per input in a fixed order, their number if known, the tar-error counter of shard data)."""
    if isinstance(dm, WebDataModule) and split == "train":  # a single ordered pass, not the resampled stream
        counting = SkipCounting(dm.sample_loader("val"))
        load = partial(_load, dm.sample_loader("val"), lambda s: f"{s.get('__url__')}:{s.get('__key__')}")
        raw = (s for s in iter_samples(dm.urls, counting)
               if (s.get("__url__"), s.get("__key__")) not in dm._val_keys)
        try:
            total = count_samples(dm.urls) - len(dm._val_keys)
        except UsageError:  # remote shards: unknown until read
            total = None
        return (partial(load, s) for s in raw), total, counting
    dataset = dm.train_set if split == "train" else dm.val_set
    base, indices = dataset, range(len(dataset))
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, dataset.indices
    if isinstance(base, ReplacingDataset):  # its own load raises for a broken item (no silent replacement)
        load = partial(_load, base.load, base.name)
    else:
        load = partial(_load, base.__getitem__, str)
    return (partial(load, i) for i in indices), len(indices), None


class StorageError:
    """The worst rounding of the stored posterior: |Δmean| absolute and in units of the posterior's std (the
    noise every training step adds anyway), and |Δstd| / std."""

    def __init__(self, values: dict[str, float] | None = None):
        self.values = dict(values or {"mean_abs": 0.0, "mean_over_std": 0.0, "std_rel": 0.0})

    def update(self, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> None:
        d_mean = (mean - mean.to(dtype).float()).abs()
        d_std = (std - std.to(dtype).float()).abs() / std.clamp_min(1e-30)
        for key, value in (("mean_abs", d_mean.max()), ("mean_over_std", (d_mean / std.clamp_min(1e-30)).max()),
                           ("std_rel", d_std.max())):
            self.values[key] = max(self.values[key], float(value))

    def merge(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            self.values[key] = max(self.values.get(key, 0.0), float(value))


def _conditions(item: dict, key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"text": str(item.get("text", "")), "label": int(item.get("label", -1)),
                           "source": str(item.get("key", key))}
    if "attributes" in item:
        out["attributes"] = torch.as_tensor(item["attributes"]).tolist()
    out.update({k: torch.as_tensor(item[k]).tolist() for k in MICRO_CONDITIONING if k in item})
    return out


@torch.no_grad()
def _write_shard(path: Path, thunks: list[Thunk], first: int, first_stage: nn.Module,
                 text_encoder: nn.Module | None, dtype: torch.dtype, batch_size: int, num_workers: int,
                 device: torch.device, advance: Callable[[int], None]) -> dict[str, Any]:
    """Encodes one shard's inputs (input positions ``first`` ...) into ``path``; returns its record."""
    tmp = path.with_name(path.name + ".tmp")
    loader = DataLoader(_Loads(thunks), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    written, bad, error = 0, [], StorageError()
    position = first
    # a whole-second mtime: a float one makes tarfile add a 1 KiB pax header to every member
    with wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:
        for items in loader:
            keys = [f"{position + j:09d}" for j in range(len(items))]
            position += len(items)
            good = [(k, it) for k, it in zip(keys, items) if isinstance(it, dict)]
            bad += [it for it in items if isinstance(it, str)]
            advance(len(items))
            if not good:
                continue
            shapes = sorted({tuple(it["image"].shape) for _, it in good})  # several with aspect-ratio buckets
            encoded: dict[str, tuple] = {}
            for shape in shapes:
                group = [(k, it) for k, it in good if tuple(it["image"].shape) == shape]
                posterior = first_stage.encode(torch.stack([it["image"] for _, it in group]).to(device))
                mean, std = posterior.mean.float(), posterior.std.float()
                error.update(mean, std, dtype)
                context = text_encoder([it["text"] for _, it in group]).float() if text_encoder is not None else None
                for j, (key, _) in enumerate(group):
                    encoded[key] = (mean[j], std[j], None if context is None else context[j])
            for key, item in good:  # in input order, whatever the shapes
                mean, std, context = encoded[key]
                conditions = {**_conditions(item, key), "latent_shape": list(mean.shape)}
                sink.write(latent_record(key, mean, std, conditions, dtype, context))
            written += len(good)
    os.replace(tmp, path)
    return {"shard": path.name, "samples": written, "skipped": len(bad), "examples": bad[:MAX_EXAMPLES],
            "bytes": path.stat().st_size, "storage_error": error.values}


def _identity(first_stage_sha: str, text_sha: str | None, dtype: str, image_size: int, data_config: Any,
              shard_size: int) -> dict[str, Any]:
    data = {k: v for k, v in (data_config or {}).items() if k not in LOADER_ONLY}
    return {"first_stage_sha256": first_stage_sha, "text_encoder_sha256": text_sha, "dtype": dtype,
            "image_size": image_size, "data": data, "shard_size": shard_size}


def check_cacheable(datamodule: Any, text_encoder: nn.Module | None, shard_size: int) -> None:
    """What a latent cache cannot hold is refused (random flips, a learned text encoder's contexts, a cache of a
    cache); random crops become the center crop, said so."""
    if shard_size < 1:
        raise UsageError(f"shard_size={shard_size}: must be >= 1")
    if isinstance(datamodule, LatentsDataModule):
        raise UsageError("data=latents is already a latent cache: give the image data it was made from")
    if getattr(datamodule, "flip", False):
        raise UsageError("data.flip=true: the cache holds one orientation per image, so random flips cannot be "
                         "replayed from it; set data.flip=false")
    if getattr(datamodule, "crop", "center") != "center":
        log.info("data.crop=%s: the cache holds one center crop per image", datamodule.crop)
        datamodule.crop = "center"
    if text_encoder is not None and (not is_frozen(text_encoder) or getattr(text_encoder, "input_key", None) != TEXT):
        raise UsageError(f"text_encoder={type(text_encoder).__name__}: only a frozen, pretrained text encoder's "
                         "contexts can be cached (e.g. open_clip); a learned one trains with the UNet")


def encode_dataset(first_stage: nn.Module, datamodule: Any, out: str | Path, *, first_stage_ckpt: str = "?",
                   data_config: dict | None = None, text_encoder: nn.Module | None = None, dtype: str = "float16",
                   batch_size: int | None = None, num_workers: int | None = None, shard_size: int = 1000,
                   splits: tuple[str, ...] = ("train", "val"), device: str | torch.device = "cpu",
                   progress: bool = True) -> dict[str, Any]:
    """Writes the latent cache of ``datamodule``'s splits to ``out`` (finishing an interrupted run of the same
    settings); returns the manifest."""
    torch_dtype = storage_dtype(dtype)
    check_cacheable(datamodule, text_encoder, shard_size)
    device = torch.device(device)
    first_stage = first_stage.eval().requires_grad_(False).to(device)
    text_encoder = text_encoder.eval().to(device) if text_encoder is not None else None
    out = Path(out).expanduser()
    identity = _identity(weights_sha256(first_stage), text_encoder_sha256(text_encoder) if text_encoder else None,
                         dtype, int(datamodule.image_size), data_config, shard_size)
    for name in (MANIFEST, PROGRESS):
        if (out / name).is_file():
            done = json.loads((out / name).read_text())
            if done.get("identity") != identity:
                raise UsageError(f"out={out} holds a latent cache (or part of one) made with other settings "
                                 f"(autoencoder, text encoder, dtype, image size, data or shard_size): choose another "
                                 f"out, or delete {out} to start over")
            if name == MANIFEST:
                log.info("%s is already a finished cache of these settings", out)
                return done
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((out / PROGRESS).read_text()) if (out / PROGRESS).is_file() else \
        {"identity": identity, "shards": {}}
    datamodule.setup("fit")
    batch_size = batch_size or datamodule.batch_size
    num_workers = datamodule.num_workers if num_workers is None else num_workers
    for split in splits:
        thunks, total, counting = split_inputs(datamodule, split)
        bar = tqdm(total=total, desc=f"encode {split}", unit="img", disable=not progress)
        for k in range(10**9):
            chunk = [t for _, t in zip(range(shard_size), thunks)]
            if not chunk:
                break
            name = f"{split}-{k:06d}.tar"
            if name in state["shards"]:  # finished by an earlier run: its inputs are not even decoded
                bar.update(len(chunk))
                continue
            start = time.perf_counter()
            record = _write_shard(out / name, chunk, k * shard_size, first_stage, text_encoder, torch_dtype,
                                  batch_size, num_workers, device, bar.update)
            state["shards"][name] = record
            _write_json(out / PROGRESS, state)
            log.info("encode %s: %s, %d samples (%d broken), %.1f images/s", split, name, record["samples"],
                     record["skipped"], len(chunk) / max(time.perf_counter() - start, 1e-9))
        bar.close()
        if counting is not None and counting.broken_shards:  # unreadable tars of the input shards
            state.setdefault("unreadable", {})[split] = [len(counting.broken_shards), counting.broken_shards[0][1]]
    manifest = _manifest(state, identity, first_stage, first_stage_ckpt, text_encoder, data_config, dtype,
                         int(datamodule.image_size), splits, out)
    buckets = getattr(datamodule, "bucket_list", None)
    manifest["buckets"] = {"name": datamodule.buckets, "sizes": [list(b) for b in buckets]} if buckets else None
    manifest["format_version"] = FORMAT_VERSION if buckets else 1  # a square cache stays readable by older sdlight
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return manifest


@torch.no_grad()
def _manifest(state: dict, identity: dict, first_stage: nn.Module, ckpt: str, text_encoder: nn.Module | None,
              data_config: Any, dtype: str, image_size: int, splits: tuple[str, ...], out: Path) -> dict[str, Any]:
    f = first_stage.downsample_factor
    latent_shape = [first_stage.latent_channels, image_size // f, image_size // f]
    text = None
    if text_encoder is not None:
        context = text_encoder([""])
        text = {"class": type(text_encoder).__name__, "sha256": identity["text_encoder_sha256"],
                "context_shape": list(context.shape[1:]), "layer": getattr(text_encoder, "layer", None),
                "max_length": getattr(text_encoder, "max_length", None)}
    error = StorageError()
    split_info = {}
    for split in splits:
        records = [r for n, r in sorted(state["shards"].items()) if n.startswith(f"{split}-")]
        for r in records:
            error.merge(r["storage_error"])
        examples = [e for r in records for e in r["examples"]][:MAX_EXAMPLES]
        unreadable = state.get("unreadable", {}).get(split)
        split_info[split] = {"shards": [r["shard"] for r in records if r["samples"]],
                             "samples": sum(r["samples"] for r in records),
                             "skipped": sum(r["skipped"] for r in records) + (unreadable[0] if unreadable else 0),
                             "skipped_examples": examples + ([unreadable[1]] if unreadable else [])}
    samples = sum(s["samples"] for s in split_info.values())
    total_bytes = sum(r["bytes"] for r in state["shards"].values() if r["samples"])
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "sdlight_version": sdlight.__version__,
            "identity": identity,
            "first_stage": {"ckpt": str(ckpt), "sha256": identity["first_stage_sha256"],
                            "config": getattr(first_stage, "config", None)},
            "image_size": image_size, "latent_shape": latent_shape, "dtype": dtype, "crop": "center",
            "data": data_config, "text_encoder": text, "splits": split_info,
            "bytes_per_image": round(total_bytes / max(samples, 1), 1), "storage_error": error.values}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="encode")
def main(cfg: DictConfig) -> None:
    from sdlight.sampling_checks import resolve_device

    with user_errors():
        if cfg.text and cfg.get("text_encoder") is None:
            raise UsageError("text=true needs the frozen text encoder of the model to train: add "
                             "+model/conditioning@text_encoder=open_clip (and its options)")
        device = resolve_device(cfg.device)  # before the autoencoder is loaded
        first_stage = hydra.utils.instantiate(cfg.first_stage)
        datamodule = hydra.utils.instantiate(cfg.data)
        text_encoder = hydra.utils.instantiate(cfg.text_encoder) if cfg.text else None
        manifest = encode_dataset(
            first_stage, datamodule, cfg.out, first_stage_ckpt=str(cfg.ckpt),
            data_config=OmegaConf.to_container(cfg.data, resolve=True), text_encoder=text_encoder, dtype=cfg.dtype,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, shard_size=cfg.shard_size,
            splits=tuple(cfg.splits), device=device, progress=cfg.progress)
    counts = ", ".join(f"{s}: {v['samples']} ({v['skipped']} broken)" for s, v in manifest["splits"].items())
    log.info(f"Wrote the latent cache {cfg.out} ({counts}; {manifest['bytes_per_image']:.0f} bytes per image, "
             f"{manifest['dtype']})")
    log.info(f"Train stage 2 from it with: data=latents data.root={cfg.out}")


if __name__ == "__main__":
    main()
