"""Pieces the stage modules share: the rank-agreed finiteness check of their NaN guards, the warm-up EMA update
of the latent diffusion model and the swap of its weights, config values made plain for weights-only checkpoints,
FLOPs counting, the names of the per-timestep validation losses, the optimizers' CPU kernel and the LR
schedules' run length."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
from lightning.fabric.utilities.warnings import PossibleUserWarning
import torch
from torch import Tensor, nn


# Hydra ``_partial_`` factories the stage modules take: ``params -> Optimizer`` and ``optimizer -> LRScheduler``
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def to_plain(value: Any) -> Any:
    """Config containers (OmegaConf's included) as plain dicts / lists, for weights-only checkpoints."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    return value


def all_finite(module: L.LightningModule, *values: Tensor) -> bool:
    """True when every value is finite on every rank (ranks must agree, or DDP's all-reduce would hang)."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().float()
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce(finite, reduce_op="min")
    return bool(finite > 0)


class WarmupEMA:
    """EMA update with decay min(decay, (1 + n) / (10 + n)) after n updates: a plain 0.9999 EMA would sit at the
    initial weights for thousands of steps, which short runs never leave. (The first update, n = 0, copies.)

    A class rather than a closure, so the module pickles (``ddp_spawn`` sends it to its processes).
    """

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel groups tensors by dtype: integer buffers (attribute ids) arrive alone and are copied
        if not ema[0].is_floating_point():
            torch._foreach_copy_(ema, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(ema, current, 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))


class TrainingFlops:
    """``flops_per_batch`` for Lightning's ``ThroughputMonitor`` (FLOPs/s and MFU): the trained network's forward
    FLOPs on the first training batch, counted by ``torch.utils.flop_counter``, times 3 for forward + backward.
    Frozen parts (the VAE encoder, a pretrained text tower) and the GAN's discriminator are not counted."""

    def __init__(self) -> None:
        self.value: int | None = None

    def __call__(self, training: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.value is not None or not training:
            return fn(*args, **kwargs)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
        self.value = 3 * counter.get_total_flops()
        return out


@contextlib.contextmanager
def swapped_weights(live: Iterable[nn.Module], other: Iterable[nn.Module]) -> Iterator[None]:
    """Copies ``other``'s parameters and buffers into ``live`` (same structure) for the block, then restores them."""
    live_t = [p for m in live for p in (*m.parameters(), *m.buffers())]
    other_t = [p for m in other for p in (*m.parameters(), *m.buffers())]
    backup = [p.detach().clone() for p in live_t]
    for p, q in zip(live_t, other_t):
        p.data.copy_(q.data)
    try:
        yield
    finally:
        for p, b in zip(live_t, backup):
            p.data.copy_(b)


class HeldWeights:
    """Another set of weights (the EMA) held in ``live`` modules across many calls — a validation epoch — with
    one copy in and one copy out, instead of a copy in and out (and a clone of every parameter) per batch."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.backup: list[Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.backup is not None

    def begin(self, live: Iterable[nn.Module], other: Iterable[nn.Module]) -> None:
        self.tensors = [p for m in live for p in (*m.parameters(), *m.buffers())]
        self.backup = [p.detach().clone() for p in self.tensors]
        for p, q in zip(self.tensors, [q for m in other for q in (*m.parameters(), *m.buffers())]):
            p.data.copy_(q.data)

    def end(self) -> None:
        if self.backup is not None:
            for p, b in zip(self.tensors, self.backup):
                p.data.copy_(b)
        self.tensors, self.backup = [], None

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """The live weights back for the block (e.g. ``generate(use_ema=False)`` during validation)."""
        held = [p.detach().clone() for p in self.tensors]
        for p, b in zip(self.tensors, self.backup or []):
            p.data.copy_(b)
        try:
            yield
        finally:
            for p, h in zip(self.tensors, held):
                p.data.copy_(h)


def timestep_bucket_names(num_timesteps: int, buckets: int) -> list[str]:
    """``val/loss_tLLLL-HHHH`` for the buckets ``t * buckets // num_timesteps`` (inclusive bounds)."""
    bounds = [math.ceil(k * num_timesteps / buckets) for k in range(buckets + 1)]
    return [f"val/loss_t{bounds[k]:04d}-{bounds[k + 1] - 1:04d}" for k in range(buckets)]


def silence_eval_mode_warning(module: nn.Module, frozen_roots: Sequence[nn.Module]) -> None:
    """Lightning warns about every eval-mode module when training starts; silence exactly the count of the frozen
    parts' modules, so that any other module left in eval mode still warns."""
    frozen = {id(m) for root in frozen_roots for m in root.modules()}
    in_eval = [m for m in module.modules() if not m.training]
    if in_eval and all(id(m) in frozen for m in in_eval):
        warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start",
                                category=PossibleUserWarning)


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


def speed_up(modules: Iterable[nn.Module], *, compile: bool = False, channels_last: bool = False) -> None:
    """The speed switches of the stages, in place (parameter names, hence checkpoints, are unchanged).

    ``channels_last`` stores 4-D weights NHWC, so convolutions run on NHWC activations (faster kernels on
    tensor cores and some CPUs); ``compile`` makes each module's call ``torch.compile``d (inductor: C++ on the
    CPU, Triton on CUDA), compiled lazily at the first call and again for each new input shape.
    """
    for module in modules:
        if channels_last:
            module.to(memory_format=torch.channels_last)
        if compile and getattr(module, "_compiled_call_impl", None) is None:
            # static shapes: a new shape (CFG's doubled batch, another resolution) compiles anew instead of
            # switching to a symbolic-shape graph, which inductor failed to build for the VAE here (torch 2.14)
            module.compile(dynamic=False)


def allow_retained_graphs() -> None:
    """Lets compiled modules run backward more than once on a graph (``retain_graph=True``), as the adaptive GAN
    weight does through the decoder. Compiled backward functions free ("donate") saved buffers by default and
    then refuse a second pass; this turns that off for the process (slightly more memory in backward)."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable[Any]) -> torch.optim.Optimizer:
    """``factory(params)``; an Adam / AdamW left at torch's kernel choice (``foreach`` and ``fused`` unset) over
    CPU float32 parameters gets ``fused=True``. Torch's CPU default is a per-parameter loop, ~4x slower than the
    fused kernel (77 ms against 19 ms, 15 % of the training step of a 66 M-parameter UNet: BENCHMARKS.md); on
    other devices torch's own choice stands."""
    params = list(params)  # parameters or param-group dicts
    keywords = getattr(factory, "keywords", {})
    target = getattr(factory, "func", None)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if (target in (torch.optim.Adam, torch.optim.AdamW) and keywords.get("fused") is None
            and keywords.get("foreach") is None and tensors
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)):
        return factory(params, fused=True)
    return factory(params)


def stepping_batches(trainer: L.Trainer) -> int | float:
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
