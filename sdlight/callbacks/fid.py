"""FID and KID of generated samples against the val images (rFID of reconstructions for the autoencoder).

Numbers are comparable with papers (torch-fidelity / the TF reference implementation) because:

- features are the 2048-d pool3 of the TF FID Inception (``pt_inception-2015-12-05``), from a file resolved by
  :func:`sdlight.weights.resolve_weights` (no download when offline);
- images are quantised to uint8 with rounding, as if saved to PNG, then resized to 299x299 with TF1's bilinear
  resize *without antialiasing* (``NoTrainInceptionV3(antialias=False)``; torchmetrics defaults to an
  antialiased resize, which gives different, non-comparable numbers);
- statistics are accumulated in float64 (torchmetrics' FID states).

The Inception runs once per image in this callback and its features feed both torchmetrics metrics (FID, and
KID when ``kid=True``), which therefore receive features rather than images. The network is an attribute of
the callback only: it is not in the module's ``state_dict``, not in an EMA copy, and not in checkpoints.

Real statistics depend on (dataset, resolution, number of real images, extractor); they are computed once and
cached under ``cache_dir`` as ``(sum, cov_sum, n)`` (plus the features themselves when KID needs them).
Under DDP every rank extracts its share, sums are all-reduced, and the real states are then held by rank 0
alone (zeros elsewhere) so that torchmetrics' own sum-sync at ``compute`` counts them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from sdlight.callbacks.sampling import (SampleEvaluationCallback, condition_keys, load_items, progress_bar,
                                        rank_slice, to_unit_range, val_dataloader)
from sdlight.weights import load_state_dict, resolve_weights

log = logging.getLogger("sdlight")
CACHE_FORMAT = 1


class InceptionFeatures(nn.Module):
    """The FID Inception's pool3 features ``(B, 2048)`` of images ``(B, 3, H, W)`` in [0, 1].

    Images are rounded to uint8 and resized with TF1-exact bilinear interpolation (no antialiasing), which is
    what the reference implementation and torch-fidelity do.
    """

    num_features = 2048
    extractor_id = "pt_inception-2015-12-05/pool3/uint8-round/tf1-bilinear"

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # torch-fidelity unpickles the file with weights_only=False: check first that it is a plain state dict
        load_state_dict(weights_path)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights_path), antialias=False)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return self.net(pixels)


class _Features(nn.Identity):
    """What the torchmetrics metrics see as their "network": the features are computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def extractor_id(extractor: nn.Module) -> str:
    """A stable name for the features: ``extractor.extractor_id``, else class name + a hash of the weights."""
    if isinstance(getattr(extractor, "extractor_id", None), str):
        return extractor.extractor_id
    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(extractor).__qualname__}-{digest.hexdigest()[:16]}"


def first_image(loader: DataLoader) -> Tensor:
    return next(load_items(loader, range(1), ["image"], 1))["image"][0]


def dataset_fingerprint(loader: DataLoader) -> dict[str, Any]:
    """Identifies a val set: class, length, its simple public attributes, and a hash of its first image."""
    dataset = loader.dataset
    sized = not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")
    attributes = {k: v for k, v in sorted(vars(dataset).items())
                  if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
    pixels = first_image(loader).float().contiguous().numpy().tobytes()
    return {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
            "length": len(dataset) if sized else None, "attributes": attributes,
            "first_image": hashlib.blake2b(pixels, digest_size=8).hexdigest()}


class FIDCallback(SampleEvaluationCallback):
    """Logs ``val/fid`` of ``num_samples`` generated images (``val/rfid`` of reconstructions for a stage-1
    module with ``.autoencoder``), and ``val/kid_mean`` / ``val/kid_std`` when ``kid=True``.

    Real images are the first ``num_real`` (default ``num_samples``) items of the val loader; FID is biased
    upwards at small sample counts, so only compare numbers computed with the same counts.
    ``feature_extractor`` replaces the Inception by any module mapping ``(B, 3, H, W)`` images in [0, 1] to
    ``(B, F)`` features, with an int ``num_features``. ``cache_dir=None`` keeps real statistics in memory only.
    """

    def __init__(self, every_n_steps: int | None = 5000, num_samples: int = 10000, batch_size: int = 50,
                 steps: int | None = 50, guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                 at_train_end: bool = True, weights_path: str | os.PathLike | None = None,
                 feature_extractor: nn.Module | None = None, cache_dir: str | os.PathLike | None = None,
                 num_real: int | None = None, dataset_id: str | None = None, kid: bool = False,
                 kid_subsets: int = 100, kid_subset_size: int = 1000) -> None:
        super().__init__(every_n_steps, num_samples, batch_size, steps, guidance_scale, seed, use_ema, at_train_end)
        if num_samples < 2 or (num_real is not None and num_real < 2):
            raise ValueError("FID needs at least 2 generated and 2 real images")
        self.weights_path = weights_path
        self.extractor = feature_extractor
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.num_real, self.dataset_id = num_real, dataset_id
        self.kid_enabled, self.kid_subsets, self.kid_subset_size = kid, kid_subsets, kid_subset_size
        self.fid: FrechetInceptionDistance | None = None
        self.kid: KernelInceptionDistance | None = None
        self.real_stats: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.extractor is None:  # fails fast, before training starts, when the weights are missing
            self.extractor = InceptionFeatures(resolve_weights("pt_inception", path=self.weights_path))
        self.extractor.eval().requires_grad_(False)
        if self.fid is None:
            features = _Features(int(self.extractor.num_features))
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
            if self.kid_enabled:
                with warnings.catch_warnings():  # its warning that it keeps all features: known, and bounded here
                    warnings.simplefilter("ignore", UserWarning)
                    self.kid = KernelInceptionDistance(feature=features, subsets=self.kid_subsets,
                                                       subset_size=self.kid_subset_size, reset_real_features=False)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if getattr(trainer.datamodule, "has_images", True) is False:
            rank_zero_warn("FID: the data (a latent cache) holds no real images, so FID is skipped during training; "
                           "score the checkpoint with python -m sdlight.evaluate data=<the image data>")
            return {}
        reconstruct = not hasattr(pl_module, "generate")
        if reconstruct and not hasattr(pl_module, "autoencoder"):
            raise TypeError(f"{type(pl_module).__name__} has neither generate() nor .autoencoder: nothing to score")
        if self.fid is None:
            self.setup(trainer, pl_module, "fit")
        device = pl_module.device
        self.extractor.to(device)
        metrics = [m for m in (self.fid, self.kid) if m is not None]
        for metric in metrics:
            metric.to(device)
        loader = val_dataloader(trainer)
        n_fake, n_real = self._counts(loader, reconstruct)
        if n_fake < trainer.world_size or n_real < trainer.world_size:
            raise ValueError(f"{n_fake} generated / {n_real} real images cannot be shared by "
                             f"{trainer.world_size} ranks")
        if self.real_stats is None:
            self.real_stats = self._real_statistics(trainer, loader, n_real, device)
            self._load_real_states(trainer, self.real_stats, device)
        for metric in metrics:
            metric.reset()  # fake states only (reset_real_features=False)

        if reconstruct:
            items = rank_slice(n_fake, trainer.global_rank, trainer.world_size)
            with progress_bar(trainer, "rFID: reconstructing", len(items)) as advance:
                for batch in load_items(loader, items, ["image"], self.batch_size):
                    reconstruction, _ = pl_module.autoencoder(batch["image"].to(device), sample_posterior=False)
                    self._update_fake(reconstruction)
                    advance(len(reconstruction))
        else:
            conditions = self.conditions(trainer, condition_keys(pl_module))
            for _, images in self.generate(trainer, pl_module, conditions, "FID: sampling"):
                self._update_fake(images)

        out = {"val/rfid" if reconstruct else "val/fid": float(self.fid.compute())}
        if self.kid is not None:
            self.kid.subset_size = min(self.kid_subset_size, n_fake, n_real)
            # KID draws random subsets: a fixed seed keeps ranks in agreement and leaves the training RNG alone
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                kid_mean, kid_std = self.kid.compute()
            out.update({"val/kid_mean": float(kid_mean), "val/kid_std": float(kid_std)})
        return out

    def _counts(self, loader: DataLoader, reconstruct: bool) -> tuple[int, int]:
        dataset = loader.dataset
        size = len(dataset) if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") else None
        if reconstruct:  # rFID compares each val image with its own reconstruction
            n = min(self.num_samples, size) if size else self.num_samples
            return n, n
        n_real = self.num_real or self.num_samples
        if size is not None and n_real > size:
            rank_zero_warn(f"FID: {n_real} real images requested but the val set has {size}; using {size}")
            n_real = size
        return self.num_samples, n_real

    def _features(self, images: Tensor) -> Tensor:
        return self.extractor(to_unit_range(images)).double()

    def _update_fake(self, images: Tensor) -> None:
        features = self._features(images)
        self.fid.update(features, real=False)
        if self.kid is not None:
            self.kid.update(features, real=False)

    # ------------------------------------------------------------------------------------- real statistics
    def cache_fields(self, loader: DataLoader, n_real: int) -> dict[str, Any]:
        """What the real statistics depend on; the cache file's name is a hash of it."""
        return {"format": CACHE_FORMAT, "dataset": self.dataset_id or dataset_fingerprint(loader),
                "resolution": list(first_image(loader).shape[-2:]), "num_real": n_real,
                "extractor": extractor_id(self.extractor)}

    def cache_path(self, fields: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        resolution = "x".join(map(str, fields["resolution"]))
        return self.cache_dir / f"real-{resolution}-n{fields['num_real']}-{digest}.pt"

    def _real_statistics(self, trainer: L.Trainer, loader: DataLoader, n_real: int, device: torch.device
                         ) -> dict[str, Any]:
        fields = self.cache_fields(loader, n_real)
        path = self.cache_path(fields)
        stats = None
        if trainer.is_global_zero and path is not None and path.is_file():
            stats = load_real_statistics(path, fields, need_features=self.kid is not None)
        if trainer.world_size > 1:  # one decision for every rank, or the collectives below would not match
            stats = trainer.strategy.broadcast(stats, src=0)
        if stats is not None:
            rank_zero_info(f"FID: real statistics of {n_real} images loaded from {path}")
            return stats

        items = rank_slice(n_real, trainer.global_rank, trainer.world_size)
        total = torch.zeros(self.extractor.num_features, dtype=torch.float64, device=device)
        cov_sum = torch.zeros(len(total), len(total), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        kept: list[Tensor] = []
        with progress_bar(trainer, "FID: real statistics", len(items)) as advance:
            for batch in load_items(loader, items, ["image"], self.batch_size):
                features = self._features(batch["image"].to(device))
                total += features.sum(0)
                cov_sum += features.T @ features
                count += len(features)
                if self.kid is not None:
                    kept.append(features.float())
                advance(len(features))
        features = torch.cat(kept) if kept else None
        if trainer.world_size > 1:
            total, cov_sum, count = (trainer.strategy.reduce(t, reduce_op="sum") for t in (total, cov_sum, count))
            if features is not None:
                from torchmetrics.utilities.distributed import gather_all_tensors

                features = torch.cat(gather_all_tensors(features))  # rank order = item order
        stats = {"sum": total.cpu(), "cov_sum": cov_sum.cpu(), "n": int(count.item()),
                 "features": features.cpu() if features is not None else None, "fields": fields}
        if trainer.is_global_zero and path is not None:
            save_real_statistics(path, stats)
            rank_zero_info(f"FID: real statistics of {n_real} images cached at {path}")
        return stats

    def _load_real_states(self, trainer: L.Trainer, stats: dict[str, Any], device: torch.device) -> None:
        """Rank 0 holds the real totals, the others zeros: torchmetrics sums the states over ranks at compute."""
        first = trainer.global_rank == 0
        fid = self.fid
        fid.real_features_sum = stats["sum"].to(device) if first else torch.zeros_like(fid.real_features_sum)
        fid.real_features_cov_sum = (stats["cov_sum"].to(device) if first
                                     else torch.zeros_like(fid.real_features_cov_sum))
        fid.real_features_num_samples = torch.tensor(stats["n"] if first else 0, dtype=torch.long, device=device)
        if self.kid is not None:  # KID gathers its feature lists: give each rank a share
            share = rank_slice(len(stats["features"]), trainer.global_rank, trainer.world_size)
            self.kid.real_features = [stats["features"][share.start:share.stop].to(device).double()]


def save_real_statistics(path: Path, stats: dict[str, Any]) -> None:
    """Write atomically (a partial file is never seen by a concurrent run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fields = json.dumps(stats["fields"], sort_keys=True, default=str)
    payload = {"sum": stats["sum"], "cov_sum": stats["cov_sum"], "n": torch.tensor(stats["n"]),
               "fields": fields}
    if stats.get("features") is not None:
        payload["features"] = stats["features"]
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_real_statistics(path: Path, fields: dict[str, Any], need_features: bool = False) -> dict[str, Any] | None:
    """The cached statistics, or None when the file describes other data or lacks the features KID needs."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt cache is recomputed, not fatal
        log.warning(f"FID: ignoring unreadable cache {path}: {err}")
        return None
    if payload.get("fields") != json.dumps(fields, sort_keys=True, default=str):
        return None
    if need_features and payload.get("features") is None:
        return None
    return {"sum": payload["sum"], "cov_sum": payload["cov_sum"], "n": int(payload["n"]),
            "features": payload.get("features"), "fields": fields}
