"""Logging in processes that ``ddp_spawn`` starts: they begin with none configured, so sdlight's lines (progress,
skipped samples, preemption) would not be seen or kept. This callback carries the launching process's console and
log-file handlers over to them."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import lightning as L


def _describe(handler: logging.Handler) -> dict | None:
    """What it takes to rebuild a console or file handler elsewhere; None for other kinds."""
    if not isinstance(handler, logging.StreamHandler):
        return None
    formatter = handler.formatter
    where = handler.baseFilename if isinstance(handler, logging.FileHandler) else \
        ("stderr" if handler.stream is sys.stderr else "stdout")
    return {"where": where, "level": handler.level, "format": getattr(formatter, "_fmt", None),
            "datefmt": getattr(formatter, "datefmt", None)}


class SpawnedLogging(L.Callback):
    """In a process started by the strategy (not the one that built the trainer), before training: the launching
    process's handlers, the log file written by rank 0 only, and ``prepare()`` (warning filters) run again."""

    def __init__(self, prepare: Callable[[], None] | None = None):
        root = logging.getLogger()
        self.level = root.level
        self.handlers = [d for d in map(_describe, root.handlers) if d is not None]
        self.prepare = prepare
        self.launcher = os.getpid()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        root = logging.getLogger()
        if os.getpid() == self.launcher or root.handlers:
            return
        root.setLevel(self.level)
        for spec in self.handlers:
            where = spec["where"]
            if where in ("stdout", "stderr"):
                handler: logging.Handler = logging.StreamHandler(getattr(sys, where))
            elif trainer.global_rank == 0:
                handler = logging.FileHandler(where, mode="a")
            else:
                continue
            handler.setLevel(spec["level"])
            handler.setFormatter(logging.Formatter(spec["format"], spec["datefmt"]))
            root.addHandler(handler)
        if self.prepare is not None:
            self.prepare()
