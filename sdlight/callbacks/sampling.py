"""What the sample-quality callbacks share: when to evaluate, a fixed set of conditions drawn from the val loader,
the work split across ranks, generation in chunks, a progress bar, and logging.

Every rank runs the same evaluation at the same global step (the metrics' states are synced with collective
calls, so a rank that skipped would hang the others). Items ``[0, num_samples)`` of the val loader are split
into contiguous per-rank slices; when the val set is smaller than ``num_samples`` its items are reused in order.
"""

from __future__ import annotations

import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from sdlight.diffusion.draw import mixed_seed
from sdlight.errors import UsageError

log = logging.getLogger("sdlight")
Batch = dict[str, Any]


def rank_slice(total: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``range(total)`` for ``rank``: ``total // world_size``, plus one on the first ranks."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def rank_chunks(total: int, chunk: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``range(total)`` for ``rank`` in whole chunks of ``chunk`` items (the last chunk may
    be short): chunk k is the same items, sampled from the same generator, on any number of processes."""
    chunks = rank_slice(-(-total // chunk), rank, world_size)
    return range(min(chunks.start * chunk, total), min(chunks.stop * chunk, total))


def sampling_takes_every_rank(trainer: L.Trainer) -> bool:
    """Whether the model's forward needs every rank at once (trainer=fsdp: each block's weights are gathered from
    all of them): then a sample drawn for rank 0 alone must be drawn by all ranks together."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy)


def val_dataloader(trainer: L.Trainer) -> DataLoader:
    """The (first) val loader, unsharded: from the datamodule, else the trainer's, else the module's hook."""
    candidates: list[Callable[[], Any]] = []
    if trainer.datamodule is not None:
        candidates.append(trainer.datamodule.val_dataloader)
    candidates.append(lambda: trainer.val_dataloaders)
    if trainer.lightning_module is not None:
        candidates.append(trainer.lightning_module.val_dataloader)
    for get in candidates:
        try:
            loader = get()
        except Exception:  # Lightning's default hooks raise when a val loader is not defined
            continue
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, DataLoader):
            return loader
    raise RuntimeError("the sample-quality callbacks need a val dataloader (conditions and real images come from it)")


@dataclass
class StandaloneTrainer:
    """The part of a ``Trainer`` the sample-quality callbacks read, for scoring a module outside ``fit`` in one
    process (``python -m sdlight.evaluate``): the val loader, rank 0 of 1, and the loggers metrics go to.

    ``callback.run(StandaloneTrainer(loader), module)`` evaluates once and logs like a training run would.
    """

    val_dataloaders: DataLoader
    loggers: list[Any] = field(default_factory=list)
    global_step: int = 0
    callback_metrics: dict[str, Tensor] = field(default_factory=dict)
    global_rank: int = 0
    world_size: int = 1
    is_global_zero: bool = True
    fast_dev_run: bool = False
    datamodule: Any = None
    lightning_module: Any = None
    progress_bar_callback: Any = None


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Join batches along the batch dimension: tensors are concatenated, lists chained."""
    if not batches:
        return {}
    out: Batch = {}
    for key, first in batches[0].items():
        if isinstance(first, Tensor):
            out[key] = torch.cat([b[key] for b in batches])
        else:
            out[key] = [v for b in batches for v in b[key]]
    return out


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _pick(batch: Batch, keys: Sequence[str] | None) -> Batch:
    if keys is None:
        return dict(batch)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"val batches have no {missing} (they have {sorted(batch)})")
    return {k: batch[k] for k in keys}


def _rebatch(items: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
    """Regroup a stream of batches into batches of ``batch_size`` (the last may be smaller)."""
    pending: list[Batch] = []
    count = 0
    for batch in items:
        pending.append(batch)
        count += batch_len(batch)
        while count >= batch_size:
            joined = concat_batches(pending)
            yield slice_batch(joined, 0, batch_size)
            rest = slice_batch(joined, batch_size, count)
            count -= batch_size
            pending = [rest] if count else []
    if count:
        yield concat_batches(pending)


def load_items(loader: DataLoader, items: range, keys: Sequence[str] | None = None,
               batch_size: int | None = None) -> Iterator[Batch]:
    """Yield items ``items`` (indices into the loader's order, reused cyclically) in batches, keeping ``keys``.

    Map-style datasets load only those items (a ``Subset`` with the loader's collate function and workers);
    iterable ones (webdataset) are read from the start and cut.
    """
    batch_size = batch_size or loader.batch_size or 1
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        if n == 0:
            raise RuntimeError("the val dataset is empty")
        subset = Subset(dataset, [i % n for i in items])
        sub_loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=loader.num_workers,
                                collate_fn=loader.collate_fn)
        for batch in sub_loader:
            yield _pick(batch, keys)
        return

    def stream() -> Iterator[Batch]:
        position = 0
        while position < items.stop:
            seen = position
            for batch in loader:
                batch = _pick(batch, keys)
                n = batch_len(batch)
                lo, hi = max(items.start - position, 0), min(items.stop - position, n)
                if hi > lo:
                    yield slice_batch(batch, lo, hi)
                position += n
                if position >= items.stop:
                    return
            if position == seen:
                raise RuntimeError("the val dataloader yielded no items")

    yield from _rebatch(stream(), batch_size)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module.eval()`` for the block, then the previous mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PlainProgress:
    """``advance(n)`` that logs ``description: done/total (elapsed)`` at each tenth of ``total`` and at the end."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done, self.next = description, total, 0, max(1, total // 10)
        self.start = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done >= self.next or self.done >= self.total:
            log.info(f"{self.description}: {self.done}/{self.total} ({time.perf_counter() - self.start:.1f} s)")
            self.next = self.done + max(1, self.total // 10)


@contextmanager
def progress_bar(trainer: L.Trainer, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on rank 0 in a terminal; yields ``advance(n)``. Without a terminal (SLURM logs, CI,
    ``nohup``), where rich prints nothing, rank 0 logs a plain line every 10 % instead.

    Inside a running ``RichProgressBar`` the task joins its display: rich allows one live display per console.
    """
    if trainer.is_global_zero and not sys.stdout.isatty():
        yield PlainProgress(description, total)
        return
    enabled = trainer.is_global_zero
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    shared = getattr(trainer.progress_bar_callback, "progress", None) if enabled else None
    if isinstance(shared, Progress) and shared.live.is_started:
        task = shared.add_task(description, total=total)
        try:
            yield lambda n: shared.update(task, advance=n)
        finally:
            shared.remove_task(task)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)


def log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger at the current step and into ``trainer.callback_metrics``.

    Logged directly rather than with ``LightningModule.log``: that is refused in ``on_train_end`` and, in
    ``on_train_batch_end``, reaches the loggers only on ``log_every_n_steps`` boundaries. ``callback_metrics``
    is what checkpoint monitors and the ``optimized_metric`` of sweeps read.
    """
    if not metrics:
        return
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    for logger in trainer.loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
    rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


class SampleEvaluationCallback(L.Callback, ABC):
    """Runs :meth:`evaluate` every ``every_n_steps`` optimizer steps and once when training ends.

    ``every_n_steps`` counts ``trainer.global_step``; an evaluation runs when a multiple of it is crossed, so
    modules that step two optimizers per batch (the GAN autoencoder) are evaluated too. ``every_n_steps=None``
    or 0 evaluates at the end only; ``at_train_end=False`` skips that. Nothing runs under ``fast_dev_run``.
    Samples are drawn with the module's EMA weights (``use_ema``), ``steps`` sampler steps and
    ``guidance_scale`` (None: the module's defaults), ``batch_size`` at a time, each chunk of the ``num_samples``
    from a generator keyed by (``seed``, the chunk's place): successive evaluations see the same noise and
    conditions, and 1 or N processes sample the same images (the ranks share the chunks).
    """

    def __init__(self, every_n_steps: int | None = None, num_samples: int = 1000, batch_size: int = 32,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 use_ema: bool = True, at_train_end: bool = True) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.num_samples, self.batch_size = num_samples, batch_size
        self.steps, self.guidance_scale, self.seed, self.use_ema = steps, guidance_scale, seed, use_ema
        self.at_train_end = at_train_end
        self.evaluations = 0
        self._prev_step = 0
        self._last_eval_step: int | None = None
        self._conditions: dict[tuple[int, int], Batch] = {}
        # where the images come from: None samples with the module (`sample`); the evaluate CLI hands every
        # metric the images it sampled once (`sdlight.evaluate.SampleSet`)
        self.images: Callable[[Any, Batch | None, int, torch.Generator], Tensor] | None = None

    # --------------------------------------------------------------------------------------------- schedule
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prev_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, n = trainer.global_step, self.every_n_steps
        if n and step // n > self._prev_step // n:
            self.run(trainer, pl_module)
        self._prev_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and self._last_eval_step != trainer.global_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate now (on every rank), log and return the metrics."""
        if trainer.fast_dev_run:
            return {}
        self.check_equal_shares(trainer)
        with torch.no_grad(), eval_mode(pl_module):
            metrics = self.evaluate(trainer, pl_module)
        self.evaluations += 1
        self._last_eval_step = trainer.global_step
        log_metrics(trainer, metrics)
        return metrics

    @abstractmethod
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute the metrics (called under ``no_grad`` with the module in eval mode, on every rank)."""

    def check_equal_shares(self, trainer: L.Trainer) -> None:
        """Under a sharded strategy every forward gathers weights from all ranks, so every rank must sample as many
        chunks as the others, or the ranks with fewer would leave the rest waiting for ever."""
        world = trainer.world_size
        chunks = -(-self.num_samples // self.batch_size)
        if sampling_takes_every_rank(trainer) and chunks % world:
            raise UsageError(f"{type(self).__name__}: num_samples={self.num_samples} makes {chunks} chunks of "
                             f"batch_size={self.batch_size}, which {world} sharded processes cannot share equally: "
                             f"give num_samples a multiple of {self.batch_size * world}")

    # ------------------------------------------------------------------------------------------ conditions
    def rank_items(self, trainer: L.Trainer, total: int | None = None) -> range:
        return rank_chunks(self.num_samples if total is None else total, self.batch_size, trainer.global_rank,
                           trainer.world_size)

    def conditions(self, trainer: L.Trainer, keys: Sequence[str]) -> Batch:
        """This rank's share of the first ``num_samples`` val items, reduced to ``keys``; fetched once."""
        if not keys:
            return {}
        cache_key = (trainer.global_rank, trainer.world_size)
        if cache_key not in self._conditions:
            loader = val_dataloader(trainer)
            batches = list(load_items(loader, self.rank_items(trainer), keys, self.batch_size))
            self._conditions[cache_key] = concat_batches(batches) if batches else {k: [] for k in keys}
        return self._conditions[cache_key]

    def sample(self, module: Any, conditions: Batch | None, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images of a training stage for ``conditions``, with the EMA weights (``use_ema``), ``steps`` sampler
        steps and ``guidance_scale``."""
        return module.generate(conditions, num_samples=n, steps=self.steps, guidance_scale=self.guidance_scale,
                               generator=generator, use_ema=self.use_ema)

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, conditions: Batch,
                 description: str) -> Iterator[tuple[Batch, Tensor]]:
        """Yield ``(condition chunk, images in [-1, 1] float32)`` for this rank, ``batch_size`` at a time.

        ``conditions`` holds this rank's items (see :meth:`conditions`); the module is conditioned on its
        ``condition_keys`` entries, or unconditionally when there are none.
        """
        keys = condition_keys(pl_module)
        total = batch_len(conditions) if conditions else len(self.rank_items(trainer))
        missing = [k for k in keys if k not in conditions]
        if missing:
            raise KeyError(f"the module is conditioned on {missing}, which the val batches do not provide")
        first = self.rank_items(trainer).start // self.batch_size
        generator = torch.Generator(device=pl_module.device)
        with progress_bar(trainer, description, total) as advance:
            for start in range(0, total, self.batch_size):
                stop = min(start + self.batch_size, total)
                generator.manual_seed(mixed_seed(self.seed, first + start // self.batch_size))
                chunk = slice_batch(conditions, start, stop)
                cond = {k: chunk[k].to(pl_module.device) if isinstance(chunk[k], Tensor) else chunk[k]
                        for k in keys} or None
                images = (self.images or self.sample)(pl_module, cond, stop - start, generator)
                if images.shape[0] != stop - start:
                    raise RuntimeError(f"generate returned {images.shape[0]} images for {stop - start} conditions")
                advance(stop - start)
                yield chunk, images.float()


def condition_keys(pl_module: L.LightningModule) -> list[str]:
    """The batch entries a module samples from (``condition_keys``); none for an unconditional one."""
    return list(getattr(pl_module, "condition_keys", []))


def to_unit_range(images: Tensor) -> Tensor:
    """Images in [-1, 1] → float32 in [0, 1] (clamped: samplers may overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)
