"""Dashboard pieces for Weights & Biases: a table of condition → sample per evaluation, and parameter counts.

Throughput (images/s) comes from Lightning's own ``ThroughputMonitor``, fed by :func:`batch_image_count`; the
three are configured together in ``conf/callbacks/dashboard.yaml``:

    python -m sdlight.train +experiment=quickstart_ldm logger=wandb 'callbacks=[default,dashboard]'

Offline runs (no API key) write all of it under ``<run dir>/wandb/offline-run-*``; ``wandb sync`` uploads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from sdlight.callbacks.sampling import (Batch, SampleEvaluationCallback, concat_batches, condition_keys,
                                        load_items, sampling_takes_every_rank, val_dataloader)
from sdlight.pixels import to_pil
from sdlight.stages.images import log_grid, to_grid


def batch_image_count(batch: Any, key: str = "image") -> int:
    """Images in a batch (``ThroughputMonitor``'s ``batch_size_fn``): the length of ``batch[key]``, else of its
    first tensor (latent batches have no images)."""
    if isinstance(batch, dict):
        if key in batch:
            return len(batch[key])
        batch = next((v for v in batch.values() if isinstance(v, Tensor)), None)
    if isinstance(batch, (Tensor, list, tuple)):
        return len(batch)
    raise TypeError(f"cannot count the images of a {type(batch).__name__} batch (no {key!r} entry)")


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


# ------------------------------------------------------------------------------------------- parameter counts
def _parts(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Top-level children with parameters (a stage's model, ``net``, by its parts); single-child wrappers are
    looked through, so the UNet shows as ``model.diffusion_model`` (its CompVis name). Averaged copies and lists
    (the condition encoders, shown as ``cond_stage_model``) are reported whole."""
    whole = (AveragedModel, nn.ModuleList, nn.ModuleDict)
    net = getattr(module, "net", None)
    children = [*(net.named_children() if isinstance(net, nn.Module) else []),
                *((n, c) for n, c in module.named_children() if c is not net)]
    for name, child in children:
        while not isinstance(child, whole):
            kids = list(child.named_children())
            if len(kids) != 1 or isinstance(kids[0][1], whole) or any(True for _ in child.parameters(recurse=False)):
                break
            name, child = f"{name}.{kids[0][0]}", kids[0][1]
        if any(True for _ in child.parameters()):
            yield name, child


def parameter_counts(module: nn.Module) -> dict[str, Any]:
    """``{total, trainable, frozen, ema, parts: {name: {total, trainable}}}`` of ``module``.

    ``total`` counts each parameter once and leaves out averaged copies (``AveragedModel``, e.g. the EMA of the
    UNet), which are ``ema``: they are not part of the model, and would double its size.
    """
    averaged = {id(p) for m in module.modules() if isinstance(m, AveragedModel) for p in m.parameters()}
    own = [p for p in module.parameters() if id(p) not in averaged]
    trainable = sum(p.numel() for p in own if p.requires_grad)
    total = sum(p.numel() for p in own)
    ema = sum(p.numel() for m in module.modules() if isinstance(m, AveragedModel) for p in m.parameters())
    parts = {name: {"total": sum(p.numel() for p in child.parameters()),
                    "trainable": sum(p.numel() for p in child.parameters() if p.requires_grad)}
             for name, child in _parts(module)}
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "ema": ema, "parts": parts}


def flat_counts(counts: dict[str, Any], prefix: str = "params") -> dict[str, int]:
    """``params/total``, ``params/trainable``, ..., ``params/<part>``, ``params/<part>/trainable``."""
    out = {f"{prefix}/{k}": counts[k] for k in ("total", "trainable", "frozen", "ema")}
    for name, part in counts["parts"].items():
        out[f"{prefix}/{name}"] = part["total"]
        out[f"{prefix}/{name}/trainable"] = part["trainable"]
    return out


class ModelStatsCallback(L.Callback):
    """At fit start, logs the parameter counts (total / trainable / frozen, per top-level part) as
    hyperparameters of every logger (``params`` in the W&B config) and into the W&B run summary."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts = parameter_counts(pl_module)
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            lg.log_hyperparams({"params": self.counts})
        for lg in wandb_loggers(trainer):
            lg.experiment.summary.update(flat_counts(self.counts))


# ------------------------------------------------------------------------------------------------ sample table
class SampleTableCallback(SampleEvaluationCallback):
    """Every ``every_n_steps`` (and at the end of training) samples ``num_samples`` images for a fixed set of
    conditions with the EMA weights and logs them as a ``wandb.Table`` (``<key>/table``: step, seed, condition,
    caption, sample, and the val image the condition came from), so one prompt can be followed through training.

    Conditions are ``conditions`` (prompts, labels or attribute lists), else the module's ``log_conditions``,
    else those of the first ``num_samples`` val items. The grid of the same samples is written to
    ``<run dir>/images/`` (and sent to image loggers) with or without W&B. Rank 0 samples; other ranks skip.
    """

    def __init__(self, every_n_steps: int | None = 500, num_samples: int = 8, batch_size: int = 8,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                 at_train_end: bool = True, conditions: Sequence[Any] | None = None, key: str = "samples",
                 nrow: int | None = None) -> None:
        super().__init__(every_n_steps, num_samples, batch_size, steps, guidance_scale, seed, use_ema, at_train_end)
        self.fixed_conditions = list(conditions) if conditions is not None else None
        self.key, self.nrow = key, nrow
        self.enabled = True
        self.tables_logged = 0
        self._val_items: Batch | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "generate"):
            self.enabled = False
            rank_zero_warn(f"SampleTableCallback: {type(pl_module).__name__} has no generate(); no sample table")

    def rank_items(self, trainer: L.Trainer, total: int | None = None) -> range:
        return range(self.num_samples if total is None else total)  # rank 0 draws every sample

    def check_equal_shares(self, trainer: L.Trainer) -> None:
        pass  # every rank that samples draws them all

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if not (self.enabled and (trainer.is_global_zero or sampling_takes_every_rank(trainer))):
            return {}
        conditions, items = self._table_conditions(trainer, pl_module)
        images = torch.cat([imgs.cpu() for _, imgs in self.generate(trainer, pl_module, conditions,
                                                                    "Sample table: sampling")])
        if not trainer.is_global_zero:  # sampled with rank 0 (trainer=fsdp), logged by it
            return {}
        keys = condition_keys(pl_module)
        labels = [" · ".join(self._label(conditions[k][i]) for k in keys) for i in range(len(images))]
        # the val items' captions, when the model is conditioned on something else
        captions = list(items["text"]) if "text" in items and "text" not in keys else None
        log_grid(pl_module, f"{self.key}/grid", to_grid([images], nrow=self.nrow or min(len(images), 8)),
                 caption=" | ".join(labels) if keys else None)
        loggers = wandb_loggers(trainer)
        if loggers:
            import wandb

            def picture(x: Tensor):
                return to_pil(x[None])[0]

            columns = ["step", "index", "seed", "condition"] + (["caption"] if captions else []) + ["sample"]
            references = items.get("image")
            if references is not None:
                columns.append("val image")
            rows = []
            for i, image in enumerate(images):
                row = [trainer.global_step, i, self.seed, labels[i]] + ([captions[i]] if captions else [])
                row.append(wandb.Image(picture(image), caption=labels[i] or None))
                if references is not None:
                    row.append(wandb.Image(picture(references[i].float())))
                rows.append(row)
            for lg in loggers:
                lg.log_table(key=f"{self.key}/table", columns=columns, data=rows, step=trainer.global_step)
            self.tables_logged += 1
        return {}

    def _table_conditions(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Batch, Batch]:
        """(the conditions to sample, the val items they came from: empty for given conditions)."""
        keys = condition_keys(pl_module)
        given = self.fixed_conditions or getattr(pl_module, "log_conditions", None)
        if not keys:
            return {}, {}
        if given:
            return {k: v[: self.num_samples] for k, v in pl_module.net.condition_values(given).items()}, {}
        if self._val_items is None:
            loader = val_dataloader(trainer)
            self._val_items = concat_batches(list(load_items(loader, range(self.num_samples), None, self.batch_size)))
        return {k: self._val_items[k] for k in keys}, self._val_items

    @staticmethod
    def _label(value: Any) -> str:
        if isinstance(value, Tensor):
            value = value.tolist()
        return value if isinstance(value, str) else str(value)
