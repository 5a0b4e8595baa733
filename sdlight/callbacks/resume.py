"""Exact resume: every global random generator in the checkpoint, and checkpoints that are never half written.

With the training loader's position (sdlight.data.resumable) and Lightning's own loop, optimizer and scheduler
state, a run stopped after k steps and resumed continues bit for bit as if it had never stopped (on the CPU).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from sdlight.checkpoints import save_atomic

log = logging.getLogger("sdlight")


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and ints (checkpoints load with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("resume: the checkpoint has CUDA generator states for %d devices, this machine %d: CUDA "
                        "randomness starts afresh", len(cuda), torch.cuda.device_count())


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (a list indexed by rank); ``[obj]`` outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def as_last_batch(loops: dict[str, Any]) -> bool:
    """Rewrites the fit loop's progress of a checkpoint saved at the end of an epoch (ModelCheckpoint's epoch-end
    save: after a whole epoch, or one cut short by ``max_steps`` or a time limit) into the form of a save at the end
    of its last batch; returns whether it did.

    Lightning resumes the epoch-end form wrongly in two ways: an epoch cut short is taken as finished, its remaining
    batches run all the same and the epoch counts twice (a run resumed towards a larger ``max_steps`` stops an epoch
    early); and with ``max_steps`` set, a whole epoch is taken as unfinished, so the next one starts at batch index
    ``num_batches`` and ends after one batch. The last-batch form is the one its loops are built to resume.
    """
    fit = loops.get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches or batches["current"]["completed"] < 1:
        return False
    if not epochs["current"]["processed"] > epochs["current"]["completed"]:
        return False
    for part in ("total", "current"):
        epochs[part]["processed"] -= 1
        batches[part]["completed"] -= 1
    state = fit.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in state:  # counted after on_train_batch_end; a resumed loop counts it again
        state["_batches_that_stepped"] -= 1
    return True


class ExactResume(L.Callback):
    """Saves the global generators of every rank (torch, CUDA, numpy, python) in checkpoints and restores them
    when training starts on resume; and saves the end of an epoch (whole, or cut short by ``max_steps`` or a time
    limit) as the end of its last batch, the form Lightning resumes exactly (see ``as_last_batch``).

    Validation (the sanity check included) runs on a copy of the generators: whether or not a validation happened
    before a checkpoint, or how many sanity batches a resumed run checks, the training stream is the same.
    (Data order and per-item randomness live in the training loader's state.)
    """

    def __init__(self) -> None:
        self._outside_validation: dict[str, Any] | None = None
        self._to_restore: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "loops" in checkpoint:
            as_last_batch(checkpoint["loops"])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.sanity_checking:
            self._outside_validation = rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            set_rng_state(self._outside_validation)
            self._outside_validation = None

    def state_dict(self) -> dict[str, Any]:
        # inside a validation (a checkpoint saved by a validation hook), the training stream is the saved one
        return {"ranks": _gather(self._outside_validation or rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("ranks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._to_restore:
            return
        ranks, self._to_restore = self._to_restore, None
        if len(ranks) != trainer.world_size:
            log.warning("resume: the checkpoint holds random states of %d ranks, this run has %d: ranks without "
                        "one keep their fresh seeds (the data order and the draws of map-style training data are "
                        "keyed by seed, step and sample, and continue the same)", len(ranks), trainer.world_size)
        if trainer.global_rank < len(ranks):
            set_rng_state(ranks[trainer.global_rank])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file, fsync and rename (sdlight.checkpoints
    .save_atomic): a process killed while writing leaves the previous checkpoint whole. Remote paths (``s3://``
    ...) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, Path(path))


def set_aside_earlier_checkpoints(callbacks: Iterable[L.Callback]) -> list[Path]:
    """For a run that starts afresh: checkpoint folders that already hold ``*.ckpt`` files (an earlier run in the
    same run directory) are renamed to ``<folder>_earlier_<time of their newest file>``, and said so.

    Lightning would write ``last-v1.ckpt`` beside the earlier run's ``last.ckpt``, and everything that reads
    ``checkpoints/last.ckpt`` (stage 2's ``model.first_stage.ckpt``, sample, evaluate) would read the old model.
    Nothing is deleted. Global rank 0 only (other ranks and SLURM tasks find the folder already moved).
    Returns the new names of the folders moved.
    """
    moved = []
    if rank_zero_only.rank != 0:
        return moved
    for callback in callbacks:
        folder = Path(callback.dirpath) if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        if folder is None or "://" in str(callback.dirpath) or not folder.is_dir():
            continue
        earlier = list(folder.glob("*.ckpt"))
        if not earlier:
            continue
        newest = max(p.stat().st_mtime for p in earlier)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(newest))
        target, n = folder.with_name(f"{folder.name}_earlier_{stamp}"), 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{folder.name}_earlier_{stamp}_{n}")
        folder.rename(target)
        moved.append(target)
        log.warning(f"{folder} held {len(earlier)} checkpoint(s) of an earlier run: moved to {target}, so that "
                    "this new run's last.ckpt is its own (to continue the earlier run instead: resume=auto)")
    return moved
