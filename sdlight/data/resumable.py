"""Training loaders that a checkpoint can put back where they were (Lightning's Stateful protocol).

Lightning restores its loop counters on resume, not the data order: a plain DataLoader starts its epoch over, with
a new shuffle. Here the order of an epoch is a seeded permutation (``seed + epoch``, as DistributedSampler draws
it) and the loader records how many batches of the epoch it handed out; ``load_state_dict`` makes the next
iteration start after them. Each item's random transforms (crops, flips) draw from generators seeded by
(seed, epoch, index) and isolated from the global ones, so an item is the same whichever worker loads it, whatever
came before it, and loading it in the main process leaves the training RNG untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdlight.diffusion.draw import KeyedDraws, mixed_seed

log = logging.getLogger("sdlight")


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` in ``epoch``."""
    return mixed_seed(seed % 2**32, epoch, index)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """torch (CPU), numpy and python's global generators seeded with ``seed`` for the block, then restored."""
    states = torch.random.default_generator.get_state(), np.random.get_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.default_generator.set_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


SAMPLE_INDEX = "sample_index"  # a training item's index in its dataset: what keys its training step's draws


def run_seed() -> int:
    """The run's seed (``seed_everything`` puts it in PL_GLOBAL_SEED, also for spawned processes); 0 without."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def keyed_draws(batch: dict[str, Any], step: int, seed: int | None = None) -> KeyedDraws | None:
    """The step's draws keyed by (run seed, ``step``, each item's dataset index) when the batch carries the
    indices (map-style training data), so that a sample draws the same numbers on 1 or N processes; else None
    (the process's generator: streamed shards)."""
    index = batch.get(SAMPLE_INDEX)
    return None if index is None else KeyedDraws(run_seed() if seed is None else seed, step, index)


class SeededItems(Dataset):
    """``dataset`` read with ``(index, seed)`` keys (from ResumableSampler): each item under its own seed, a dict
    item with its index as ``SAMPLE_INDEX``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with isolated_rng(seed):
            item = self.dataset[index]
        return {**item, SAMPLE_INDEX: index} if isinstance(item, dict) else item


class ResumableSampler(DistributedSampler):
    """DistributedSampler's seeded per-epoch permutation (split over ranks), yielding ``(index, item seed)`` and
    starting ``start`` samples into the epoch. A DistributedSampler, so Lightning keeps it under DDP instead of
    wrapping it."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        for index in indices[start:]:
            yield index, item_seed(self.seed, self.epoch, index)


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler whose ``state_dict`` is (epoch, batches handed out in it, seed).

    After ``load_state_dict``, the next iteration of that epoch skips the batches already trained on; Lightning
    sets the epoch (``set_epoch``) and counts the skipped batches itself. The DataLoader gets a private generator,
    so creating an iterator does not draw from the global RNG (which training uses).
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # a generator: this body runs at the first next(), after Lightning's set_epoch for the epoch
        sampler = self.sampler
        start = 0
        if self._resume is not None and isinstance(sampler, ResumableSampler):
            if self._resume["epoch"] == sampler.epoch:
                start = self._resume["batches"]
            self._resume = None
        if isinstance(sampler, ResumableSampler):
            sampler.start = start * (self.batch_size or 1)
        self._consumed = start
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {"epoch": int(getattr(sampler, "epoch", 0)), "batches": self._consumed,
                "seed": int(getattr(sampler, "seed", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        seed = int(getattr(self.sampler, "seed", 0))
        if int(state.get("seed", seed)) != seed:
            log.warning("data: the checkpoint's shuffle seed %s differs from this run's %s: the data order after "
                        "resuming is not the one of the interrupted run", state.get("seed"), seed)
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class StreamLoader(DataLoader):
    """A DataLoader over an iterable (webdataset) pipeline: resampled shards have no position to return to, so a
    resumed run continues at the right step with fresh randomness, and says so."""

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self._consumed = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._consumed = 0
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._consumed, "stream": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        log.info("data: streamed shards cannot return to their position: resuming at the checkpoint's step with "
                 "fresh samples (%d batches of the interrupted epoch were read)", int(state.get("batches", 0)))
