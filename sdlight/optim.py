"""Optimizers and learning-rate schedules: the stages' optimizer factory (weight-decay groups, the CPU's fused
Adam) and the LR schedules as plain torch ``LambdaLR``s, stepped once per optimizer step, with the run's length
filled in."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LinearLR


class WarmupCosine:
    """The factor of step ``n``: linear from ``1/warmup_steps`` to 1 over the warm-up, then half a cosine from 1 to
    ``final_factor`` at ``total_steps``, held there after. A run no longer than its warm-up (a ``fast_dev_run``, a
    smoke test) only warms up. A class rather than a closure, so it pickles."""

    def __init__(self, warmup_steps: int, total_steps: int, final_factor: float = 0.0):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
        self.warmup_steps, self.total_steps, self.final_factor = warmup_steps, total_steps, final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                  final_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``final_factor`` times the base LR (SGDR without restarts; the decay
    most diffusion trainers use for short runs). ``total_steps=None`` is filled in by the stage modules with the
    run's optimizer steps (``trainer.estimated_stepping_batches``)."""
    if total_steps is None:
        raise ValueError("warmup_cosine needs total_steps (the stage modules fill it in from the trainer)")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, final_factor))


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 1000, start_factor: float = 0.001,
                    total_iters: int | None = None) -> LinearLR:
    """Linear warm-up from ``start_factor`` times the base LR to the base LR over ``warmup_steps``, then constant
    (CompVis LDM / SD). ``total_iters`` is this setting's former name (torch's ``LinearLR``), still read."""
    if total_iters is not None:
        warnings.warn("model.lr_scheduler.total_iters is now called warmup_steps (as in the cosine schedule)",
                      FutureWarning, stacklevel=2)
        warmup_steps = total_iters
    return LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


# Hydra ``_partial_`` factories the stage modules take: ``params -> Optimizer`` and ``optimizer -> LRScheduler``
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
_NO_DECAY = (nn.Embedding, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def decay_groups(module: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: weight decay for the weights of linear maps and
    convolutions, none (``weight_decay=0``) for biases, norms and embeddings, whose decay only pulls scales and
    lookup rows towards zero (nanoGPT's split). Frozen parameters are left out."""
    no_decay = {id(p) for m in module.modules() if isinstance(m, _NO_DECAY) for p in m.parameters(recurse=False)}
    decay, rest = [], []
    for p in module.parameters():
        if p.requires_grad:
            (rest if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable[Any]) -> torch.optim.Optimizer:
    """``factory(params)``; an Adam / AdamW left at torch's kernel choice (``foreach`` and ``fused`` unset) over
    CPU float32 parameters gets ``fused=True``. Torch's CPU default is a per-parameter loop, ~4x slower than the
    fused kernel (77 ms against 19 ms, 15 % of the training step of a 66 M-parameter UNet: BENCHMARKS.md); on
    other devices torch's own choice stands. Sharded parameters (``trainer=fsdp``: DTensors, whose ``device`` is
    their shard's) take the fused and foreach kernels too, each rank stepping its own shards, as long as no call
    mixes them with whole tensors ("got mixed torch.Tensor and DTensor"): the stage shards every trainable one."""
    params = list(params)  # parameters or param-group dicts
    keywords = getattr(factory, "keywords", {})
    target = getattr(factory, "func", None)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if (target in (torch.optim.Adam, torch.optim.AdamW) and keywords.get("fused") is None
            and keywords.get("foreach") is None and tensors
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)):
        return factory(params, fused=True)
    return factory(params)


def stepping_batches(trainer: Any) -> int | float:
    """``trainer.estimated_stepping_batches`` (the run's optimizer steps), without losing a resumed run's data position.

    To count the batches Lightning builds the training loader, before a resumed run's checkpoint is restored, and
    then keeps that loader without handing it its saved position (Lightning issue #20550): a run resumed mid-epoch
    would start its epoch over. The loader built here is dropped again, so the fit loop builds it after the restore.
    """
    built_here = trainer.fit_loop._combined_loader is None
    steps = trainer.estimated_stepping_batches
    if built_here:
        trainer.fit_loop._combined_loader = None
    return steps


def build_scheduler(factory: Callable[..., Any], optimizer: torch.optim.Optimizer,
                    total_steps: int | float | Callable[[], int | float]) -> Any:
    """``factory(optimizer)``, with ``total_steps`` passed when the factory takes it and left it unset (``None``):
    a decay that ends with the run follows ``max_epochs`` / ``max_steps`` overrides without a second setting.
    ``total_steps`` may be a function, called only then (counting a run's steps builds its training loader)."""
    try:
        param = inspect.signature(factory).parameters.get("total_steps")
    except (TypeError, ValueError):  # builtins without a signature
        param = None
    if param is not None and param.default is None:
        total_steps = total_steps() if callable(total_steps) else total_steps
        if not math.isfinite(total_steps):
            raise ValueError("the LR schedule needs the run's length: set trainer.max_steps or trainer.max_epochs")
        return factory(optimizer, total_steps=int(total_steps))
    return factory(optimizer)
