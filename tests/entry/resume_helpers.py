"""Helpers that training processes of the entry tests import (the tests put this folder on PYTHONPATH, or on
sys.path, which the processes ddp_spawn starts inherit)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from sdlight.callbacks.adherence import PromptAdherenceCallback


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


class RaiseOnRank(L.Callback):
    """Rank ``rank`` raises at training batch ``step`` (the others go on into the step's gradient all-reduce):
    ``error="usage"`` a user error (sdlight.errors.UsageError), else a RuntimeError, as a bug would."""

    def __init__(self, rank: int = 1, step: int = 2, error: str = "usage"):
        self.rank, self.step, self.error = rank, step, error

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            from sdlight.errors import UsageError

            message = f"data: rank {self.rank} read a broken sample at step {self.step}"
            raise UsageError(message) if self.error == "usage" else RuntimeError(message)


class RecordingAdherence(PromptAdherenceCallback):
    """The adherence callback, each rank writing the images it sampled to ``out_dir``."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def generate(self, trainer, pl_module, conditions, description):
        images = []
        for chunk, batch in super().generate(trainer, pl_module, conditions, description):
            images.append(batch)
            yield chunk, batch
        torch.save(torch.cat(images), Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class SaveRankStates(L.Callback):
    """At the end of training each rank writes its module's state dict (EMA included) to ``out_dir``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class RecordShards(L.Callback):
    """After the first training batch, each rank writes ``shards_rank<r>.json`` to ``out_dir``: for the UNet, the
    text encoder and the VAE, the parameters this rank holds (a sharded one's local shard) and their whole size."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        import json

        from torch.distributed.tensor import DTensor

        if trainer.global_step != 1:
            return
        net = pl_module.net
        parts = {"unet": net.model.diffusion_model, "text": net.cond_stage_model, "vae": net.first_stage_model}
        sizes = {name: {"local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in m.parameters()),
                        "whole": sum(p.numel() for p in m.parameters())} for name, m in parts.items()}
        Path(self.out_dir, f"shards_rank{trainer.global_rank}.json").write_text(json.dumps(sizes))


class PoisonWeights(L.Callback):
    """Every rank turns the backbone's first parameter into NaNs before the batch at optimizer step ``step``: each
    later loss is non-finite until a rollback restores the weights."""

    def __init__(self, step: int = 3):
        self.step, self.done = step, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                next(pl_module.net.model.diffusion_model.parameters()).fill_(float("nan"))
