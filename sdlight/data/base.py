"""The LightningDataModule shared by every dataset: loaders, workers, sizes, broken-sample counts, one batch shape."""

from __future__ import annotations

from collections.abc import Callable, Sized

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from sdlight.data.bucket_sampler import BatchedItems, BucketSampler, buckets_of
from sdlight.data.resumable import ResumableLoader, ResumableSampler, SeededItems, StreamLoader, run_seed
from sdlight.data.skips import SkipMonitor, SkipTally
from sdlight.errors import UsageError
from sdlight.threads import available_cpus


def check_count(option: str, value: object, minimum: int, nullable: bool = False) -> None:
    """A UsageError unless ``value`` is an integer >= ``minimum`` (or None when ``nullable``)."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"data.{option}={value}: must be an integer >= {minimum}" + (" or null" if nullable else ""))


def leaving(left: int, batch: str) -> str:
    """How a too-small training split reads in the errors of ``check_training_left``."""
    return f"leaving {left or 'none'} for training" + (f", fewer than {batch}" if batch else "")


class ImageDataModule(L.LightningDataModule):
    """Wraps a train and a val dataset whose items are ``{image, text, label[, attributes]}`` dicts.

    Subclasses implement ``build(split) -> Dataset``; everything about loading lives here.

    ``train_size`` / ``val_size``: samples per training epoch / in the validation set. Every datamodule accepts
    them, so an experiment tuned on one dataset composes with another: map-style datasets keep their first N
    items (None: all); the embedded shapes generate exactly N; shards read N per epoch.

    Datasets that read real files set ``counts_skips``: their batches carry skip counts (sdlight.data.skips),
    which are taken out before the batch reaches the model and logged as ``data/skipped``.
    """

    counts_skips = False
    collate_fn: Callable | None = None
    max_default_workers = 4  # num_workers=None: one loader process per CPU granted, at most this many

    def __init__(self, batch_size: int = 32, num_workers: int | None = 0, image_size: int = 32,
                 pin_memory: bool = False, persistent_workers: bool = False, train_size: int | None = None,
                 val_size: int | None = None, max_skip_fraction: float = 0.1, global_batch_size: int | None = None):
        super().__init__()
        check_count("batch_size", batch_size, 1)
        check_count("global_batch_size", global_batch_size, 1, nullable=True)
        self.global_batch_size = global_batch_size
        check_count("num_workers", num_workers, 0, nullable=True)
        if num_workers is None:  # more workers than CPUs only spin against each other (torch warns, too)
            num_workers = min(self.max_default_workers, available_cpus())
        check_count("image_size", image_size, 1)
        check_count("train_size", train_size, 1, nullable=True)
        check_count("val_size", val_size, 0, nullable=True)
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_size, self.val_size = train_size, val_size
        self.skips = SkipTally(max_skip_fraction)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def fit_global_batch(self, world: int) -> int:
        """With ``global_batch_size`` G over ``world`` processes: the per-process batch becomes ``batch_size``, or
        G / world when that is smaller, and the gradient accumulation returned makes batch x world x accumulation
        = G (one line naming a batch size that fits, when none does); 1 without G."""
        total = self.global_batch_size
        if total is None:
            return 1
        if total % world:
            raise UsageError(f"data.global_batch_size={total} does not split over {world} processes: give a "
                             f"multiple of {world}")
        per_process = total // world
        batch = min(self.batch_size, per_process)
        if per_process % batch:
            fits = max(d for d in range(1, batch + 1) if per_process % d == 0)
            raise UsageError(f"data.global_batch_size={total} is {per_process} per process, not a multiple of "
                             f"data.batch_size={self.batch_size}: give data.batch_size={fits} (or another divisor "
                             f"of {per_process})")
        self.batch_size = batch
        return per_process // batch

    def build(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train" or "val"); each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} must define build(split)")

    def one_batch(self) -> tuple[int, str]:
        """The fewest training samples a run can use, and how to say it: one batch on every rank under a Trainer;
        one sample (and no phrase) when the datasets are built without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, ""
        world = trainer.world_size
        return self.batch_size * world, f"one batch (data.batch_size={self.batch_size} x {world} rank" + \
            ("s)" if world > 1 else ")")

    @staticmethod
    def _first(dataset: Dataset, n: int | None) -> Dataset:
        if n is None or isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized) or len(dataset) <= n:
            return dataset
        return Subset(dataset, range(n))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._first(self.build("train"), self.train_size)
            self.val_set = self._first(self.build("val"), self.val_size)
        trainer = getattr(self, "trainer", None)
        # a datamodule cannot log; it brings the callback that does (once, even when setup runs again)
        if self.counts_skips and trainer is not None and \
                not any(isinstance(c, SkipMonitor) and c.tally is self.skips for c in trainer.callbacks):
            trainer.callbacks.append(SkipMonitor(self.skips))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                      persistent_workers=self.persistent_workers)
        if isinstance(dataset, IterableDataset):  # batches are made inside the pipeline; no len, no shuffle
            return (StreamLoader if shuffle else DataLoader)(dataset, batch_size=None, **common)
        buckets = buckets_of(dataset)
        if buckets is not None:
            return self._bucket_loader(dataset, buckets, shuffle, common)
        if not shuffle:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn, **common)
        return self._resumable_loader(dataset, common)

    def _resumable_loader(self, dataset: Dataset, common: dict) -> DataLoader:
        """The training loader: a seeded order per epoch, split over ranks, whose position a checkpoint keeps
        (sdlight.data.resumable). The seed is the run's (``seed_everything`` puts it in PL_GLOBAL_SEED)."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = run_seed()
        items = SeededItems(dataset)
        sampler = ResumableSampler(items, num_replicas=world, rank=rank, seed=seed)
        return ResumableLoader(items, batch_size=self.batch_size, sampler=sampler,
                               collate_fn=self.collate_fn, drop_last=sampler.num_samples >= self.batch_size,
                               generator=torch.Generator().manual_seed(seed), **common)

    def _bucket_loader(self, dataset: Dataset, buckets: list, shuffle: bool, common: dict) -> DataLoader:
        """Batches of one aspect-ratio bucket each (sdlight.data.bucket_sampler): for training, resumable and
        keyed as ``_resumable_loader``'s; for validation, every sample once, in order."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = run_seed()
        items = BatchedItems(SeededItems(dataset) if shuffle else dataset)
        sampler = BucketSampler(items, buckets, self.batch_size, num_replicas=world, rank=rank, seed=seed,
                                shuffle=shuffle)
        loader = ResumableLoader if shuffle else DataLoader
        return loader(items, batch_size=None, sampler=sampler, collate_fn=self.collate_fn or default_collate,
                      generator=torch.Generator().manual_seed(seed), **common)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.skips.take_from(batch) if isinstance(batch, dict) else batch
