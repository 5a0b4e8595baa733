"""A latent diffusion model in plain torch: the frozen first stage, the conditioner, the backbone, the concat stage
and the objective, put together. It encodes and decodes, computes a batch's training losses and generates; it
knows nothing of Lightning or Hydra (the training recipe is `sdlight.stages.diffusion`, the rebuilding from a
checkpoint `sdlight.checkpoints.load_latent_diffusion`).

    model  = LatentDiffusionModel(backbone, first_stage, conditioner, objective)
    losses = model.losses(batch, draws, p_uncond=0.1)      # (B,) and the noise levels drawn
    images = model.generate(["a red circle"], steps=25)

State-dict keys are CompVis': ``model.diffusion_model.*`` (the backbone), ``first_stage_model.*``,
``cond_stage_model.*``, ``scale_factor`` and ``shift_factor``, so released Stable Diffusion files load and ours run
elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.conditioning import ConditionEncoder, Conditioner
from sdlight.diffusion import (
    DDPM,
    NoiseSchedule,
    Objective,
    canonical_prediction_type,
    cfg_denoiser,
    objective_from_settings,
    sample_euler,
    sampler_name,
)
from sdlight.diffusion.draw import Draws, as_draws, draw
from sdlight.errors import UsageError
from sdlight.models.latents import CONTEXT, CachedContexts, posterior_of
from sdlight.nn.attention import cached_context_projections
from sdlight.nn.token_masking import draw_token_keep, patch_elements

log = logging.getLogger("sdlight")


class DiffusionWrapper(nn.Module):
    """Holds the backbone as ``diffusion_model`` (CompVis key names: ``model.diffusion_model.*``) and routes the
    conditioning: ``context`` to cross-attention, ``y`` to the class / vector embedding, ``concat`` along
    channels. The backbone is any ``backbone(x, t, context=None, y=None) -> output``; ``token_keep`` (patch
    masking in training) is passed only when given, so a backbone without image tokens never sees it."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                concat: Tensor | None = None, token_keep: Tensor | None = None) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        masked = {} if token_keep is None else {"token_keep": token_keep}
        return self.diffusion_model(x, t, context=context, y=y, **masked)


def _unshifted_if_absent(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Files written before the shift existed (and released SD 1.x / 2.x / XL files) hold a scale factor but no
    shift: their latents are unshifted."""
    if prefix + "scale_factor" in state_dict and prefix + "shift_factor" not in state_dict:
        state_dict[prefix + "shift_factor"] = torch.zeros(())


def backbone_in_channels(backbone: nn.Module) -> int | None:
    return (getattr(backbone, "config", None) or {}).get("in_channels")


class LatentDiffusionModel(nn.Module):
    """A backbone trained on ``scale_factor · (z - shift_factor)``, z ~ the frozen autoencoder's posterior of the
    images (the shift is SD3's and Flux's; 0 for SD 1.x / 2.x / XL).

    ``objective`` is the diffusion process (`sdlight.diffusion.objectives`); ``conditioner`` turns a batch's
    condition entries into the backbone's ``context`` / ``y`` / concatenated channels, each encoder dropped to its
    explicit null (what classifier-free guidance contrasts against); ``concat`` (inpainting, super-resolution)
    makes channels from the batch's images. ``sampler`` (a sampler function or partial, see
    `sdlight.diffusion.samplers`) and ``guidance_scale`` are the defaults of :meth:`generate`.
    """

    def __init__(self, backbone: nn.Module, first_stage: nn.Module, conditioner: Conditioner, objective: Objective,
                 *, concat: nn.Module | None = None, scale_factor: float = 1.0, shift_factor: float = 0.0,
                 image_size: int = 32,
                 sampler: Callable[..., Tensor] | None = None, guidance_scale: float = 3.0):
        super().__init__()
        self.model = DiffusionWrapper(backbone)
        self.first_stage_model = first_stage.eval().requires_grad_(False)
        self.cond_stage_model = conditioner
        self.concat_stage = concat
        self.objective = objective
        # a buffer, as in CompVis: saved in the checkpoint
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.register_buffer("shift_factor", torch.tensor(float(shift_factor)))
        self.register_load_state_dict_pre_hook(_unshifted_if_absent)
        self.image_size, self.sampler, self.guidance_scale = image_size, sampler, guidance_scale
        self.cached_contexts: CachedContexts | None = None  # set to read a latent cache's text contexts

    @property
    def device(self) -> torch.device:
        return self.scale_factor.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_shape_for(self.image_size, self.image_size)

    @property
    def size_multiple(self) -> int:
        """What an image's height and width must be multiples of: the autoencoder's factor times the backbone's."""
        backbone = self.model.diffusion_model
        return self.first_stage_model.downsample_factor * getattr(backbone, "size_multiple", 1)

    def latent_shape_for(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of ``height`` x ``width`` images; ValueError when the sides are not
        multiples of `size_multiple`."""
        step = self.size_multiple
        if height % step or width % step:
            raise ValueError(f"{height}x{width} images: this model takes sides that are multiples of {step} (the "
                             f"autoencoder's factor {self.first_stage_model.downsample_factor} times the backbone's)")
        f = self.first_stage_model.downsample_factor
        return self.first_stage_model.latent_channels, height // f, width // f

    @property
    def condition_keys(self) -> list[str]:
        """The batch entries this model is conditioned on; empty for an unconditional model."""
        return self.cond_stage_model.input_keys

    def train(self, mode: bool = True) -> "LatentDiffusionModel":
        super().train(mode)
        self.first_stage_model.eval()  # frozen: no dropout, fixed norms
        return self

    # ---------------------------------------------------------------------------------------- latent space
    @torch.no_grad()
    def encode_images(self, x: Tensor | dict[str, Any], sample: bool = True,
                      draws: Draws | torch.Generator | None = None) -> Tensor:
        """``scale_factor · (z - shift_factor)``, z a posterior sample (or the mode) of the frozen autoencoder, in
        float32, for images or a batch (of images or of a latent cache's raw posteriors: one path for both, so the
        shift applies once)."""
        posterior = posterior_of(x if isinstance(x, dict) else {"image": x}, self.first_stage_model, self.device)
        if sample:
            mean = posterior.mean
            z = posterior.sample(noise=as_draws(draws).normal(mean.shape, mean.device, mean.dtype))
        else:
            z = posterior.mode()
        return self.scale_factor * (z.float() - self.shift_factor)

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(z / self.scale_factor + self.shift_factor).clamp(-1, 1)

    @torch.no_grad()
    def make_concat(self, inputs: dict[str, Any], draws: Draws | torch.Generator | None = None) -> Tensor | None:
        """The concatenated channels from the concat stage's inputs (``image`` + ``mask``, or ``lowres``)."""
        if self.concat_stage is None:
            return None
        return self.concat_stage(**inputs, encode=lambda x: self.encode_images(x, sample=False), draws=draws)

    def condition_values(self, conditions: Any, partial: bool = False) -> dict[str, Any]:
        """``{batch key: values}`` as the encoders read them, on this device (see `Conditioner.values`)."""
        return self.cond_stage_model.values(conditions, self.device, partial)

    # -------------------------------------------------------------------------------------------- training
    def losses(self, batch: dict[str, Any], draws: Draws | torch.Generator | None = None,
               p_uncond: float | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample weighted losses (B,) and their noise levels (B,).

        Every random number of the step comes from ``draws`` (a generator, or the global RNG when None), in this
        order: the posterior sample, the condition dropout, the noise levels, the noise, the concat inputs, the
        image tokens a patch-masking backbone keeps (in training only; each loss is then the mean over the kept
        patches). ``p_uncond`` None drops no condition; else each encoder drops at its ``drop_rate``, or ``p_uncond``.
        """
        draws = as_draws(draws)
        z = self.encode_images(batch, draws=draws)
        if self.cached_contexts is not None and CONTEXT in batch:  # the frozen text encoder's, same dropout draw
            context = self.cached_contexts(self.cond_stage_model.single, batch, p_uncond, draws, z.device)
        else:
            values = self.condition_values(batch)
            if p_uncond is not None:
                values = self.cond_stage_model.drop(values, p_uncond, draws)
        levels = self.objective.draw_levels(z.shape[0], draws, z.device)
        noise = draws.normal(z.shape, z.device)
        concat = None
        if self.concat_stage is not None:
            concat = self.make_concat(self.concat_stage.training_inputs(batch, draws), draws)
        if self.cached_contexts is not None and CONTEXT in batch:
            conditions = {"context": context, "y": None, "concat": concat}
        else:
            conditions = self.cond_stage_model(values, concat)
        keep, weight = self._token_keep(z, draws)
        if keep is None:
            return self.objective.losses(lambda x, t: self.model(x, t, **conditions), z, levels, noise), levels
        network = lambda x, t: self.model(x, t, **conditions, token_keep=keep)  # noqa: E731
        return self.objective.losses(network, z, levels, noise, element_weight=weight), levels

    def _token_keep(self, z: Tensor, draws: Draws) -> tuple[Tensor | None, Tensor | None]:
        """The image tokens a training step's backbone keeps (``mask_ratio`` > 0) and the loss weight on the
        latents' elements (1 on the kept patches); (None, None) in eval and for a backbone that drops none."""
        backbone = self.model.diffusion_model
        ratio = getattr(backbone, "mask_ratio", 0.0)
        if not (ratio and self.training):
            return None, None
        p = backbone.patch_size
        keep = draw_token_keep(draws, ratio, z.shape[0], (z.shape[-2] // p, z.shape[-1] // p), z.device)
        return keep, patch_elements(keep, p, z.shape)

    # -------------------------------------------------------------------------------------------- sampling
    def _batch_of(self, conditions: Any, num_samples: int | None) -> tuple[dict[str, Any], int]:
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
        return values, n

    @torch.no_grad()
    def generate(self, conditions: Any = None, num_samples: int | None = None, *, steps: int | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, negative: Any = None,
                 generator: torch.Generator | None = None, sampler: Callable | None = None,
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
        values, n = self._batch_of(conditions, num_samples)
        if (self.concat_stage is None) != (concat is None):
            raise ValueError("concat must be given exactly for models with a concat stage (inpainting, super-"
                             f"resolution); this model has {type(self.concat_stage).__name__ if self.concat_stage else 'none'}")
        if concat is not None:
            concat = concat.to(self.device).expand(n, *concat.shape[1:])
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.training
        self.eval()
        try:
            cond = self.cond_stage_model(values, concat)
            uncond = None
            if self.condition_keys and scale != 1.0:
                negative = self.condition_values(negative, partial=True) if negative is not None else {}
                uncond = self.cond_stage_model({**self.cond_stage_model.null_like(values), **negative}, concat)
            if x_T is None:
                x_T = draw(torch.randn, (n, *self.latent_shape), generator=generator, device=self.device)
            denoise = cfg_denoiser(lambda x, t, c: self.model(x, t, **c), cond, uncond, scale, guidance_rescale)
            if steps is not None:
                sampler_kwargs["steps"] = steps
            with cached_context_projections(self.model):  # the context's K and V once, not at every step
                z = sampler(denoise, x_T.to(self.device), self.objective, generator=generator, **sampler_kwargs)
            return z if return_latents else self.decode_latents(z)
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"objective={type(self.objective).__name__}, image_size={self.image_size}"



def build_backbone(backbone: nn.Module | Callable[..., nn.Module], in_channels: int) -> nn.Module:
    """``backbone`` itself, or built from a factory (a config's ``_partial_: true``) with ``in_channels`` = the
    latents' channels plus the concat stage's, unless the factory names them (then they must agree)."""
    if isinstance(backbone, nn.Module):
        return backbone
    given = getattr(backbone, "keywords", {}).get("in_channels")
    return backbone(in_channels=in_channels) if given is None else backbone()


def build_latent_diffusion(
    unet: nn.Module | Callable[..., nn.Module], first_stage: nn.Module, schedule: NoiseSchedule | None = None,
    conditioning: ConditionEncoder | None = None, conditioners: Sequence[ConditionEncoder] | Mapping[str, Any] = (),
    concat: nn.Module | None = None, objective: Objective | None = None, prediction_type: str | None = "eps",
    loss_type: str | None = "l2", loss_weighting: str | None = "simple", snr_gamma: float | None = 5.0,
    scale_factor: float | None = None, image_size: int = 32, sampler: Callable[..., Tensor] | None = None,
    guidance_scale: float = 3.0, shift_factor: float | None = 0.0,
) -> LatentDiffusionModel:
    """A model from the parts a config names (``conf/model/ldm.yaml``: what training composes and what a
    checkpoint's stored config rebuilds without Hydra). ``objective`` None is the DDPM objective of ``schedule``,
    ``prediction_type``, ``loss_type``, ``loss_weighting`` and ``snr_gamma``; settings that do not fit are a
    :class:`UsageError` naming the option."""
    if objective is None:
        if schedule is None:
            raise UsageError("model.schedule is required by the DDPM objective (model/objective=ddpm)")
        objective = DDPM(schedule, prediction_type, loss_type, loss_weighting, snr_gamma)
    else:
        _check_loose_settings(objective, schedule, prediction_type, loss_type, loss_weighting, snr_gamma)
    if getattr(sampler, "keywords", {}).get("clip_x0") is not None:  # a pixel-space bound: latents are not in ±1
        raise UsageError(f"model.sampler.clip_x0={sampler.keywords['clip_x0']}: clip_x0 bounds x0 for pixel-space "
                         "models; this model samples latents, where it turns every sample into noise: leave it unset")
    sampler = _sampler_for(objective, sampler)
    if image_size is not None:  # resolution-dependent settings (rectified flow's shift=auto); a latent cache's
        side = image_size // first_stage.downsample_factor  # size comes later (the stage's setup)
        objective.fit_latent_size(side, side)
    latent = first_stage.latent_channels + getattr(concat, "channels", 0)
    backbone = build_backbone(unet, latent)
    if backbone_in_channels(backbone) not in (None, latent):
        concat_part = f" + {latent - first_stage.latent_channels} of model.concat" if concat is not None else ""
        raise UsageError(f"model.unet.in_channels={backbone_in_channels(backbone)}, but the backbone takes the "
                         f"{first_stage.latent_channels} latent channels{concat_part}: {latent} (give that, or "
                         "model.unet.in_channels=null model.unet._partial_=true to have it derived)")
    conditioner = Conditioner.join(conditioning, conditioners)
    _check_context_width(backbone, conditioner)
    return LatentDiffusionModel(backbone, first_stage, conditioner, objective, concat=concat,
                                scale_factor=1.0 if scale_factor is None else scale_factor,
                                shift_factor=0.0 if shift_factor is None else shift_factor,
                                image_size=image_size, sampler=sampler, guidance_scale=guidance_scale)


def _check_context_width(backbone: nn.Module, conditioner: Conditioner) -> None:
    """The tokens the condition encoders give are as wide as the backbone's cross-attention reads (a wrong
    ``model.unet.context_dim`` would otherwise be a shape error at the first step)."""
    want = getattr(backbone, "config", {}).get("context_dim")
    if isinstance(want, list):  # per level (SD 1.x / 2.x configs repeat one width)
        want = want[0] if len(set(want)) == 1 else None
    widths = {e.context_dim for e in conditioner.embedders if "crossattn" in e.routes and e.context_dim is not None}
    if want is not None and widths and widths != {want}:
        width = " and ".join(str(w) for w in sorted(widths))
        raise UsageError(f"model.unet.context_dim={want}, but the condition encoders give {width}-wide tokens "
                         f"(model/conditioning): set model.unet.context_dim={max(widths)}")


def with_objective(parts: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`build_latent_diffusion`'s keywords ``parts`` with the objective that ``settings`` (`Objective.settings`,
    as files record it) describe in place of theirs: DDPM's on the parts' schedule, with the top-level DDPM keys
    made to agree; another objective's with those keys cleared."""
    parts = dict(parts)
    objective = objective_from_settings(settings, parts.get("schedule"))
    parts["objective"] = objective
    if isinstance(objective, DDPM):
        parts.update(prediction_type=objective.prediction_type, loss_type=objective.loss_type,
                     loss_weighting=objective.weighting, snr_gamma=objective.snr_gamma)
    else:
        parts.update(dict.fromkeys(("schedule", "prediction_type", "loss_type", "loss_weighting", "snr_gamma")))
    return parts


def _sampler_for(objective: Objective, sampler: Callable[..., Tensor] | None) -> Callable[..., Tensor] | None:
    """The configured sampler, or for an objective other than DDPM whose config still names DDIM (the stock
    default, and the CPU experiments'), Euler with the same steps: DDIM with eta 0 is the Euler step of any
    objective's ODE, and the DDPM-only samplers refuse other objectives. Ancestral DDPM or eta > 0 stay an error."""
    name = sampler_name(sampler)
    if isinstance(objective, DDPM) or name not in ("ddim", "ddpm"):
        return sampler
    keywords = dict(getattr(sampler, "keywords", {}))
    if name == "ddpm" or keywords.pop("eta", 0.0):
        raise UsageError(f"model.sampler={name} needs the DDPM objective; this model's objective is "
                         f"{objective.name}: use model/sampler=euler (or heun, dpmpp_2m, unipc)")
    keywords.pop("clip_x0", None)
    log.info(f"model.sampler=ddim with objective {objective.name}: sampling with euler, the same ODE step")
    return partial(sample_euler, **keywords)


def _check_loose_settings(objective: Objective, schedule: NoiseSchedule | None, prediction_type: str | None,
                          loss_type: str | None, loss_weighting: str | None, snr_gamma: float | None) -> None:
    """The DDPM settings kept at the model's top level (``model.prediction_type`` ...) must be those of a DDPM
    objective (its config reads them). Another objective's config sets them to null; an experiment tuned for DDPM
    may still set some (``loss_weighting: min_snr``), which a sweep over objectives must survive: they are named
    in one warning, never silently dropped."""
    loose = {"prediction_type": prediction_type, "loss_type": loss_type, "loss_weighting": loss_weighting,
             "snr_gamma": snr_gamma}
    if not isinstance(objective, DDPM):
        given = [f"model.{k}={v}" for k, v in loose.items() if v is not None]
        given += ["model.schedule"] if schedule is not None else []
        if given:
            log.warning(f"{', '.join(given)}: setting(s) of the DDPM objective, not used by the {objective.name} "
                        "objective (model.objective.* holds its settings)")
        return
    own = {"prediction_type": objective.prediction_type, "loss_type": objective.loss_type,
           "loss_weighting": objective.weighting, "snr_gamma": objective.snr_gamma}
    for key, value in loose.items():
        if value is not None and (canonical_prediction_type(value) if key == "prediction_type" else value) != own[key]:
            raise UsageError(f"model.{key}={value} but model.objective has {own[key]}: set one of them")
