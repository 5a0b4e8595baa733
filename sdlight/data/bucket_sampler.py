"""Batches of one aspect-ratio bucket: a resumable sampler for map-style data, a buffer for streamed shards.

Map-style training data (``data=folder``, cached sizes): each epoch draws a seeded permutation (``seed + epoch``)
within each bucket and cuts it into *global* batches of ``batch_size x ranks`` items, dropping each bucket's
incomplete last one; the global batches are shuffled with the same generator and rank r takes the r-th slice of
``batch_size`` of each. So:

- every batch of every rank holds one bucket, and every rank gets the same number of batches (ranks step
  together, no collective waits);
- the union over ranks of global batch k is the same set of samples whatever the number of ranks, for the same
  ``batch_size x ranks``: a 1-process run with batch W·B trains on exactly the samples of a W-process run with
  batch B, step for step;
- what is dropped per epoch depends on ``batch_size x ranks`` (up to that many minus one per bucket), a
  different set of images each epoch.

The sampler yields one list of ``(index, item seed)`` keys per batch, read through ``SeededItems`` as the square
path does (draws keyed by (seed, epoch, index); ``sample_index`` travels in the batch). It is a
``ResumableSampler`` counting in batches, so ``ResumableLoader`` resumes it mid-epoch exactly, and a
DistributedSampler, so Lightning leaves it in place under DDP. Validation takes every sample: batches of
``batch_size`` per bucket in index order (the last one of a bucket short), dealt round-robin over ranks, the
list padded with its first batches to a multiple of the ranks (as DistributedSampler pads).

Streamed shards have no sizes up front: :class:`BucketBatches` keeps one pending list per bucket and emits a batch
when one fills.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from sdlight.data.resumable import ResumableSampler, item_seed
from sdlight.errors import UsageError

log = logging.getLogger("sdlight")


def buckets_of(dataset: Dataset) -> list[Hashable] | None:
    """The bucket of each item of ``dataset`` (a Subset's, by its indices), or None when it has none."""
    if isinstance(dataset, Subset):
        inner = buckets_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    buckets = getattr(dataset, "bucket_of", None)
    return None if buckets is None else list(buckets)


def bucket_counts(buckets: Sequence[Hashable]) -> str:
    """"512x768: 10, 640x640: 3" (largest first), for the log."""
    counts: dict[Hashable, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{'x'.join(map(str, b)) if isinstance(b, tuple) else b}: {n}"
                     for b, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class BatchedItems(Dataset):
    """``dataset`` read a batch of keys at a time (the DataLoader runs with ``batch_size=None``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, keys: Sequence[Any]) -> list[Any]:
        return [self.dataset[k] for k in keys]


class BucketSampler(ResumableSampler):
    """Yields per batch a list of keys of one bucket: ``(index, item seed)`` when ``shuffle`` (training), plain
    indices otherwise (validation). ``start`` (set by ResumableLoader) counts batches of this rank."""

    def __init__(self, dataset: Dataset, buckets: Sequence[Hashable], batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        if len(buckets) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(buckets)} buckets for {len(dataset)} items")  # type: ignore[arg-type]
        self.shuffle, self.batch_size = shuffle, batch_size
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = [groups[b] for b in sorted(groups)]  # a fixed order: the same draws on every rank
        if shuffle:
            per_step = batch_size * num_replicas
            kept = sum(len(g) // per_step * per_step for g in self.groups)
            if not kept:
                raise UsageError(f"data.buckets: no bucket holds one batch (data.batch_size={batch_size} x "
                                 f"{num_replicas} rank(s)); images per bucket: {bucket_counts(buckets)}. Lower "
                                 "data.batch_size, or set data.buckets=null")
            if kept < len(buckets):  # said once: the count is the same every epoch, the images differ
                log.info("data: buckets leave out %d of %d training images each epoch (the incomplete last batch "
                         "of %d per bucket; other images each epoch); images per bucket: %s", len(buckets) - kept,
                         len(buckets), per_step, bucket_counts(buckets))

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches of ``batch_size x ranks`` indices (training) or ``batch_size`` (validation)."""
        if not self.shuffle:
            return [g[i:i + self.batch_size] for g in self.groups for i in range(0, len(g), self.batch_size)]
        per_step = self.batch_size * self.num_replicas
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            batches += [order[i:i + per_step] for i in range(0, len(order) - per_step + 1, per_step)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches of the epoch."""
        batches = self.global_batches()
        if self.shuffle:
            b, r = self.batch_size, self.rank
            return [batch[r * b:(r + 1) * b] for batch in batches]
        world = self.num_replicas
        batches += batches[:(-len(batches)) % world]  # pad: every rank validates the same number of batches
        return batches[self.rank::world]

    def __len__(self) -> int:
        if self.shuffle:
            per_step = self.batch_size * self.num_replicas
            return sum(len(g) // per_step for g in self.groups)
        n = sum(-(-len(g) // self.batch_size) for g in self.groups)
        return -(-n // self.num_replicas)

    def __iter__(self) -> Iterator[list]:  # type: ignore[override]
        start, self.start = self.start, 0
        for batch in self.rank_batches()[start:]:
            yield [(i, item_seed(self.seed, self.epoch, i)) for i in batch] if self.shuffle else batch


def item_shape(item: dict) -> tuple[int, ...]:
    """The shape that groups a streamed item into a batch: its image's, or its cached latent's."""
    return tuple(item["image" if "image" in item else "latent_mean"].shape)


class BucketBatches:
    """A webdataset stage: items → batches of ``batch_size`` items of one shape, a pending list per shape, a
    batch emitted when its list fills (what is pending when the stream ends is dropped, as ``partial=False``).
    A class, not a closure: DataLoader workers and DDP spawn pickle it."""

    def __init__(self, batch_size: int, collate: Callable[[list], Any], key: Callable[[dict], Hashable] = item_shape):
        self.batch_size, self.collate, self.key = batch_size, collate, key

    def __call__(self, items: Iterable[dict]) -> Iterator[Any]:
        pending: dict[Hashable, list[dict]] = {}
        for item in items:
            group = pending.setdefault(self.key(item), [])
            group.append(item)
            if len(group) == self.batch_size:
                yield self.collate(pending.pop(self.key(item)))
