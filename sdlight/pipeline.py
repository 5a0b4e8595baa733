"""Sampling from a trained latent diffusion checkpoint in Python: text2img, img2img, inpainting, attention maps.

    from sdlight import Pipeline
    pipe = Pipeline.from_checkpoint("logs/quickstart/ldm/checkpoints/last.ckpt")
    result = pipe(["a red circle in the center on a white background"], num_samples=4, steps=25, seed=0)
    result.images[0].save("sample.png")
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlight.checkpoints import CheckpointError, read_checkpoint, state_dict_of
from sdlight.diffusion import SAMPLERS, inpaint_callback, sampler_name
from sdlight.diffusion import sampler_options as options_of
from sdlight.errors import UsageError
from sdlight.stages.diffusion import LatentDiffusion

log = logging.getLogger("sdlight")


@dataclass
class SampleResult:
    images: list[Image.Image]
    conditions: list[Any]
    settings: dict[str, Any]
    # per sample: (tokens, maps (T, H, W)) — cross-attention of each token, averaged over layers and steps
    attention: list[tuple[list[str], torch.Tensor]] | None = None
    latents: torch.Tensor | None = field(default=None, repr=False)


def check_sampling_options(num_samples: int = 1, steps: int | None = None, guidance: float | None = None,
                           guidance_rescale: float = 0.0, strength: float = 0.6, eta: float | None = None,
                           sampler: str | None = None) -> None:
    """The numeric sampling options, checked before anything is loaded; a :class:`UsageError` names the option
    (as the sample CLI spells it), its value and what would work."""
    def integer(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name}={value!r}: give a whole number >= {low}")

    integer("num_samples", num_samples, 1)
    if steps is not None:
        integer("steps", steps, 1)
    if guidance is not None and not (isinstance(guidance, (int, float)) and guidance >= 0 and np.isfinite(guidance)):
        raise UsageError(f"guidance={guidance!r}: classifier-free guidance scales are >= 0 (1 turns guidance off, "
                         "3-8 is usual)")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise UsageError(f"guidance_rescale={guidance_rescale!r}: must be in [0, 1] (0.7 is usual, 0 turns it off)")
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength={strength!r}: img2img strength must be in [0, 1] (how much of the schedule to "
                         "re-run: 0.3 keeps the image close, 1 ignores it)")
    if eta is not None and not eta >= 0.0:
        raise UsageError(f"eta={eta!r}: eta must be >= 0 (DDIM: 0 deterministic, 1 DDPM-like)")
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"sampler={sampler}: unknown; choose one of {', '.join(sorted(SAMPLERS))}")


def given_options(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``sampler_options`` a CLI was given: its config lists every option as null (so that
    ``sampler_options.eta=0.5`` needs no ``+``); the nulls mean "the sampler's default" and are dropped."""
    return {str(k): v for k, v in (node or {}).items() if v is not None}


def resolve_sampler_options(name: str | None, sampler: Callable | None, options: Mapping[str, Any] | None = None,
                            eta: float | None = None) -> dict[str, Any]:
    """The keyword options for ``sampler`` (registered as ``name``): ``options`` plus the ``eta`` shortcut.

    An option the sampler does not take is a :class:`UsageError` naming it and the options the sampler has, so
    ``sampler=euler sampler_options.eta=0.5`` fails before anything runs instead of being ignored.
    """
    resolved = dict(options or {})
    if eta is not None:
        resolved.setdefault("eta", eta)  # the sample CLI's older `eta=` spelling of sampler_options.eta
    if sampler is None or not resolved:
        return resolved
    allowed = options_of(sampler)
    unknown = [k for k in resolved if k not in allowed]
    if unknown:
        label = name or sampler_name(sampler)
        raise UsageError(f"sampler_options.{unknown[0]}: sampler {label} has no such option; its options: "
                         f"{', '.join(allowed) or 'none'}")
    return resolved


def check_image_file(path: str | Path | Image.Image | None, option: str) -> None:
    """``path`` names a readable image (a typo here should not surface after the model has loaded)."""
    if path is None or isinstance(path, Image.Image):
        return
    if not Path(path).is_file():
        raise UsageError(f"{option}={path}: no such file")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        raise UsageError(f"{option}={path}: not a readable image ({type(e).__name__})") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor_image(image: Image.Image | str | Path, size: int, what: str = "init image") -> torch.Tensor:
    """An RGB image as (1, 3, size, size) in [-1, 1]; resized (and said so) when its size differs."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        warnings.warn(f"{what} resized from {image.size[0]}x{image.size[1]} to the model's {size}x{size}", stacklevel=3)
        image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x / 127.5 - 1.0).unsqueeze(0)


def to_mask(mask: Image.Image | str | Path, init_size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white = generate, black = keep) as (1, 1, H, W) in {0, 1}; it must match the init image."""
    if not isinstance(mask, Image.Image):
        mask = Image.open(mask)
    if mask.size != init_size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                         f"{init_size[0]}x{init_size[1]}: they must have the same size")
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32).copy()) / 255.0
    return (m > 0.5).float()[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class AttentionRecorder:
    """Accumulates each cross-attention layer's probabilities per key token, upsampled to the image size.

    Hooks every ``CrossAttention`` with ``is_cross_attention``; with classifier-free guidance only the
    conditional half of the batch is kept. Maps are averaged over heads, layers and steps (as DAAM does), so
    for each pixel they sum to 1 over all key tokens.
    """

    def __init__(self, unet: torch.nn.Module, batch: int, size: int, guided: bool):
        self.batch, self.size, self.guided = batch, size, guided
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
        side = int(round(p.shape[1] ** 0.5))
        p = p.transpose(1, 2).reshape(self.batch, p.shape[2], side, side)
        p = F.interpolate(p, size=(self.size, self.size), mode="bilinear", align_corners=False)
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
    """A trained ``LatentDiffusion`` with the conveniences of sampling: seeds, PIL in/out, img2img, inpainting."""

    def __init__(self, model: LatentDiffusion, device: str | torch.device | None = "auto"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    # --------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = "auto") -> "Pipeline":
        """Rebuilds the model from one of our latent diffusion checkpoints (config + weights, nothing else)."""
        ckpt = read_checkpoint(path)
        config = (ckpt.get("sdlight") or {}).get("config", {}).get("model")
        if not config or not str(config.get("_target_", "")).endswith("LatentDiffusion"):
            kind = (config or {}).get("_target_", "no sdlight config")
            raise CheckpointError(f"{path} is not a latent diffusion checkpoint of sdlight ({kind}); sample from "
                                  "the checkpoint of a `model=ldm` run (e.g. logs/<task>/runs/<time>/checkpoints/last.ckpt)")
        hparams = ckpt.get("hyper_parameters", {})
        config = copy.deepcopy(config)
        # the weights of every part are in this checkpoint: build the architecture only
        config["first_stage"] = {"_target_": "sdlight.nn.autoencoder.AutoencoderKL", **hparams["first_stage_config"]}
        config["init_from"] = None  # a fine-tuned run's starting weights: overwritten below, and maybe moved since
        if str(config["conditioning"].get("_target_", "")).endswith("OpenCLIPTextEncoder"):
            config["conditioning"].update(pretrained=None, checkpoint_path=None)
        model: LatentDiffusion = hydra.utils.instantiate(config)
        model.load_state_dict(state_dict_of(ckpt), strict=True)
        model._scale_factor_ready = True
        return cls(model, device)

    # ------------------------------------------------------------------------------------------- sampling
    def describe_conditioning(self) -> str:
        """How this model is conditioned, in the sample CLI's words."""
        enc, key = self.model.cond_stage_model, self.model.condition_key
        if key == "text":
            return "text: use prompt= (or prompts_file=)"
        if key == "label":
            return f"class labels: use label=N with N in 0-{enc.num_classes - 1}"
        if key == "attributes":
            return f"attribute sets: use attributes=[...] with {len(enc.vocab_sizes)} ids, slot sizes {enc.vocab_sizes}"
        return "nothing (unconditional): give num_samples only"

    def check_conditions(self, conditions: Sequence[Any] | None) -> None:
        """Conditions of the kind (and range) this model was trained on; a one-line :class:`UsageError` if not."""
        key, enc = self.model.condition_key, self.model.cond_stage_model
        this = f"this checkpoint is conditioned on {self.describe_conditioning()}"
        if conditions is None:
            if key is not None:
                raise UsageError(f"{this}; no condition was given")
            return
        conditions = conditions.tolist() if isinstance(conditions, torch.Tensor) else list(conditions)
        if key is None:
            raise UsageError(f"{this}; drop prompt=/label=/attributes=")
        if not conditions:
            raise UsageError("no conditions were given (an empty list)")
        if key == "text":
            if not all(isinstance(c, str) for c in conditions):
                raise UsageError(f"{this}, not label=/attributes=")
            return
        if key == "label":
            if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in conditions):
                raise UsageError(f"{this}, not prompt=")
            bad = [c for c in conditions if not 0 <= c < enc.num_classes]
            if bad:
                raise UsageError(f"label={bad[0]}: this model has {enc.num_classes} classes "
                                 f"(0-{enc.num_classes - 1})")
            return
        sizes = enc.vocab_sizes
        for row in conditions:
            if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != len(sizes):
                raise UsageError(f"attributes={row!r}: {this}")
            bad = [(i, v) for i, (v, n) in enumerate(zip(row, sizes)) if not (isinstance(v, int) and 0 <= v < n)]
            if bad:
                i, v = bad[0]
                raise UsageError(f"attributes={list(row)}: id {v} in slot {i} is out of range (0-{sizes[i] - 1})")

    def tokens(self, prompt: str) -> list[str]:
        """The key tokens a text model attends to for ``prompt`` (start/end markers and padding included)."""
        tok = getattr(self.model.cond_stage_model, "tokenizer", None)
        if tok is None:
            raise ValueError("attention maps per word need a text-conditioned model")
        ids, lengths = tok([prompt])
        decoder = tok.tokenizer.decoder
        words = [decoder[i].replace("</w>", "") for i in ids[0, : lengths[0]].tolist()]
        return words + ["<pad>"] * (ids.shape[1] - len(words))

    @torch.no_grad()
    def __call__(self, conditions: Sequence[Any] | None = None, num_samples: int = 1, *, steps: int | None = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, negative: Any = None,
                 sampler: str | None = None, eta: float | None = None,
                 sampler_options: Mapping[str, Any] | None = None, seed: int = 0, use_ema: bool = True,
                 init_image: Image.Image | str | Path | None = None, strength: float = 0.6,
                 mask: Image.Image | str | Path | None = None, lowres: Image.Image | str | Path | None = None,
                 save_attention: bool = False, progress: bool = False) -> SampleResult:
        """``num_samples`` images for each of ``conditions`` (prompts, labels or attribute lists; None for an
        unconditional model). ``init_image`` + ``strength`` is img2img (SDEdit); ``init_image`` + ``mask``
        inpaints the white region of the mask (the rest is kept): models trained for inpainting
        (``model.concat=inpaint``) see the mask and the masked image; any other model blends the known region
        back at every step. ``lowres`` is the input of a super-resolution model. ``sampler_options`` go to the
        sampler function (``{"eta": 0.5}``, ``{"grid": "karras"}``, ``{"s_churn": 1.0}``; see
        :func:`sdlight.diffusion.sampler_options`); ``eta`` is a shortcut for ``sampler_options["eta"]``."""
        m = self.model
        check_sampling_options(num_samples, steps, guidance_scale, guidance_rescale, strength, eta, sampler)
        for path, option in ((init_image, "init_image"), (mask, "mask"), (lowres, "lowres")):
            check_image_file(path, option)
        self.check_conditions(conditions)
        if steps is not None and steps > m.schedule.num_timesteps:
            raise UsageError(f"steps={steps}: this model was trained with {m.schedule.num_timesteps} timesteps, "
                             "so at most that many steps")
        if conditions is None:
            conds, batch_cond = [None] * num_samples, None
        else:
            conds = [c for c in conditions for _ in range(num_samples)]
            batch_cond = conds if m.condition_key == "text" else torch.tensor(conds, device=self.device)
        n = len(conds)
        neg = None
        if negative is not None:
            neg = [negative] * n if isinstance(negative, str) else list(negative) * num_samples
        fn = SAMPLERS[sampler] if sampler is not None else None
        options = resolve_sampler_options(sampler, fn or m.sampler, sampler_options, eta)
        kwargs: dict[str, Any] = {"progress": progress, **options}
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn((n, *m.latent_shape), generator=generator)  # CPU noise: same samples on any device
        scale = m.guidance_scale if guidance_scale is None else guidance_scale

        concat_kind = type(m.concat_stage).__name__ if m.concat_stage is not None else None
        if (concat_kind == "LowResConcat") != (lowres is not None):
            raise ValueError("lowres= is the input of super-resolution models (model.concat=superres), and they "
                             f"need it; this model's concat stage: {concat_kind}")
        if concat_kind == "InpaintingConcat" and (init_image is None or mask is None):
            raise ValueError("this is an inpainting model: give init_image and mask")
        if lowres is not None:
            low = lowres if isinstance(lowres, Image.Image) else Image.open(lowres)
            low = torch.from_numpy(np.asarray(low.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
            kwargs["concat"] = m.make_concat({"lowres": (low / 127.5 - 1.0)[None].to(self.device)})
        keep = None  # (pixels, mask): the known region, pasted back after decoding
        if init_image is not None:
            pixels = to_tensor_image(init_image, m.image_size)
            init_size = (init_image if isinstance(init_image, Image.Image) else Image.open(init_image)).size
            z0 = m.encode_images(pixels.to(self.device), sample=False).expand(n, -1, -1, -1)
            if mask is not None:
                pix_mask = F.interpolate(to_mask(mask, init_size), size=pixels.shape[-2:], mode="nearest")
                keep = (pixels.to(self.device), pix_mask.to(self.device))
            if mask is not None and concat_kind == "InpaintingConcat":
                kwargs["concat"] = m.make_concat({"image": pixels.to(self.device), "mask": pix_mask.to(self.device)})
            elif mask is not None:
                # a latent is regenerated when any pixel it covers is: the seam is generated, then pasted over
                latent = F.adaptive_max_pool2d(pix_mask, m.latent_shape[1:]).to(self.device)
                kwargs["callback"] = inpaint_callback(z0, latent, m.schedule, generator=generator)
            else:
                x_T, kwargs["strength"] = z0, strength
        elif mask is not None:
            raise ValueError("a mask needs an init_image: the mask says which part of it to regenerate")

        recorder = None
        if save_attention and m.condition_key is None:
            raise ValueError("attention maps show where each condition token went: this model is unconditional")
        if save_attention:
            recorder = AttentionRecorder(m.model.diffusion_model, n, m.image_size, m.condition_key is not None
                                         and scale != 1.0)
            recorder.__enter__()
        try:
            images = m.generate(batch_cond, n, steps=steps, guidance_scale=scale, guidance_rescale=guidance_rescale,
                                negative=neg, generator=generator, use_ema=use_ema, sampler=fn, x_T=x_T, **kwargs)
        finally:
            if recorder is not None:
                recorder.__exit__()
        if keep is not None:
            # the decoder sees the whole latent: whatever the prompt did to the generated region, the known pixels
            # are the input's own (the latents alone keep them only up to the VAE's reconstruction)
            known, pix_mask = keep
            images = pix_mask * images + (1 - pix_mask) * known
        settings = {"steps": steps, "guidance_scale": scale, "guidance_rescale": guidance_rescale,
                    "sampler": sampler or sampler_name(m.sampler), "seed": seed,
                    "eta": options.get("eta"), "sampler_options": options, "use_ema": use_ema, "negative": negative,
                    "strength": strength if init_image is not None and mask is None else None,
                    "inpainting": mask is not None, "superres": lowres is not None}
        attention = None
        if recorder is not None:
            maps = recorder.maps().cpu()
            attention = [(self.tokens(c) if isinstance(c, str) else [str(i) for i in range(maps.shape[1])], maps[i])
                         for i, c in enumerate(conds)]
        return SampleResult(to_pil(images), conds, settings, attention)
