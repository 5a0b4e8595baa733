"""Stage 1: the perceptual KL autoencoder (reconstruction + LPIPS + KL + PatchGAN) as a LightningModule."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from sdlight.checkpoints import load_autoencoder_weights
from sdlight.data.resumable import keyed_draws
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.speed import allow_retained_graphs, speed_up
from sdlight.optim import OptimizerFactory, SchedulerFactory, build_optimizer, build_scheduler, stepping_batches
from sdlight.stages.flops import TrainingFlops
from sdlight.stages.guard import NonFiniteGuard
from sdlight.stages.images import log_grid, to_grid

log = logging.getLogger("sdlight")


class AutoencoderModule(L.LightningModule):
    """Trains an ``AutoencoderKL`` against an ``AutoencoderLoss`` with two optimizers (generator, discriminator).

    Manual optimization, because the generator and the discriminator step on the same batch. Consequences:
    Lightning's ``global_step`` counts *optimizer* steps (two per batch once the discriminator trains), so this
    module counts batches itself (``self.batches``, saved in checkpoints) and hands that count to the loss for
    ``disc_start`` and its warm-up. The Trainer refuses gradient clipping and accumulation under manual
    optimization: they are done here (``gradient_clip_val``, ``accumulate_grad_batches``; as with Lightning's own
    accumulation, the optimizers step every ``accumulate_grad_batches`` batches of an epoch and at its last batch,
    and ``global_step`` only counts those steps).

    The generator's graph is built with the discriminator's parameters toggled off (Lightning's
    ``toggled_optimizer``), so its adversarial term leaves no gradients on the discriminator. A batch whose
    losses are not finite (on any rank) is skipped: no backward, no step, and the buffers it touched (the
    discriminator's BatchNorm statistics) are restored; ``max_nonfinite_steps`` skips in a row raise.

    State-dict keys are the CompVis ones (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
    ``loss.*``), so a checkpoint of this module is a CompVis autoencoder checkpoint.

    Args:
        autoencoder: the model being trained.
        loss: an :class:`~sdlight.losses.AutoencoderLoss` (or compatible: ``disc_start``,
            ``discriminator_parameters()``, optionally ``generator_parameters()`` and ``perceptual_loss``).
        optimizer, disc_optimizer: factories ``params -> Optimizer`` (Hydra ``_partial_``) for the generator
            (autoencoder + learnable logvar) and the discriminator; the latter defaults to the former.
        lr_scheduler: a factory ``optimizer -> LRScheduler`` (e.g. ``sdlight.optim.warmup_cosine``) applied to
            both optimizers and stepped at every optimizer-step boundary, the discriminator's included before
            ``disc_start``, so both follow the run's batches; None: constant learning rates.
        gradient_clip_val: clip each optimizer's gradient norm to this value before it steps (None: no clipping).
        accumulate_grad_batches: batches whose gradients are summed (each loss divided by this) per step.
        image_log_every_n_steps: log a grid of inputs / reconstructions / prior samples every this many training
            batches (0: never in training; validation logs one per run).
        num_log_images: columns of those grids.
        init_from: a released SD VAE or one of our checkpoints to start from (see
            :func:`sdlight.checkpoints.load_autoencoder_weights`).
        max_nonfinite_steps: consecutive non-finite batches tolerated before raising ``FloatingPointError``.
        compile: ``torch.compile`` the encoder and decoder (at setup, lazily at their first call).
        channels_last: hold the autoencoder's weights NHWC; None (the default): when training on a CPU, where
            oneDNN's NHWC convolutions make the stage-1 step ~5 % faster (BENCHMARKS.md); GPUs were not measured.
        gradient_checkpointing: recompute the encoder's and decoder's block activations in backward (less
            memory at 256 px and up, more compute).
    """

    ddp_find_unused_parameters = True  # read by sdlight.train: D's step leaves the autoencoder without grads

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        disc_optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        image_log_every_n_steps: int = 500,
        num_log_images: int = 8,
        init_from: str | None = None,
        max_nonfinite_steps: int = 20,
        compile: bool = False,
        channels_last: bool | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.automatic_optimization = False
        # Register the autoencoder's parts at the top level (CompVis key names); keep a handle on the whole.
        for name, child in autoencoder.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "autoencoder", autoencoder)
        autoencoder.set_gradient_checkpointing(gradient_checkpointing)
        speed_up([autoencoder], channels_last=bool(channels_last))
        self.channels_last = channels_last  # None: decided at setup, on the device the trainer trains on
        self.compile_autoencoder = compile  # at setup: each process compiles its own (ddp_spawn pickles the module)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.gradient_clip_val = gradient_clip_val
        self.accumulate_grad_batches = accumulate_grad_batches
        self.image_log_every_n_steps = image_log_every_n_steps
        self.num_log_images = num_log_images
        self.guard = NonFiniteGuard(max_nonfinite_steps)  # its skips are restored on resume
        self.batches = 0  # training batches seen (not optimizer steps); restored on resume
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        # primitive hyperparameters only: checkpoints must load with weights_only=True
        self.save_hyperparameters({"autoencoder_config": dict(autoencoder.config),
                                   "gradient_clip_val": gradient_clip_val,
                                   "accumulate_grad_batches": accumulate_grad_batches,
                                   "init_from": init_from})
        if init_from:
            load_autoencoder_weights(autoencoder, init_from)
            log.info(f"Initialised the autoencoder from {init_from}")
        self._flops = TrainingFlops()
        self._flops.watch(autoencoder, self)

    @property
    def flops_per_batch(self) -> int | None:
        """The autoencoder's training FLOPs per batch, once the first batch has run (ThroughputMonitor)."""
        return self._flops.value

    def setup(self, stage: str) -> None:
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        if self.channels_last is None and device.type == "cpu":
            speed_up([self.autoencoder], channels_last=True)
        if self.compile_autoencoder:
            allow_retained_graphs()
        speed_up([self.autoencoder.encoder, self.autoencoder.decoder], compile=self.compile_autoencoder)

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        gen_params = list(self.autoencoder.parameters())
        if hasattr(self.loss, "generator_parameters"):
            gen_params += list(self.loss.generator_parameters())
        opt_g = build_optimizer(self.optimizer_factory, gen_params)
        opt_d = build_optimizer(self.disc_optimizer_factory, self.loss.discriminator_parameters())
        if self.lr_scheduler_factory is None:
            return [opt_g, opt_d]
        def steps() -> int | float:  # counted only for a schedule that needs the run's length
            total = stepping_batches(self.trainer)
            return math.ceil(total / self.accumulate_grad_batches) if math.isfinite(total) else total

        return [opt_g, opt_d], [build_scheduler(self.lr_scheduler_factory, opt, steps) for opt in (opt_g, opt_d)]

    def _step(self, optimizer, loss: torch.Tensor, boundary: bool) -> None:
        self.manual_backward(loss / self.accumulate_grad_batches)
        if boundary:
            optimizer.step()  # clipped in on_before_optimizer_step
            optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # here, not before optimizer.step(): under 16-mixed the grad scaler has just unscaled the gradients, so the
        # norm is the true one (clipped before, scaled gradients would be cut to the norm and then divided by the scale)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = batch["image"]
        # as Lightning accumulates: windows within the epoch, its last batch closes a short one
        last = self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches
        boundary = (batch_idx + 1) % self.accumulate_grad_batches == 0 or last
        buffers = {name: b.detach().clone() for name, b in self.named_buffers()}

        # Only the generator's parameters enter its graph: otherwise -D(rec) leaves gradients on D that its own
        # step would then follow, against its objective.
        with self.toggled_optimizer(opt_g):
            # the same posterior samples on 1 or N processes, with or without accumulation: keyed by the step
            keyed = keyed_draws(batch, self.batches // self.accumulate_grad_batches)
            rec, posterior = self.autoencoder(x, noise=None if keyed is None else
                                              lambda shape: keyed.normal(shape, x.device, x.dtype))
            loss_g, log_g = self.loss(x, rec, posterior, part="generator", global_step=self.batches,
                                      last_layer=self.autoencoder.get_last_layer(), split="train")
        train_disc = self.batches >= self.loss.disc_start  # before that, D's step would change nothing
        losses, log_d = [loss_g], {}
        if train_disc:  # rec is detached: only D's parameters are in this graph
            loss_d, log_d = self.loss(x, rec.detach(), posterior, part="discriminator", global_step=self.batches,
                                      split="train")
            losses.append(loss_d)
        logs = {**log_g, **log_d}
        if not self.guard.check(self, *losses, where=f"batch {self.batches}",
                                details=lambda: str({k: float(v) for k, v in logs.items()})):
            self._undo(opt_g, opt_d, buffers)
        else:
            self._step(opt_g, loss_g, boundary)
            if train_disc:
                self._step(opt_d, loss_d, boundary)
        if boundary and self.lr_scheduler_factory is not None:
            with warnings.catch_warnings():  # D's optimizer has not stepped before disc_start: by design
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                for scheduler in self.lr_schedulers():
                    scheduler.step()
        self.batches += 1
        n = x.shape[0]
        self.log_dict({**log_g, **log_d}, prog_bar=False, sync_dist=False, batch_size=n)
        self.log("train/rec_loss", log_g.get("train/rec", loss_g), prog_bar=True, batch_size=n)
        self.log("train/nonfinite_skips", float(self.guard.skips), batch_size=n)

        if self.image_log_every_n_steps and (self.batches - 1) % self.image_log_every_n_steps == 0:
            self._log_images(x, rec, "train")

    def _undo(self, opt_g, opt_d, buffers: dict[str, torch.Tensor]) -> None:
        """A skipped batch: no gradients kept, and the buffers it touched as they were."""
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        with torch.no_grad():  # the forward passes already updated BatchNorm statistics with the bad batch
            for name, b in self.named_buffers():
                b.copy_(buffers[name])

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        rec, posterior = self.autoencoder(x, sample_posterior=False)
        loss_g, log_g = self.loss(x, rec, posterior, part="generator", global_step=self.batches, split="val")
        _, log_d = self.loss(x, rec, posterior, part="discriminator", global_step=self.batches, split="val")
        rec = rec.clamp(-1, 1)
        self.val_psnr(rec, x)
        self.val_ssim(rec, x)
        n = x.shape[0]
        self.log_dict({**log_g, **log_d}, sync_dist=True, batch_size=n)
        self.log("val/loss", loss_g, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=n)
        self.log("val/ssim", self.val_ssim, batch_size=n)
        perceptual = getattr(self.loss, "perceptual_loss", None)
        if isinstance(perceptual, nn.Module):
            self.log("val/lpips", perceptual(x, rec).mean(), sync_dist=True, batch_size=n)
        if batch_idx == 0:
            self._log_images(x, rec, "val")

    @torch.no_grad()
    def _log_images(self, x: torch.Tensor, rec: torch.Tensor, split: str) -> None:
        n = min(self.num_log_images, x.shape[0])
        z = torch.randn_like(self.autoencoder.encode(x[:n]).mode())
        prior = self.autoencoder.decode(z)
        log_grid(self, f"{split}/reconstructions", to_grid([x[:n], rec[:n], prior]),
                 caption="rows: inputs, reconstructions, decoded samples of the prior N(0, I)")

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches"] = self.batches
        checkpoint["nonfinite_skips"] = self.guard.skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches = int(checkpoint.get("batches", 0))
        self.guard.skips = int(checkpoint.get("nonfinite_skips", 0))
