"""Preemption: SIGTERM / SIGUSR1 save a checkpoint at the next step boundary and end the run cleanly.

Clusters announce the end of a job with a signal (SLURM: SIGTERM on preemption or at the time limit, SIGUSR1 some
time before it when asked with ``--signal``). The handler only sets a flag; at the end of the current training
batch every rank agrees, ``last.ckpt`` is written (atomically, through the checkpoint callback's path), and
``Preempted`` ends ``fit`` without a validation or an epoch-end checkpoint that would describe a state the run
never reached. Inside a SLURM job whose environment allows requeueing (Lightning's ``SLURMEnvironment``,
``auto_requeue=True``), the job is requeued first; it comes back in the same run directory and resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

log = logging.getLogger("sdlight")


class Preempted(Exception):
    """Training stopped on a signal after saving its checkpoint: the entry point exits 0."""


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_allowed(trainer: L.Trainer) -> bool:
    """True inside SLURM when Lightning's cluster environment is SLURM with ``auto_requeue`` on."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return slurm_job_id() is not None and isinstance(env, SLURMEnvironment) and env.auto_requeue


class PreemptionCheckpoint(L.Callback):
    """Saves ``<checkpoint dir>/last.ckpt`` at the first step boundary after one of ``signals`` and stops.

    Args:
        signals: names of the signals to handle (default SIGTERM and SIGUSR1).
        requeue: under SLURM with requeueing allowed, ``scontrol requeue`` the job before stopping.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning(f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of this step")
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own handlers (installed when fit starts): this one replaces them for the training loop
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a signal (every rank must stop at the same step, or collectives hang)."""
        flag = torch.tensor(float(self.received is not None), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._agreed(trainer):
            return
        path = self.checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if callback is not None and hasattr(callback, "last_model_path"):
            # the checkpoint callback's own last.ckpt: a resumed run overwrites it instead of writing last-v1.ckpt
            callback.last_model_path = str(path)
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        requeued = self.requeue and requeue_allowed(trainer) and self._requeue(trainer)
        raise Preempted(f"Stopped on {name} at step {trainer.global_step}: checkpoint {path}"
                        + ("; the SLURM job is requeued and resumes from it" if requeued else
                           "; resume with ckpt_path=last in the same run directory"))

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / "last.ckpt"

    @staticmethod
    def _requeue(trainer: L.Trainer) -> bool:
        if not trainer.is_global_zero:
            return True
        job = slurm_job_id()
        result = subprocess.call(["scontrol", "requeue", str(job)])
        if result != 0:
            log.warning(f"scontrol requeue {job} failed (exit {result}): resubmit the job to resume")
        return result == 0
