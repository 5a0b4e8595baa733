"""Stage 2: the training recipe of a latent diffusion model (`sdlight.models.LatentDiffusionModel`).

The model (backbone, frozen first stage, conditioner, concat stage, objective) is plain torch; this module adds
what training needs around it: optimizers and LR schedules, the EMA of the trainable parts, the non-finite guard,
the scale-factor estimate, validation losses by noise level, sample grids and logging.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from sdlight.checkpoints import to_plain
from sdlight.errors import UsageError
from sdlight.pretrained import load_pretrained, recorded_objective
from sdlight.data.resumable import keyed_draws
from sdlight.diffusion.draw import Draws
from sdlight.models.latent_diffusion import LatentDiffusionModel, build_latent_diffusion, with_objective
from sdlight.models.latents import CachedContexts, batch_size_of, check_cache, is_frozen
from sdlight.nn.speed import speed_up
from sdlight.optim import (OptimizerFactory, SchedulerFactory, build_optimizer, build_scheduler, decay_groups,
                           stepping_batches)
from sdlight.stages.ema import WarmupEMA, WeightSwap
from sdlight.stages.flops import TrainingFlops
from sdlight.stages.frozen import silence_eval_mode_warning
from sdlight.stages.guard import NonFiniteGuard
from sdlight.stages.images import log_sample_grid
from sdlight.stages.scale_factor import SCALE_FACTOR_SEED, estimate_scale_factor, take_latent_factors
from sdlight.stages.sharding import data_parallel_mesh, is_sharded, shard_trainable_parts

log = logging.getLogger("sdlight")
NET = "net."  # the model's keys in this module; its state dict holds them without it (CompVis' names)


def _without_net_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + NET)]:
        state_dict[prefix + key[len(prefix + NET):]] = state_dict.pop(key)


def _with_net_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + NET, prefix + "model_ema."))]:
        state_dict[prefix + NET + key[len(prefix):]] = state_dict.pop(key)


def set_gradient_checkpointing(backbone: nn.Module, enabled: bool) -> None:
    """``model.gradient_checkpointing``: every block of the backbone recomputes its activations in the backward
    pass (or none does); one line for a backbone that cannot."""
    if not hasattr(backbone, "set_gradient_checkpointing"):
        raise UsageError(f"model.gradient_checkpointing={enabled}: the backbone {type(backbone).__name__} has no "
                         "gradient checkpointing; leave it null")
    backbone.set_gradient_checkpointing(enabled)


def adopt_recorded_objective(path: str, parts: dict[str, Any]) -> dict[str, Any]:
    """``parts`` with the objective that the file ``path`` records (an export of ours, one of our checkpoints) in
    place of the config's, said in one line; unchanged when it records none or the same."""
    recorded = recorded_objective(path)
    current = parts.get("objective")
    if recorded is None or (current is not None and current.settings() == recorded):
        return parts
    try:
        adopted = with_objective(parts, recorded)
    except UsageError as err:
        raise UsageError(f"model.init_from={path}: {err} (or model.init_from_objective=false to train it with the "
                         "config's objective)") from None
    settings = ", ".join(f"{k} {v}" for k, v in recorded.items() if k != "objective")
    log.info(f"model.init_from={path} was trained with the {recorded['objective']} objective ({settings}): this "
             "model takes it (model.init_from_objective=false keeps the config's)")
    return adopted


class LatentDiffusion(L.LightningModule):
    """Trains ``net``, a :class:`LatentDiffusionModel` built from ``model_parts`` (`build_latent_diffusion`:
    ``unet``, ``first_stage``, ``schedule``, ``conditioning``, ``conditioners``, ``concat``, ``objective``,
    ``prediction_type``, ``loss_type``, ``loss_weighting``, ``snr_gamma``, ``image_size``, ``sampler``,
    ``guidance_scale``, ``scale_factor``, ``shift_factor``).

    ``p_uncond``: conditioning dropout (each encoder's ``drop_rate`` first). ``scale_factor`` given is kept;
    else it is 1 / std of the posterior samples of ``scale_factor_batches`` global training batches, pooled over ranks,
    once (a resumed run keeps the stored value; ``init_from`` brings the file's). ``shift_factor`` (SD3, Flux: the
    latents are ``scale · (z - shift)``) given is kept; None estimates it as the latents' mean in the same pass.
    ``ema_decay``: an EMA of the trainable parts (backbone, training encoders), frozen parts never copied, updated
    after every optimizer step that had gradients, used for validation and sampling. A batch whose loss is not
    finite on any rank is skipped; ``max_nonfinite_steps`` in a row raise. ``compile``: the backbone and the
    frozen VAE through ``torch.compile``; ``channels_last``: the backbone NHWC (BENCHMARKS.md).
    """

    def __init__(self, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None = None, *,
                 p_uncond: float = 0.1, scale_factor_batches: int = 8, ema_decay: float | None = 0.9999,
                 sample_every_n_steps: int = 500, num_log_samples: int = 8, log_conditions: Sequence[Any] | None = None,
                 timestep_buckets: int = 4, max_nonfinite_steps: int = 20, init_from: str | None = None,
                 init_from_ema: bool = True, init_from_objective: bool = True, compile: bool = False,
                 channels_last: bool = False, gradient_checkpointing: bool | None = None, **model_parts: Any):
        super().__init__()
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if scale_factor_batches < 1:
            raise ValueError(f"scale_factor_batches must be >= 1, got {scale_factor_batches}")
        if init_from and init_from_objective:
            model_parts = adopt_recorded_objective(init_from, model_parts)
        self.net: LatentDiffusionModel = build_latent_diffusion(**model_parts)
        net = self.net
        self._scale_factor_ready = model_parts.get("scale_factor") is not None
        self._shift_factor_ready = model_parts.get("shift_factor", 0.0) is not None
        if init_from:  # released SD weights (or another run's), loaded before the EMA copies them
            pretrained = load_pretrained(init_from, net.model.diffusion_model, net.first_stage_model,
                                         net.cond_stage_model, init_from_ema)
            for line in pretrained.lines:
                log.info(line)
            taken = take_latent_factors(net, (pretrained.scale_factor, pretrained.shift_factor),
                                        model_parts.get("scale_factor"), model_parts.get("shift_factor", 0.0))
            self._scale_factor_ready |= taken[0]
            self._shift_factor_ready = taken[1]
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.p_uncond, self.scale_factor_batches = p_uncond, scale_factor_batches
        self.sample_every_n_steps, self.num_log_samples = sample_every_n_steps, num_log_samples
        self.log_conditions = to_plain(log_conditions) if log_conditions is not None else None
        self.timestep_buckets, self.guard = timestep_buckets, NonFiniteGuard(max_nonfinite_steps)
        if gradient_checkpointing is not None:  # None: as the backbone's own config says (use_checkpoint)
            set_gradient_checkpointing(net.model.diffusion_model, gradient_checkpointing)
        speed_up([net.model], channels_last=channels_last)  # before the EMA copies it: one memory format
        self.compile_unet = compile  # at setup: each process compiles its own (ddp_spawn pickles the module)
        trainable = [net.model] + [part for part in [net.cond_stage_model.trainable_part()] if part is not None]
        object.__setattr__(self, "_ema_parts", nn.ModuleList(trainable))  # already submodules: not registered
        self.model_ema = AveragedModel(self._ema_parts, multi_avg_fn=WarmupEMA(ema_decay), use_buffers=True
                                       ).requires_grad_(False) if ema_decay else None
        self._last_step_seen, self._grads_since_step, self._val_stats, self._drop_grads = 0, False, None, False
        self._flops, self._ema = TrainingFlops(), WeightSwap()
        self._flops.watch(net.model, self)
        # the model's keys without "net.": CompVis' names in checkpoints (model.diffusion_model.*, ...)
        self.register_state_dict_post_hook(_without_net_prefix)
        self.register_load_state_dict_pre_hook(_with_net_prefix)
        # plain values only: checkpoints load with weights_only=True and rebuild the networks from these
        self.save_hyperparameters({
            "unet_config": to_plain(getattr(net.model.diffusion_model, "config", None)),
            "first_stage_config": to_plain(getattr(net.first_stage_model, "config", None)),
            "objective": net.objective.name, "objective_settings": net.objective.settings(),
            **{k: getattr(net.objective, a, None) for k, a in (
                ("prediction_type", "prediction_type"), ("loss_type", "loss_type"), ("loss_weighting", "weighting"),
                ("snr_gamma", "snr_gamma"), ("num_timesteps", "num_timesteps"))},
            "p_uncond": p_uncond, "ema_decay": ema_decay, "image_size": net.image_size,
            "condition_key": (net.condition_keys or [None])[0], "condition_keys": net.condition_keys,
            "concat_channels": getattr(net.concat_stage, "channels", 0)})

    # ------------------------------------------------------------------------------------- the model's parts
    @property
    def condition_keys(self) -> list[str]:
        return self.net.condition_keys

    @property
    def trainable_parts(self) -> nn.ModuleList:
        """What trains and what the EMAs average: [UNet wrapper, training encoders] (`checkpoints.EMA_PARTS`)."""
        return self._ema_parts

    @property
    def flops_per_batch(self) -> int | None:
        """The backbone's training FLOPs per batch, once the first batch has run (Lightning's ThroughputMonitor)."""
        return self._flops.value

    def setup(self, stage: str) -> None:
        net = self.net  # the frozen VAE too: at 256 px its encoder costs more than the backbone's training step
        speed_up([net.model.diffusion_model, net.first_stage_model.encoder, net.first_stage_model.decoder],
                 compile=self.compile_unet)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)  # a latent cache's (sdlight.data.latents)
        if manifest is not None:
            if net.image_size is None:  # data=latents without an image size: the cache's
                net.image_size = self.hparams["image_size"] = int(manifest["image_size"])
                side = net.image_size // net.first_stage_model.downsample_factor
                net.objective.fit_latent_size(side, side)
            if check_cache(manifest, net.first_stage_model, net.cond_stage_model, net.concat_stage is not None,
                           getattr(datamodule, "first_stage_ckpt", None)):
                net.cached_contexts = CachedContexts()

    def configure_model(self) -> None:
        # trainer=fsdp (a ModelParallelStrategy, which sets the mesh): the trainable parts and their EMA sharded
        if self.device_mesh is not None and not is_sharded(self.net.model):
            shard_trainable_parts(self, self._ema_parts, self.model_ema.module if self.model_ema is not None else None,
                                  data_parallel_mesh(self.device_mesh))

    def on_fit_start(self) -> None:
        # the frozen parts (the stage-1 VAE, a pretrained text tower) are in eval mode on purpose
        silence_eval_mode_warning(self, [self.net.first_stage_model] + [
            m for m in self.net.cond_stage_model.modules() if is_frozen(m)])

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_skips"] = self.guard.skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.skips = int(checkpoint.get("nonfinite_skips", 0))
        self._scale_factor_ready = self._shift_factor_ready = True  # the buffers come back with the state dict
        self._last_step_seen = int(checkpoint.get("global_step", 0))

    # ---------------------------------------------------------------------------------------- scale factor
    def on_train_start(self) -> None:
        if not (self._scale_factor_ready and self._shift_factor_ready):
            self.estimate_scale_factor()

    def estimate_scale_factor(self) -> float:
        """See `sdlight.stages.scale_factor.estimate_scale_factor`: the scale and / or the shift not yet set."""
        value = estimate_scale_factor(self.trainer, self.net, self.scale_factor_batches,
                                      scale=not self._scale_factor_ready, shift=not self._shift_factor_ready)
        self._scale_factor_ready = self._shift_factor_ready = True
        return value

    # -------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        # frozen parts and the EMA copy excluded; no weight decay on biases, norms and embeddings
        optimizer = build_optimizer(self.optimizer_factory, decay_groups(self))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = build_scheduler(self.lr_scheduler_factory, optimizer, lambda: stepping_batches(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self.net.losses(batch, keyed_draws(batch, self.global_step), p_uncond=self.p_uncond)[0].mean()
        finite = self.guard.check(self, loss, where=f"step {self.global_step}")
        self.log("train/nonfinite_skips", float(self.guard.skips))
        if not finite:  # every rank agrees (the check is all-reduced)
            if self.trainer.world_size == 1:  # Lightning skips backward; its optimizer step finds no gradients
                return None
            # Lightning refuses None on several processes: the backward runs on every rank (the gradient
            # collectives need all of them) and its gradients are dropped before the optimizer step
            self._drop_grads = True
            return loss
        self._grads_since_step = True
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size_of(batch))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_grads:  # a skipped step on several processes: no gradient, so the optimizer leaves every weight
            optimizer.zero_grad(set_to_none=True)
            self._drop_grads = False

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: checkpoints saved by callbacks at a batch's end must include it
        if self.model_ema is not None and self._grads_since_step:
            self.model_ema.update_parameters(self._ema_parts)
        self._grads_since_step = False

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if self.global_step == self._last_step_seen:
            return  # an accumulation micro-step: no optimizer step yet
        self._last_step_seen = self.global_step
        if self.sample_every_n_steps and self.global_step % self.sample_every_n_steps == 0:
            log_sample_grid(self, batch)

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_stats = torch.zeros(self.timestep_buckets, 2, dtype=torch.float64, device=self.device)
        if self._ema_ready():
            self._ema.begin(self._ema_parts, self.model_ema.module)  # once per epoch, not per batch

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # fixed posterior samples, noise and levels per batch: losses are comparable across evaluations
        with self.ema_weights():
            losses, levels = self.net.losses(batch, Draws(torch.Generator().manual_seed(1000 + batch_idx)))
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=losses.shape[0])
        if self._val_stats is None:
            self.on_validation_epoch_start()
        bucket = self.net.objective.bucket(levels, self.timestep_buckets)
        self._val_stats[:, 0].index_add_(0, bucket, losses.detach().double())
        self._val_stats[:, 1].index_add_(0, bucket, torch.ones_like(losses, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        self._ema.end()  # after the callbacks' epoch-end hooks, which Lightning runs first
        stats, self._val_stats = self._val_stats, None
        if stats is None:
            return
        # one all-reduce of every bucket: every rank then logs the same keys (a per-rank choice could hang DDP)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        for name, (total, count) in zip(self.net.objective.bucket_names(self.timestep_buckets), stats.tolist()):
            if count > 0:
                self.log(name, total / count, sync_dist=True)

    # -------------------------------------------------------------------------------------------- sampling
    def _ema_ready(self) -> bool:
        return self.model_ema is not None and int(self.model_ema.n_averaged) > 0

    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """The EMA weights in the model for the block (no-op without EMA, or before its first update, when the
        EMA is by definition the live weights); ``enabled=False`` inside a held block gives the live ones."""
        if self._ema.active and not enabled:
            with self._ema.live():
                yield
        elif enabled and self._ema_ready():
            with self._ema.swapped(self._ema_parts, self.model_ema.module):
                yield
        else:
            yield

    def model_with_ema(self) -> LatentDiffusionModel:
        """A copy of the model holding the EMA weights, as a checkpoint samples with them (e.g. for a Pipeline)."""
        with self.ema_weights():
            return copy.deepcopy(self.net)

    @torch.no_grad()
    def generate(self, conditions: Any = None, num_samples: int | None = None, *, use_ema: bool = True,
                 **kwargs: Any) -> Tensor:
        """`LatentDiffusionModel.generate` with the EMA weights (``use_ema``)."""
        with self.ema_weights(use_ema):
            return self.net.generate(conditions, num_samples, **kwargs)
