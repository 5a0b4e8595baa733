"""Broken samples are skipped and counted, never fatal, until there are too many.

Counts are made where the samples are read, often inside DataLoader worker processes, so they travel to the
main process inside the batch: ``_skipped`` is a (B,) int tensor (item i: how many bad reads it replaced),
``_skipped_from`` a list of B strings (one "what: why" line per bad read, "" for none) and ``_broken_shards`` a
list of B tuples of (url, "what: why") for tar shards that ended early or did not open. A broken shard counts as
one skipped input once per epoch on each rank, however often it is drawn: the samples after a cut cannot be
counted (a tar has no index), and counting each visit would make one bad shard of a few look like many broken
samples. Per-item fields slice and concatenate like every other batch entry. The datamodule pops them before the
batch reaches a stage (``on_before_batch_transfer``), so stages and callbacks see today's batch shape;
:class:`SkipMonitor` logs the total as ``data/skipped`` and stops the run, on every rank at once, when the bad
fraction is too high.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import Dataset, default_collate

from sdlight.errors import UsageError

log = logging.getLogger("sdlight")

SKIPPED, SKIPPED_FROM, BROKEN_SHARDS = "_skipped", "_skipped_from", "_broken_shards"
SKIP_FIELDS = (SKIPPED, SKIPPED_FROM, BROKEN_SHARDS)
MAX_EXAMPLES = 5


class TooManySkipped(UsageError):
    """More than ``max_skip_fraction`` of the samples read were broken."""


class SkipTally:
    """Running totals of inputs read and skipped (broken shards among them), with the first offenders' names.

    Each broken input is warned about once, when it is first seen, not at each epoch that reads it again.
    """

    def __init__(self, max_skip_fraction: float = 0.1, min_reads: int = 100):
        if not 0 <= max_skip_fraction <= 1:
            raise UsageError(f"data.max_skip_fraction={max_skip_fraction}: must be in [0, 1]")
        self.max_skip_fraction, self.min_reads = max_skip_fraction, min_reads
        self.skipped = self.read = self.shards = 0
        self.examples: list[str] = []
        self.seen: set[str] = set()  # every offender named so far (the "what" of its "what: why" line)
        self.new: list[str] = []     # named since the last warning
        self.epoch_shards: set[str] = set()  # broken shards already counted this epoch

    def add(self, skipped: int, read: int, examples: Sequence[str] = (), shards: int = 0,
            reported: bool = False) -> None:
        """Counts ``skipped`` of ``read`` inputs (``shards`` of them broken shards); ``reported``: the caller has
        already warned about ``examples``."""
        self.skipped += int(skipped)
        self.read += int(read)
        self.shards += int(shards)
        for line in examples:
            # "what: why" lines; the same input can give another why (an object's address in the message)
            what = line.split(": ", 1)[0]
            if line and what not in self.seen:
                self.seen.add(what)
                if len(self.examples) < MAX_EXAMPLES:
                    self.examples.append(line)
                if not reported:
                    self.new.append(line)

    def new_epoch(self) -> None:
        self.epoch_shards.clear()

    def take_from(self, batch: dict) -> dict:
        """Moves a batch's skip fields into the tally; returns the batch without them."""
        if SKIPPED in batch:
            counts = batch.pop(SKIPPED)
            names = batch.pop(SKIPPED_FROM, [])
            n = int(counts.sum())
            self.add(n, n + len(counts), [line for lines in names for line in lines.splitlines()])
            for url, what in (pair for pairs in batch.pop(BROKEN_SHARDS, []) for pair in pairs):
                if url not in self.epoch_shards:
                    self.epoch_shards.add(url)
                    self.add(1, 1, [what], shards=1)
        return batch

    def summary(self, skipped: int | None = None, read: int | None = None, shards: int | None = None) -> str:
        """What was counted: "skipped N broken samples of M read (x %)", naming the broken shards among them."""
        skipped = self.skipped if skipped is None else skipped
        read = self.read if read is None else read
        shards = self.shards if shards is None else shards
        share = f"{skipped / max(read, 1):.1%}"
        if not shards:
            return f"skipped {skipped} broken samples of {read} read ({share})"
        return (f"skipped {skipped} of {read} inputs read ({share}): {skipped - shards} broken samples and {shards} "
                f"truncated or unreadable tar shard{'s' if shards > 1 else ''} (each counted once per epoch)")

    def warn_if_new(self) -> None:
        """One line naming the offenders seen since the last call (at most a few); nothing when none is new."""
        if self.new:
            more = f" (and {len(self.new) - MAX_EXAMPLES} more)" if len(self.new) > MAX_EXAMPLES else ""
            log.warning("data: %s; new: %s%s", self.summary(), "; ".join(self.new[:MAX_EXAMPLES]), more)
            self.new = []

    def check(self, skipped: int, read: int, final: bool = False, shards: int = 0) -> None:
        """Raises TooManySkipped when the bad share of ``read`` exceeds the limit (after ``min_reads``
        samples, or at once when ``final``)."""
        if read and (final or read >= self.min_reads) and skipped / read > self.max_skip_fraction:
            first = "; ".join(self.examples) or "none on this rank"
            raise TooManySkipped(f"data: {self.summary(skipped, read, shards)}; first: {first}, more than "
                                 f"data.max_skip_fraction={self.max_skip_fraction}. Fix or remove the files named, "
                                 "or raise the limit.")


def collate_counting_skips(items: list[dict]) -> dict:
    """default_collate for the batch fields; the per-item skip fields as a tensor and lists (0 / "" / () when
    absent)."""
    skip = {SKIPPED: torch.tensor([int(it.get(SKIPPED, 0)) for it in items], dtype=torch.long),
            SKIPPED_FROM: [str(it.get(SKIPPED_FROM, "")) for it in items],
            BROKEN_SHARDS: [tuple(it.get(BROKEN_SHARDS, ())) for it in items]}
    return {**default_collate([{k: v for k, v in it.items() if k not in SKIP_FIELDS} for it in items]), **skip}


class ReplacingDataset(Dataset):
    """A map-style dataset whose broken items are replaced by the next readable ones (index + 1, + 2, ...).

    Replacing rather than dropping keeps every batch, and under DDP every rank, at its size: no rank runs out
    of batches before the others. Subclasses define ``load(i)`` (raising ``errors`` for a broken item) and
    ``name(i)``; each item carries how many bad reads it replaced.
    """

    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    max_retries = 32
    # with aspect-ratio buckets: each item's bucket; a broken item is then replaced from its own bucket, so that
    # a batch of one bucket stays one (sdlight.data.bucket_sampler)
    bucket_of: list | None = None
    _bucket_rings: dict | None = None

    def load(self, index: int) -> dict:
        """Item ``index``, raising one of ``errors`` when it is broken; each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} must define load(index)")

    def name(self, index: int) -> str:
        return str(index)

    def candidates(self, index: int) -> list[int]:
        """``index``, then the items that replace it when it is broken: the next ones (in its bucket, if any)."""
        if self.bucket_of is None:
            return [(index + a) % len(self) for a in range(self.max_retries + 1)]
        if self._bucket_rings is None:
            rings: dict = {}
            for i, bucket in enumerate(self.bucket_of):
                rings.setdefault(bucket, []).append(i)
            self._bucket_rings = {b: ({i: k for k, i in enumerate(ring)}, ring) for b, ring in rings.items()}
        where, ring = self._bucket_rings[self.bucket_of[index]]
        start = where[index]
        return [ring[(start + a) % len(ring)] for a in range(min(len(ring), self.max_retries + 1))]

    def __getitem__(self, index: int) -> dict:
        bad: list[str] = []
        for i in self.candidates(index):
            try:
                item = self.load(i)
            except self.errors as exc:
                bad.append(f"{self.name(i)}: {exc}")
                continue
            item[SKIPPED], item[SKIPPED_FROM] = len(bad), "\n".join(bad)
            return item
        # a long run of broken items: the data, not a few files, is the problem
        raise TooManySkipped(f"data: {len(bad)} broken samples in a row, e.g. {'; '.join(bad[:MAX_EXAMPLES])}")


class SkipMonitor(L.Callback):
    """Logs ``data/skipped`` (summed over ranks) every ``log_every_n_steps`` batches and at each epoch's end,
    and raises TooManySkipped there. The sums are all-reduced at the same batch on every rank, so all ranks
    see the same totals and stop together: no rank is left waiting in a collective."""

    def __init__(self, tally: SkipTally):
        self.tally = tally

    def _totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int, int]:
        tally = self.tally
        local = torch.tensor([tally.skipped, tally.read, tally.shards], dtype=torch.float64, device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        return int(total[0]), int(total[1]), int(total[2])

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        skipped, read, shards = self._totals(trainer, pl_module)
        pl_module.log("data/skipped", float(skipped), on_step=not final, on_epoch=final, rank_zero_only=True,
                      sync_dist=False)
        self.tally.warn_if_new()
        self.tally.check(skipped, read, final=final, shards=shards)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.tally.new_epoch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx % max(1, trainer.log_every_n_steps) == 0:
            self._report(trainer, pl_module, final=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, final=True)
