"""Sampling from a trained latent diffusion checkpoint in Python: text2img, img2img, inpainting, attention maps.

    from sdlight import Pipeline
    pipe = Pipeline.from_checkpoint("logs/quickstart/ldm/checkpoints/last.ckpt")
    result = pipe(["a red circle in the center on a white background"], num_samples=4, steps=25, seed=0)
    result.images[0].save("sample.png")
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlight.checkpoints import ema_swapped, load_latent_diffusion, read_checkpoint, state_dict_of
from sdlight.diffusion import SAMPLERS, inpaint_callback, sampler_name
from sdlight.errors import UsageError
from sdlight.pixels import from_pil, to_pil
from sdlight.sampling_checks import (SampleRequest, check_concat_inputs, option_of, resolve_device,
                                     resolve_sampler_options)
from sdlight.models import LatentDiffusionModel

log = logging.getLogger("sdlight")
@dataclass
class SampleResult:
    images: list[Image.Image]
    conditions: list[Any]
    settings: dict[str, Any]
    # per sample: (tokens, maps (T, H, W)) — cross-attention of each token, averaged over layers and steps
    attention: list[tuple[list[str], torch.Tensor]] | None = None
    latents: torch.Tensor | None = field(default=None, repr=False)


def to_tensor_image(image: Image.Image | str | Path, size: int | tuple[int, int],
                    what: str = "init image") -> torch.Tensor:
    """An RGB image as (1, 3, height, width) in [-1, 1] (``size``: a side, or (height, width)); resized (and said
    so) when its size differs."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    height, width = (size, size) if isinstance(size, int) else size
    if image.size != (width, height):
        # one log line: a warning would print a second line with our source, which says nothing to a user
        log.warning(f"{what} resized from {image.size[0]}x{image.size[1]} to the model's {width}x{height}")
        image = image.resize((width, height), Image.BICUBIC)
    return from_pil(image)[None]


def to_mask(mask: Image.Image | str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white = generate, black = keep) as (1, 1, *size) in {0, 1} (nearest-neighbour resized)."""
    if not isinstance(mask, Image.Image):
        mask = Image.open(mask)
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32).copy()) / 255.0
    return F.interpolate((m > 0.5).float()[None, None], size=size, mode="nearest")


class AttentionRecorder:
    """Accumulates each cross-attention layer's probabilities per key token, upsampled to the image size.

    Hooks every ``CrossAttention`` with ``is_cross_attention``; with classifier-free guidance only the
    conditional half of the batch is kept. Maps are averaged over heads, layers and steps (as DAAM does), so
    for each pixel they sum to 1 over all key tokens.
    """

    def __init__(self, unet: torch.nn.Module, batch: int, size: int | tuple[int, int], guided: bool):
        self.batch, self.guided = batch, guided
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (height, width)
        self.total: torch.Tensor | None = None
        self.count = 0
        self.modules = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
        if not self.modules:
            raise ValueError("this model has no cross-attention layers: attention maps need a text/attribute model")

    def __enter__(self) -> "AttentionRecorder":
        for m in self.modules:
            m.attention_hook = self.record
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m.attention_hook = None

    def record(self, module: torch.nn.Module, probs: torch.Tensor) -> None:
        rows = probs.shape[0]
        heads = rows // (self.batch * (2 if self.guided else 1))
        p = probs.float().reshape(-1, heads, *probs.shape[1:]).mean(1)  # (batch[*2], Lq, Lk)
        if self.guided:
            p = p[self.batch:]  # [uncond; cond]: keep the conditional half
        height, width = self.size  # the layer's query grid has the image's aspect ratio
        rows = int(round((p.shape[1] * height / width) ** 0.5))
        p = p.transpose(1, 2).reshape(self.batch, p.shape[2], rows, p.shape[1] // rows)
        p = F.interpolate(p, size=self.size, mode="bilinear", align_corners=False)
        self.total = p if self.total is None else self.total + p
        self.count += 1

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no attention was recorded")
        return self.total / self.count


def heatmap_overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """``heat`` (H, W) normalised to [0, 1] and blended over ``image`` as a blue→red heat map."""
    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min() + 1e-8)
    colour = torch.stack([h, 1 - (2 * h - 1).abs(), 1 - h], dim=-1).numpy()  # blue → green → red
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colour
    return Image.fromarray((out * 255).round().astype(np.uint8))


class Pipeline:
    """A trained :class:`~sdlight.models.LatentDiffusionModel` with the conveniences of sampling: seeds, PIL in and
    out, img2img, inpainting, super-resolution, attention maps."""

    def __init__(self, model: LatentDiffusionModel, device: str | torch.device | None = "auto",
                 path: str | Path | None = None, use_ema: bool = True):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.path, self.use_ema = path, use_ema  # which weights are in: another choice reloads them from path

    # --------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = "auto",
                        use_ema: bool = True) -> "Pipeline":
        """The model of one of our latent diffusion checkpoints (its config and weights, nothing else: no Hydra,
        no Lightning), with its EMA weights when ``use_ema`` and it has them."""
        model, which = load_latent_diffusion(path, use_ema)
        log.info(f"Loaded {path} ({which})")
        return cls(model, device, path, use_ema)

    def _weights(self, use_ema: bool) -> None:
        """The EMA or the raw weights in the model, as asked (read again from the checkpoint when they change)."""
        if use_ema == self.use_ema:
            return
        if self.path is None:
            raise UsageError(f"use_ema={use_ema}: this pipeline was built from a model, not a checkpoint, so it has "
                             "only the weights it was given")
        sd, _ = ema_swapped(state_dict_of(read_checkpoint(self.path)), use_ema)
        self.model.load_state_dict(sd, strict=True)
        self.use_ema = use_ema

    # ------------------------------------------------------------------------------------------- sampling
    @property
    def encoders(self) -> list[torch.nn.Module]:
        return list(self.model.cond_stage_model.embedders)

    def describe_conditioning(self) -> str:
        """How this model is conditioned, in the sample CLI's words."""
        if not self.encoders:
            return "nothing (unconditional): give num_samples only"
        return "; ".join(f"{e.describe()} ({option_of(e.input_key)})" for e in self.encoders)

    def check_conditions(self, conditions: Any) -> dict[str, list[Any]] | None:
        """``{batch key: plain values}`` of the conditions, checked against the encoders (kind, range, one entry
        per encoder; those with a ``default`` may be left out); a one-line :class:`UsageError` if they do not fit.
        One encoder's values may come alone."""
        this = f"this checkpoint is conditioned on {self.describe_conditioning()}"
        keys = [e.input_key for e in self.encoders]
        required = [e.input_key for e in self.encoders if e.default is None]  # the others fall back on it
        if conditions is None:
            if keys:
                raise UsageError(f"{this}; no condition was given")
            return None
        if not isinstance(conditions, Mapping):
            if len(required) != 1:
                raise UsageError(f"{this}; give " + (" and ".join(map(option_of, keys)) if keys else "no condition"))
            conditions = {required[0]: conditions}
        extra = [k for k in conditions if k not in keys]
        if extra:
            raise UsageError(f"{this}, not {', '.join(map(option_of, extra))}")
        missing = [k for k in required if k not in conditions]
        if missing:
            raise UsageError(f"{this}; {', '.join(map(option_of, missing))} missing")
        plain = {k: v.tolist() if isinstance(v, torch.Tensor) else list(v) for k, v in conditions.items()}
        if not all(plain.values()):
            raise UsageError("no conditions were given (an empty list)")
        for e in self.encoders:
            if e.input_key not in plain:
                continue  # its default
            try:
                e.check(plain[e.input_key])
            except ValueError as err:
                raise UsageError(f"{option_of(e.input_key)}{err}") from None
        lengths = {len(v) for v in plain.values()} - {1}
        if len(lengths) > 1:
            raise UsageError(f"the conditions differ in length ({ {k: len(v) for k, v in plain.items()} }): give "
                             "as many of each, or one to share")
        return plain

    def tokens(self, prompt: str) -> list[str]:
        """The key tokens a text model attends to for ``prompt`` (start/end markers and padding included)."""
        tok = next((e.tokenizer for e in self.encoders if hasattr(e, "tokenizer")), None)
        if tok is None:
            raise ValueError("attention maps per word need a text-conditioned model")
        ids, lengths = tok([prompt])
        decoder = tok.tokenizer.decoder
        words = [decoder[i].replace("</w>", "") for i in ids[0, : lengths[0]].tolist()]
        return words + ["<pad>"] * (ids.shape[1] - len(words))

    # the steps of a call; each application (text2img, img2img, inpainting, super-resolution) composes them
    @staticmethod
    def per_sample(conditions: dict[str, list[Any]] | None, num_samples: int) -> tuple[list[Any], dict | None]:
        """(one condition per sample for the result: the value itself with one encoder, else a dict; the
        model's conditions, each repeated ``num_samples`` times, single values shared)."""
        if conditions is None:
            return [None] * num_samples, None
        n = max(len(v) for v in conditions.values())
        full = {k: v * n if len(v) == 1 else v for k, v in conditions.items()}
        repeated = {k: [c for c in v for _ in range(num_samples)] for k, v in full.items()}
        rows = [dict(zip(repeated, row)) for row in zip(*repeated.values())]
        return [next(iter(r.values())) if len(r) == 1 else r for r in rows], repeated

    def negative_conditions(self, negative: Any, n: int, num_samples: int) -> Any:
        """Negative prompts (one for all, or one per condition) for ``n`` samples; other encoders keep their null."""
        if negative is None:
            return None
        return [negative] * n if isinstance(negative, str) else [c for c in negative for _ in range(num_samples)]

    @property
    def concat_reads(self) -> str | None:
        """The input this model's concat stage makes its channels from: ``mask`` (inpainting), ``lowres``
        (super-resolution), or None for a model without one."""
        return getattr(self.model.concat_stage, "batch_key", None)

    def concat_inputs(self, init_image: torch.Tensor | None, mask: torch.Tensor | None,
                      lowres: Image.Image | str | Path | None) -> torch.Tensor | None:
        """The concatenated channels of a model with a concat stage, from the inputs it reads (``mask`` with the
        init image for inpainting, ``lowres`` for super-resolution; see `check_concat_inputs`); None for others."""
        if self.concat_reads is None:
            return None
        if self.concat_reads == "mask":
            return self.model.make_concat({"image": init_image, "mask": mask})
        low = lowres if isinstance(lowres, Image.Image) else Image.open(lowres)
        return self.model.make_concat({"lowres": from_pil(low)[None].to(self.device)})

    def init_latents(self, pixels: torch.Tensor, n: int) -> torch.Tensor:
        """The init image's latents (the posterior mode), one per sample."""
        return self.model.encode_images(pixels, sample=False).expand(n, -1, -1, -1)

    def start(self, x_T: torch.Tensor, pixels: torch.Tensor | None, pix_mask: torch.Tensor | None,
              strength: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Where sampling starts, and the sampler keywords an init image adds: img2img starts from the init
        latents noised to ``strength``; inpainting by a model that does not read the mask pastes the known
        latents back at every step (a latent is regenerated when any pixel it covers is: the seam is generated,
        then pasted over)."""
        m = self.model
        if pixels is None:
            return x_T, {}
        if pix_mask is None:
            return self.init_latents(pixels, len(x_T)), {"strength": strength}
        if self.concat_reads == "mask":  # an inpainting model sees the mask itself
            return x_T, {}
        latent = F.adaptive_max_pool2d(pix_mask, x_T.shape[-2:])
        return x_T, {"callback": inpaint_callback(self.init_latents(pixels, len(x_T)), latent, m.objective,
                                                  generator=generator)}

    def attention(self, recorder: AttentionRecorder, conds: list[Any]) -> list[tuple[list[str], torch.Tensor]]:
        """Per sample: its key tokens (the prompt's words, else their indices) and their maps."""
        maps = recorder.maps().cpu()
        return [(self.tokens(c) if isinstance(c, str) else [str(i) for i in range(maps.shape[1])], maps[i])
                for i, c in enumerate(conds)]

    def __call__(self, conditions: Any = None, num_samples: int = 1, *, steps: int | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, negative: Any = None,
                 sampler: str | None = None, eta: float | None = None,
                 sampler_options: Mapping[str, Any] | None = None, seed: int = 0, use_ema: bool = True,
                 init_image: Image.Image | str | Path | None = None, strength: float = 0.6,
                 mask: Image.Image | str | Path | None = None, lowres: Image.Image | str | Path | None = None,
                 save_attention: bool = False, progress: bool = False, height: int | None = None,
                 width: int | None = None) -> SampleResult:
        """``num_samples`` images for each of ``conditions`` (with one encoder its prompts, labels or attribute
        lists; else a dict ``{batch key: values}``, one value shared by all; None for an unconditional model).
        ``init_image`` + ``strength`` is img2img (SDEdit); ``init_image`` + ``mask`` inpaints the white region of
        the mask (the rest is kept): models trained for inpainting (``model.concat=inpaint``) see the mask and
        the masked image; any other model blends the known region back at every step. ``lowres`` is the input
        of a super-resolution model. ``sampler_options`` go to the sampler function (``{"eta": 0.5}``,
        ``{"grid": "karras"}``, ``{"s_churn": 1.0}``; see :func:`sdlight.diffusion.sampler_options`); ``eta`` is
        a shortcut for ``sampler_options["eta"]``. ``height`` / ``width`` (None: the model's image size; multiples
        of the model's ``size_multiple``) sample another size or aspect ratio, e.g. a model trained on aspect-ratio
        buckets. The options are checked once (:class:`SampleRequest`)."""
        return self.run(SampleRequest(conditions, num_samples, steps, guidance_scale, guidance_rescale, negative,
                                      sampler, sampler_options or {}, eta, seed, use_ema, init_image, strength, mask,
                                      lowres, save_attention, progress, height, width))

    @torch.no_grad()
    def run(self, request: SampleRequest) -> SampleResult:
        """The images of a checked :class:`SampleRequest`, after the checks that need the model (its conditions,
        its concat inputs, its step count)."""
        m, r = self.model, request
        conds, values = self.per_sample(self.check_conditions(r.conditions), r.num_samples)
        timesteps = getattr(m.objective, "num_timesteps", None)
        if r.steps is not None and timesteps is not None and r.steps > timesteps:
            raise UsageError(f"steps={r.steps}: this model was trained with {timesteps} timesteps, so at most that "
                             "many steps")
        check_concat_inputs(self.concat_reads, r.init_image, r.mask, r.lowres)
        n = len(conds)
        fn = SAMPLERS[r.sampler] if r.sampler is not None else None
        options = r.sampler_options if fn is not None else resolve_sampler_options(None, m.sampler, r.sampler_options)
        kwargs: dict[str, Any] = {"progress": r.progress, **options}
        size = (r.height or m.image_size, r.width or m.image_size)
        try:
            shape = m.latent_shape_for(*size)
        except ValueError as err:
            raise UsageError(f"height={size[0]} width={size[1]}: {err}") from None
        generator = torch.Generator(device="cpu").manual_seed(r.seed)
        x_T = torch.randn((n, *shape), generator=generator)  # CPU noise: same samples on any device
        scale = m.guidance_scale if r.guidance_scale is None else r.guidance_scale

        pixels = to_tensor_image(r.init_image, size).to(self.device) if r.init_image is not None else None
        pix_mask = to_mask(r.mask, pixels.shape[-2:]).to(self.device) if r.mask is not None else None
        kwargs["concat"] = self.concat_inputs(pixels, pix_mask, r.lowres)
        x_T, extra = self.start(x_T, pixels, pix_mask, r.strength, generator)
        kwargs.update(extra)

        if r.save_attention and not self.encoders:
            raise ValueError("attention maps show where each condition token went: this model is unconditional")
        recorder = AttentionRecorder(m.model.diffusion_model, n, size, scale != 1.0) if r.save_attention \
            else None
        self._weights(r.use_ema)
        with recorder or contextlib.nullcontext():
            images = m.generate(values, n, steps=r.steps, guidance_scale=scale, guidance_rescale=r.guidance_rescale,
                                negative=self.negative_conditions(r.negative, n, r.num_samples), generator=generator,
                                sampler=fn, x_T=x_T, **kwargs)
        if pix_mask is not None:
            # the decoder sees the whole latent: whatever the prompt did to the generated region, the known pixels
            # are the input's own (the latents alone keep them only up to the VAE's reconstruction)
            images = pix_mask * images + (1 - pix_mask) * pixels
        settings = {"steps": r.steps, "guidance_scale": scale, "guidance_rescale": r.guidance_rescale,
                    "sampler": r.sampler or sampler_name(m.sampler), "seed": r.seed, "eta": options.get("eta"),
                    "sampler_options": options, "use_ema": r.use_ema, "negative": r.negative,
                    "strength": r.strength if r.init_image is not None and r.mask is None else None,
                    "inpainting": r.mask is not None, "superres": r.lowres is not None,
                    "height": size[0], "width": size[1]}
        attention = self.attention(recorder, conds) if recorder is not None else None
        return SampleResult(to_pil(images), conds, settings, attention)
