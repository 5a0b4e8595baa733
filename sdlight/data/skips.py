"""Broken samples are skipped and counted, never fatal, until there are too many.

Counts are made where the samples are read, often inside DataLoader worker processes, so they travel to the
main process inside the batch: ``_skipped`` is a (B,) int tensor (item i: how many bad reads it replaced) and
``_skipped_from`` a list of B strings ("" or "what: why" for the first bad read). Per-item fields slice and
concatenate like every other batch entry. The datamodule pops them before the batch reaches a stage
(``on_before_batch_transfer``), so stages and callbacks see today's batch shape; :class:`SkipMonitor` logs the
total as ``data/skipped`` and stops the run, on every rank at once, when the bad fraction is too high.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import Dataset

from sdlight.errors import UsageError

log = logging.getLogger("sdlight")

SKIPPED, SKIPPED_FROM = "_skipped", "_skipped_from"
MAX_EXAMPLES = 5


class TooManySkipped(UsageError):
    """More than ``max_skip_fraction`` of the samples read were broken."""


class SkipTally:
    """Running totals of samples read and skipped, with the first few offenders' names."""

    def __init__(self, max_skip_fraction: float = 0.1, min_reads: int = 100):
        if not 0 <= max_skip_fraction <= 1:
            raise UsageError(f"data.max_skip_fraction={max_skip_fraction}: must be in [0, 1]")
        self.max_skip_fraction, self.min_reads = max_skip_fraction, min_reads
        self.skipped = self.read = 0
        self.examples: list[str] = []
        self.warned_at = 0

    def add(self, skipped: int, read: int, examples: list[str] = ()) -> None:
        self.skipped += int(skipped)
        self.read += int(read)
        for e in examples:
            if e and e not in self.examples and len(self.examples) < MAX_EXAMPLES:
                self.examples.append(e)

    def take_from(self, batch: dict) -> dict:
        """Moves a batch's skip fields into the tally; returns the batch without them."""
        if SKIPPED in batch:
            counts = batch.pop(SKIPPED)
            names = batch.pop(SKIPPED_FROM, [])
            n = int(counts.sum())
            self.add(n, n + len(counts), list(names))
        return batch

    def message(self, skipped: int | None = None, read: int | None = None) -> str:
        skipped = self.skipped if skipped is None else skipped
        read = self.read if read is None else read
        share = skipped / max(read, 1)
        eg = "; ".join(self.examples[:MAX_EXAMPLES]) or "none on this rank"
        return f"skipped {skipped} broken samples of {read} read ({share:.1%}); first: {eg}"

    def warn_if_new(self) -> None:
        # at 1, 2, 4, 8 ... skips: a dataset with many broken files does not print a line per batch
        if self.skipped >= max(1, 2 * self.warned_at):
            log.warning("data: %s", self.message())
            self.warned_at = self.skipped

    def check(self, skipped: int, read: int, final: bool = False) -> None:
        """Raises TooManySkipped when the bad share of ``read`` exceeds the limit (after ``min_reads``
        samples, or at once when ``final``)."""
        if read and (final or read >= self.min_reads) and skipped / read > self.max_skip_fraction:
            raise TooManySkipped(f"data: {self.message(skipped, read)}, more than data.max_skip_fraction="
                                 f"{self.max_skip_fraction}. Fix or remove the files named, or raise the limit.")


def item_skip_fields(items: list[dict]) -> dict:
    """The batch's skip fields from per-item ``_skipped`` / ``_skipped_from`` entries (0 / "" when absent)."""
    return {SKIPPED: torch.tensor([int(it.get(SKIPPED, 0)) for it in items], dtype=torch.long),
            SKIPPED_FROM: [str(it.get(SKIPPED_FROM, "")) for it in items]}


class ReplacingDataset(Dataset):
    """A map-style dataset whose broken items are replaced by the next readable ones (index + 1, + 2, ...).

    Replacing rather than dropping keeps every batch, and under DDP every rank, at its size: no rank runs out
    of batches before the others. Subclasses define ``load(i)`` (raising ``errors`` for a broken item) and
    ``name(i)``; each item carries how many bad reads it replaced.
    """

    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    max_retries = 32

    def load(self, index: int) -> dict:
        """Item ``index``, raising one of ``errors`` when it is broken; each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} must define load(index)")

    def name(self, index: int) -> str:
        return str(index)

    def __getitem__(self, index: int) -> dict:
        bad: list[str] = []
        for attempt in range(self.max_retries + 1):
            i = (index + attempt) % len(self)
            try:
                item = self.load(i)
            except self.errors as exc:
                bad.append(f"{self.name(i)}: {exc}")
                continue
            item[SKIPPED], item[SKIPPED_FROM] = len(bad), bad[0] if bad else ""
            return item
        # a long run of broken items: the data, not a few files, is the problem
        raise TooManySkipped(f"data: {len(bad)} broken samples in a row, e.g. {'; '.join(bad[:MAX_EXAMPLES])}")


class SkipMonitor(L.Callback):
    """Logs ``data/skipped`` (summed over ranks) every ``log_every_n_steps`` batches and at each epoch's end,
    and raises TooManySkipped there. The sums are all-reduced at the same batch on every rank, so all ranks
    see the same totals and stop together: no rank is left waiting in a collective."""

    def __init__(self, tally: SkipTally):
        self.tally = tally

    def _totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int]:
        local = torch.tensor([self.tally.skipped, self.tally.read], dtype=torch.float64, device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        return int(total[0]), int(total[1])

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        skipped, read = self._totals(trainer, pl_module)
        pl_module.log("data/skipped", float(skipped), on_step=not final, on_epoch=final, rank_zero_only=True,
                      sync_dist=False)
        self.tally.warn_if_new()
        self.tally.check(skipped, read, final=final)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx % max(1, trainer.log_every_n_steps) == 0:
            self._report(trainer, pl_module, final=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, final=True)
