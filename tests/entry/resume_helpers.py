"""Helpers that training subprocesses of test_resume.py import (the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch


class SlowSteps(L.Callback):
    """Sleeps after every training batch, so a test can signal the process mid-run (no random draws)."""

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


def slow_save_forever(marker: str) -> None:
    """Makes ``torch.save`` write half of its bytes, touch ``marker`` and hang: a writer killed mid-checkpoint."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        Path(marker).touch()
        time.sleep(600)

    torch.save = save


class HangOnSave(L.Callback):
    """From the start of training on, every checkpoint write hangs half-way (see ``slow_save_forever``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_train_start(self, *args, **kwargs) -> None:
        slow_save_forever(self.marker)
