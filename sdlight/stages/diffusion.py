"""Stage 2: a latent diffusion model trained on the frozen stage-1 autoencoder's latents."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from sdlight.checkpoints import load_pretrained
from sdlight.conditioning import ConditionEncoder, Conditioner
from sdlight.diffusion import (NoiseSchedule, canonical_prediction_type, cfg_denoiser, diffusion_loss, loss_weight,
                               q_sample, sample_timesteps, training_target)
from sdlight.diffusion.draw import draw
from sdlight.errors import UsageError
from sdlight.nn.attention import cached_context_projections
from sdlight.stages.common import (HeldWeights, OptimizerFactory, SchedulerFactory, TrainingFlops, WarmupEMA,
                                   all_finite, build_optimizer, build_scheduler, decay_groups,
                                   silence_eval_mode_warning, speed_up, stepping_batches, swapped_weights, timestep_bucket_names,
                                   to_plain)
from sdlight.stages.images import log_sample_grid
from sdlight.stages.latents import CONTEXT, CachedContexts, batch_size_of, check_cache, is_frozen, posterior_of

log = logging.getLogger("sdlight")
SCALE_FACTOR_SEED = 0  # posterior samples of the scale-factor estimate: the same value on every run


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (CompVis key names: ``model.diffusion_model.*``) and routes the
    conditioning: ``context`` to cross-attention, ``y`` to the class embedding (``label_emb``), ``concat`` along
    channels."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                concat: Tensor | None = None) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        return self.diffusion_model(x, t, context=context, y=y)


class LatentDiffusion(L.LightningModule):
    """A UNet denoiser trained on ``scale_factor · z``, z ~ the frozen autoencoder's posterior of the images.

    ``schedule`` gives the forward process, ``prediction_type`` (eps | v | x0) the network's target,
    ``loss_weighting`` (simple | min_snr | snr) the per-timestep weight. ``conditioning`` and ``conditioners`` make
    one :class:`~sdlight.conditioning.Conditioner` (``cond_stage_model``); each encoder's condition is dropped to its
    explicit null with its ``drop_rate`` (else ``p_uncond``): what classifier-free guidance contrasts against.

    ``scale_factor`` (a buffer, so it is saved in checkpoints) is given, or estimated once at the start of
    training as 1 / std of the posterior samples of ``scale_factor_batches`` training batches, pooled over ranks;
    a resumed run keeps the stored value.

    Batches carry ``image`` or a latent cache's posterior (``latent_mean``, ``latent_std``, see
    sdlight.stages.latents): both become the same posterior, and all that follows is shared. A cache made by
    another autoencoder is refused at setup; cached contexts of the model's own frozen text encoder replace it.

    An EMA of the trainable parts (UNet, and the condition encoders that train) is kept in ``model_ema`` and
    used for validation and sampling; the frozen autoencoder and text towers are never copied. It is updated
    after every optimizer step that had gradients (not on accumulation micro-steps, not on skipped steps).

    A batch whose loss is not finite (on any rank) is skipped: no backward, no EMA update; the skips are counted
    (``nonfinite_skips``, logged as ``train/nonfinite_skips``) and ``max_nonfinite_steps`` in a row raise.

    Speed switches (see :func:`sdlight.stages.common.speed_up` and BENCHMARKS.md): ``compile`` runs the UNet and
    the frozen VAE's encoder and decoder through ``torch.compile`` (sampling too: the EMA weights are swapped
    into the compiled UNet), ``channels_last`` stores the UNet NHWC.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: NoiseSchedule,
        conditioning: ConditionEncoder | None,
        first_stage: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        sampler: Callable[..., Tensor] | None = None,
        prediction_type: str = "eps",
        loss_type: str = "l2",
        loss_weighting: str = "simple",
        snr_gamma: float = 5.0,
        p_uncond: float = 0.1,
        scale_factor: float | None = None,
        scale_factor_batches: int = 8,
        ema_decay: float | None = 0.9999,
        image_size: int = 32,
        guidance_scale: float = 3.0,
        sample_every_n_steps: int = 500,
        num_log_samples: int = 8,
        log_conditions: Sequence[Any] | None = None,
        timestep_buckets: int = 4,
        max_nonfinite_steps: int = 20,
        concat: nn.Module | None = None,
        init_from: str | None = None,
        init_from_ema: bool = True,
        conditioners: Sequence[ConditionEncoder] | Mapping[str, ConditionEncoder] = (),
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if scale_factor_batches < 1:
            raise ValueError(f"scale_factor_batches must be >= 1, got {scale_factor_batches}")
        try:  # the objective's names, checked once here rather than at the first training or sampling step
            canonical_prediction_type(prediction_type)
            loss_weight(torch.ones(1), prediction_type, loss_weighting, snr_gamma)
            diffusion_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, loss_type)
        except ValueError as err:
            raise UsageError(f"model: {err}") from None
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = first_stage.eval().requires_grad_(False)
        # `conditioning` is the first encoder (a config group), `conditioners` more (a dict in the config: by name)
        self.cond_stage_model = conditioner = Conditioner.join(conditioning, conditioners)
        # channels concatenated to z_t (inpainting mask + masked image, low-res image), built from the batch
        self.concat_stage = concat
        self.schedule, self._schedule_here = schedule, None
        self.optimizer_factory, self.lr_scheduler_factory, self.sampler = optimizer, lr_scheduler, sampler
        self.prediction_type, self.loss_type = prediction_type, loss_type
        self.loss_weighting, self.snr_gamma, self.p_uncond = loss_weighting, snr_gamma, p_uncond
        self.scale_factor_batches = scale_factor_batches
        # a buffer, as in CompVis: saved in the checkpoint, so a resumed run never re-estimates it
        self.register_buffer("scale_factor", torch.tensor(1.0 if scale_factor is None else float(scale_factor)))
        self._scale_factor_ready = scale_factor is not None
        self.image_size, self.guidance_scale = image_size, guidance_scale
        self.sample_every_n_steps, self.num_log_samples = sample_every_n_steps, num_log_samples
        self.log_conditions = to_plain(log_conditions) if log_conditions is not None else None
        self.timestep_buckets, self.max_nonfinite_steps = timestep_buckets, max_nonfinite_steps
        self.nonfinite_skips, self._nonfinite_in_a_row = 0, 0
        self._val_stats: Tensor | None = None  # (buckets, 2): sum of losses, count
        if init_from:  # released SD weights (or another run's), loaded before the EMA copies them
            pretrained = load_pretrained(init_from, unet, self.first_stage_model, conditioner, init_from_ema)
            for line in pretrained.lines:
                log.info(line)
            self._take_scale_factor(pretrained.scale_factor, scale_factor)
        # before the EMA copies the UNet, so that both hold their weights in the same memory format
        speed_up([self.model], channels_last=channels_last)
        self.compile_unet = compile  # at setup: each process compiles its own (ddp_spawn pickles the module)
        trainable = [self.model] + [part for part in [conditioner.trainable_part()] if part is not None]
        # the averaged parts, unregistered (they are already submodules; registering twice duplicates keys)
        object.__setattr__(self, "_ema_parts", nn.ModuleList(trainable))
        self.model_ema = None
        if ema_decay:
            self.model_ema = AveragedModel(self._ema_parts, multi_avg_fn=WarmupEMA(ema_decay),
                                           use_buffers=True).requires_grad_(False)
        self._last_step_seen, self._grads_since_step = 0, False
        self._flops, self._held_ema = TrainingFlops(), HeldWeights()
        self._cached_contexts, self._use_cached_contexts = CachedContexts(), False
        # plain values only: checkpoints load with weights_only=True and rebuild the networks from these
        self.save_hyperparameters({
            "unet_config": to_plain(getattr(unet, "config", None)),
            "first_stage_config": to_plain(getattr(first_stage, "config", None)),
            "prediction_type": prediction_type, "loss_type": loss_type, "loss_weighting": loss_weighting,
            "snr_gamma": snr_gamma, "p_uncond": p_uncond, "ema_decay": ema_decay, "image_size": image_size,
            "condition_key": (conditioner.input_keys or [None])[0], "condition_keys": conditioner.input_keys,
            "num_timesteps": schedule.num_timesteps, "concat_channels": getattr(concat, "channels", 0),
        })

    def _take_scale_factor(self, found: float | None, given: float | None) -> None:
        """The scale factor of the ``init_from`` file: its latents are what its UNet was trained on."""
        if found is None:
            log.info("init_from: the file stores no scale factor; it is estimated from the training data")
        elif given is not None:
            if abs(found - float(given)) > 1e-6 * abs(found):
                log.warning(f"init_from: model.scale_factor={given} is used, not the file's {found:.5f}")
        else:
            self.scale_factor.fill_(found)
            self._scale_factor_ready = True
            log.info(f"scale_factor = {found:.5f}, the init_from file's (not re-estimated)")

    # ------------------------------------------------------------------------------------------ components
    @property
    def condition_keys(self) -> list[str]:
        """The batch entries this model is conditioned on; empty for an unconditional model."""
        return self.cond_stage_model.input_keys

    def schedule_on(self, device: torch.device) -> NoiseSchedule:
        """The schedule with its tables on ``device``, moved once (not at every step); the samplers keep the CPU
        one, whose scalars they read without a device sync."""
        if self._schedule_here is None or self._schedule_here.betas.device != torch.device(device):
            self._schedule_here = self.schedule.to(device)
        return self._schedule_here

    @property
    def flops_per_batch(self) -> int | None:
        """The UNet's training FLOPs per batch, once the first batch has run (Lightning's ThroughputMonitor)."""
        return self._flops.value

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.first_stage_model.downsample_factor
        return self.first_stage_model.latent_channels, self.image_size // f, self.image_size // f

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.first_stage_model.eval()  # frozen: no dropout, fixed norms
        return self

    def setup(self, stage: str) -> None:
        # the frozen VAE too: at 256 px its encoder costs more than the UNet's training step
        speed_up([self.model.diffusion_model, self.first_stage_model.encoder, self.first_stage_model.decoder],
                 compile=self.compile_unet)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)  # a latent cache's (sdlight.data.latents)
        if manifest is not None:
            if self.image_size is None:  # data=latents without an image size: the cache's
                self.image_size = self.hparams["image_size"] = int(manifest["image_size"])
            self._use_cached_contexts = check_cache(manifest, self.first_stage_model, self.cond_stage_model,
                                                    self.concat_stage is not None,
                                                    getattr(datamodule, "first_stage_ckpt", None))

    def on_fit_start(self) -> None:
        # the frozen parts (the stage-1 VAE, a pretrained text tower) are in eval mode on purpose
        silence_eval_mode_warning(self, [self.first_stage_model] + [
            m for m in self.cond_stage_model.modules() if is_frozen(m)])

    @torch.no_grad()
    def encode_images(self, x: Tensor | dict[str, Any], sample: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
        """``scale_factor`` times a posterior sample (or the mode) of the frozen autoencoder, in float32, for
        images or a batch (of images or of a latent cache's posteriors: one path for both)."""
        posterior = posterior_of(x if isinstance(x, dict) else {"image": x}, self.first_stage_model, self.device)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z.float()

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(z / self.scale_factor).clamp(-1, 1)

    @torch.no_grad()
    def make_concat(self, inputs: dict[str, Any], generator: torch.Generator | None = None) -> Tensor | None:
        """The concatenated channels from the concat stage's inputs (``image`` + ``mask``, or ``lowres``)."""
        if self.concat_stage is None:
            return None
        return self.concat_stage(**inputs, encode=lambda x: self.encode_images(x, sample=False),
                                 generator=generator)

    def condition_values(self, conditions: Any, partial: bool = False) -> dict[str, Any]:
        """``{batch key: values}`` as the encoders read them, on this device (see `Conditioner.values`)."""
        return self.cond_stage_model.values(conditions, self.device, partial)

    # ---------------------------------------------------------------------------------------- scale factor
    def on_train_start(self) -> None:
        if not self._scale_factor_ready:
            self.estimate_scale_factor()

    @torch.no_grad()
    def estimate_scale_factor(self) -> float:
        """1 / std of the latents over ``scale_factor_batches`` training batches, pooled over all ranks.

        The latents are posterior samples, as training sees them (their variance includes the posterior's), drawn
        from a seeded generator; the global RNG is restored afterwards, so the estimate changes neither the data
        order nor the noise of the training that follows.
        """
        loader = self.trainer.train_dataloader
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # n, sum, sum of squares
        generator = torch.Generator().manual_seed(SCALE_FACTOR_SEED + self.global_rank)
        with torch.random.fork_rng(devices=[]):
            for i, batch in enumerate(loader):
                if i >= self.scale_factor_batches:
                    break
                z = posterior_of(batch, self.first_stage_model, self.device).sample(generator).double()
                stats += torch.stack([stats.new_tensor(z.numel()), z.sum(), (z * z).sum()])
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        n, s, ss = stats.tolist()
        if n < 2:
            raise RuntimeError("the scale factor estimate found no training batches")
        std = math.sqrt((ss - s * s / n) / (n - 1))  # the unbiased std, as torch.std
        self.scale_factor.fill_(1.0 / std)
        self._scale_factor_ready = True
        log.info(f"scale_factor = 1/std(z) = {1.0 / std:.5f} (from {int(n)} latent values)")
        return 1.0 / std

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._scale_factor_ready = True  # the buffer comes back with the state dict
        self._last_step_seen = int(checkpoint.get("global_step", 0))

    # -------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        # frozen parts and the EMA copy excluded; no weight decay on biases, norms and embeddings
        optimizer = build_optimizer(self.optimizer_factory, decay_groups(self))
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": build_scheduler(self.lr_scheduler_factory, optimizer,
                                                              lambda: stepping_batches(self.trainer)),
                                 "interval": "step"}}

    def losses(self, batch: dict[str, Any], *, t: Tensor | None = None, noise: Tensor | None = None,
               generator: torch.Generator | None = None, p_uncond: float | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample weighted losses (B,) and their timesteps (B,).

        ``t`` and ``noise`` default to fresh draws; ``generator`` (if given) draws them, the posterior sample
        and the condition dropout, which makes the result a function of the batch and the generator's seed.
        ``p_uncond`` None drops no condition; else each encoder drops at its ``drop_rate``, or ``p_uncond``.
        """
        z = self.encode_images(batch, generator=generator)
        cached = self._use_cached_contexts and CONTEXT in batch
        if cached:  # the frozen text encoder's contexts, with the same dropout draw
            context = self._cached_contexts(self.cond_stage_model.single, batch, p_uncond, generator, z.device)
        else:
            values = self.condition_values(batch)
            if p_uncond is not None:
                values = self.cond_stage_model.drop(values, p_uncond, generator=generator)
        if t is None:
            t = sample_timesteps(z.shape[0], self.schedule.num_timesteps, generator=generator, device=z.device)
        if noise is None:
            noise = draw(torch.randn, z.shape, generator=generator, device=z.device)
        t, noise = t.to(z.device), noise.to(z)
        concat = None
        if self.concat_stage is not None:
            concat = self.make_concat(self.concat_stage.training_inputs(batch, generator), generator)
        kwargs = {"context": context, "y": None, "concat": concat} if cached else self.cond_stage_model(values, concat)
        schedule = self.schedule_on(z.device)
        out = self._flops(self.training, self.model, q_sample(z, t, noise, schedule), t, **kwargs)
        target = training_target(z, noise, t, schedule, self.prediction_type)
        weight = loss_weight(schedule.snr(t), self.prediction_type, self.loss_weighting, self.snr_gamma)
        return diffusion_loss(out.float(), target.float(), weight, self.loss_type), t

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self.losses(batch, p_uncond=self.p_uncond)[0].mean()
        if not all_finite(self, loss):
            self.nonfinite_skips += 1
            self._nonfinite_in_a_row += 1
            log.warning(f"Non-finite loss at step {self.global_step}: skipped ({self._nonfinite_in_a_row} in a row)")
            if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self._nonfinite_in_a_row} non-finite losses in a row (max_nonfinite_steps="
                    f"{self.max_nonfinite_steps}) at step {self.global_step}: lower the learning rate or check the data")
            self.log("train/nonfinite_skips", float(self.nonfinite_skips))
            # Lightning skips backward; its optimizer step then finds no gradients and leaves the weights alone
            return None
        self._nonfinite_in_a_row = 0
        self._grads_since_step = True
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size_of(batch))
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))
        return loss

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
            self.log_samples(batch)

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_stats = torch.zeros(self.timestep_buckets, 2, dtype=torch.float64, device=self.device)
        if self.model_ema is not None and int(self.model_ema.n_averaged) > 0 and not self._held_ema.active:
            self._held_ema.begin(self._ema_parts, self.model_ema.module)  # once per epoch, not per batch

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # fixed posterior samples, noise and timesteps per batch: losses are comparable across evaluations
        gen = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        with self.ema_weights():
            losses, t = self.losses(batch, generator=gen)
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=losses.shape[0])
        if self._val_stats is None:
            self.on_validation_epoch_start()
        bucket = (t * self.timestep_buckets // self.schedule.num_timesteps).clamp(max=self.timestep_buckets - 1)
        self._val_stats[:, 0].index_add_(0, bucket, losses.detach().double())
        self._val_stats[:, 1].index_add_(0, bucket, torch.ones_like(losses, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        self._held_ema.end()  # after the callbacks' epoch-end hooks, which Lightning runs first
        stats, self._val_stats = self._val_stats, None
        if stats is None:
            return
        # one all-reduce of every bucket: every rank then logs the same keys (a per-rank choice could hang DDP)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        for name, (total, count) in zip(timestep_bucket_names(self.schedule.num_timesteps, self.timestep_buckets),
                                        stats.tolist()):
            if count > 0:
                self.log(name, total / count, sync_dist=True)

    # -------------------------------------------------------------------------------------------- sampling
    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """Swaps the EMA weights in for the duration (no-op without EMA, or before its first update, when the
        EMA is by definition the live weights)."""
        if self._held_ema.active:  # inside a validation epoch: the EMA is already in
            with contextlib.nullcontext() if enabled else self._held_ema.live():
                yield
            return
        if not enabled or self.model_ema is None or int(self.model_ema.n_averaged) == 0:
            yield
            return
        with swapped_weights(self._ema_parts, self.model_ema.module):
            yield

    @torch.no_grad()
    def generate(self, conditions: Any = None, num_samples: int | None = None, *, steps: int | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, negative: Any = None,
                 generator: torch.Generator | None = None, use_ema: bool = True, sampler: Callable | None = None,
                 x_T: Tensor | None = None, return_latents: bool = False, concat: Tensor | None = None,
                 **sampler_kwargs: Any) -> Tensor:
        """Samples images in [-1, 1] for ``conditions`` (a batch's condition entries, or with one encoder its
        values alone: prompts, labels or attributes) or, for unconditional models, ``num_samples`` of them;
        classifier-free guidance with ``guidance_scale`` against the null condition, or against ``negative``
        conditions (negative prompts; for the keys given) when given. Models with a concat stage need ``concat``
        (see `make_concat`); both guidance branches see it."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("no sampler configured: pass sampler= or set model.sampler")
        keys = self.condition_keys
        if (conditions is None) == bool(keys):
            raise ValueError(f"this model is conditioned on {keys}: give conditions" if keys else
                             "this model is unconditional: give num_samples, not conditions")
        if conditions is None and num_samples is None:
            raise ValueError("give num_samples")
        values = self.condition_values(conditions) if keys else {}
        n = len(values[keys[0]]) if keys else num_samples
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} but {n} conditions were given (one sample per condition)")
        if (self.concat_stage is None) != (concat is None):
            raise ValueError("concat must be given exactly for models with a concat stage (inpainting, super-"
                             f"resolution); this model has {type(self.concat_stage).__name__ if self.concat_stage else 'none'}")
        if concat is not None:
            concat = concat.to(self.device).expand(n, *concat.shape[1:])
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights(use_ema):
                cond = self.cond_stage_model(values, concat)
                uncond = None
                if keys and scale != 1.0:
                    negative = self.condition_values(negative, partial=True) if negative is not None else {}
                    uncond = self.cond_stage_model({**self.cond_stage_model.null_like(values), **negative}, concat)
                if x_T is None:
                    x_T = draw(torch.randn, (n, *self.latent_shape), generator=generator, device=self.device)
                x_T = x_T.to(self.device)
                denoise = cfg_denoiser(lambda x, t, c: self.model(x, t, **c), cond, uncond, scale, guidance_rescale)
                if steps is not None:
                    sampler_kwargs["steps"] = steps
                with cached_context_projections(self.model):  # the context's K and V once, not at every step
                    z = sampler(denoise, x_T, self.schedule, prediction_type=self.prediction_type,
                                generator=generator, **sampler_kwargs)
                return z if return_latents else self.decode_latents(z)
        finally:
            self.train(was_training)

    def log_samples(self, batch: dict[str, Any] | None = None) -> None:
        """A grid of samples for fixed conditions (``log_conditions``, else the batch's first ones), rank 0 only."""
        log_sample_grid(self, batch)
