"""What a user asks of sampling, checked before a model is loaded or a sample drawn: each check raises a one-line
:class:`UsageError` that names the option (as the sample and evaluate CLIs spell it), its value and what works."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from sdlight.diffusion import SAMPLERS, sampler_name
from sdlight.diffusion import sampler_options as options_of
from sdlight.diffusion.grids import GRIDS, SPACINGS
from sdlight.errors import UsageError

ImageInput = Image.Image | str | Path
# the sample CLI's options for the data's condition entries; any other entry is given as conditions.<key>=
CLI_OPTIONS = {"text": "prompt=", "label": "label=", "attributes": "attributes="}
# sampler options that take a number >= 0
_NUMBER_OPTIONS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")


def option_of(key: str) -> str:
    """How the sample CLI spells the condition entry ``key`` (what messages about conditions name)."""
    return CLI_OPTIONS.get(key, f"conditions.{key}=")


def check_sampling_options(num_samples: int = 1, steps: int | None = None, guidance: float | None = None,
                           guidance_rescale: float = 0.0, strength: float = 0.6, eta: float | None = None,
                           sampler: str | None = None) -> None:
    """The numeric sampling options and the sampler's name."""
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


def check_sampler_option_values(options: Mapping[str, Any]) -> None:
    """The values of the sampler options, whichever sampler takes them (a wrong value would otherwise surface deep
    in the sampler, after the model has loaded)."""
    for name, allowed in (("grid", GRIDS), ("spacing", SPACINGS)):
        value = options.get(name)
        if value is not None and value not in allowed:
            raise UsageError(f"sampler_options.{name}={value}: unknown; choose one of {', '.join(allowed)}")
    for name in _NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise UsageError(f"sampler_options.{name}={value}: give a number >= 0")
    if options.get("clip_x0") is not None:
        # the samplers clamp the x0 of the space they run in; sdlight's models run in latent space, whose values
        # are not bounded by ±1 (unit std after scale_factor), so clamping there wrecks every sample
        raise UsageError(f"sampler_options.clip_x0={options['clip_x0']}: clip_x0 bounds x0 for pixel-space models; "
                         "sdlight's models sample latents, where it turns every sample into noise: leave it unset")


def resolve_sampler_options(name: str | None, sampler: Callable | None, options: Mapping[str, Any] | None = None,
                            eta: float | None = None) -> dict[str, Any]:
    """The keyword options for ``sampler`` (registered as ``name``): ``options`` plus the ``eta`` shortcut.

    An option the sampler does not take is a :class:`UsageError` naming it and the options the sampler has, so
    ``sampler=euler sampler_options.eta=0.5`` fails before anything runs instead of being ignored. Without a
    sampler (the model's own, not loaded yet) only the values are checked.
    """
    resolved = dict(options or {})
    if eta is not None:
        resolved.setdefault("eta", eta)  # the sample CLI's older `eta=` spelling of sampler_options.eta
    if sampler is not None and resolved:
        allowed = options_of(sampler)
        unknown = [k for k in resolved if k not in allowed]
        if unknown:
            label = name or sampler_name(sampler)
            raise UsageError(f"sampler_options.{unknown[0]}: sampler {label} has no such option; its options: "
                             f"{', '.join(allowed) or 'none'}")
    check_sampler_option_values(resolved)
    return resolved


def _shown(option: str, value: Any) -> str:
    """``option=value`` for a path; an image given in Python has no short form."""
    return option if isinstance(value, Image.Image) else f"{option}={value}"


def check_image_file(path: ImageInput | None, option: str) -> None:
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


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of an image or image file, without decoding its pixels."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as im:
        return im.size


def check_mask(mask: ImageInput | None, init_image: ImageInput | None) -> None:
    """A mask comes with an init image and covers it pixel for pixel (both are resized to the model's size)."""
    if mask is None:
        return
    if init_image is None:
        raise UsageError(f"{_shown('mask', mask)} needs init_image=: the mask says which part of that image to "
                         "regenerate")
    (mw, mh), (iw, ih) = image_size(mask), image_size(init_image)
    if (mw, mh) != (iw, ih):
        raise UsageError(f"{_shown('mask', mask)} is {mw}x{mh} but {_shown('init_image', init_image)} is {iw}x{ih}: "
                         "give a mask of the init image's size (white = regenerate, black = keep)")


def check_concat_inputs(reads: str | None, init_image: ImageInput | None, mask: ImageInput | None,
                        lowres: ImageInput | None) -> None:
    """The inputs of a model's concat stage are given, and ``lowres`` only to a model that reads it. ``reads`` is
    the batch entry the stage makes its channels from: ``mask`` (inpainting), ``lowres`` (super-resolution), or
    None for a model without one."""
    if lowres is not None and reads != "lowres":
        kind = "an inpainting model (give init_image= and mask=)" if reads == "mask" else \
            "not a super-resolution model"
        raise UsageError(f"{_shown('lowres', lowres)}: this checkpoint is {kind}; lowres= is the input of "
                         "super-resolution models (trained with model/concat=superres): leave it out")
    if reads == "mask" and (init_image is None or mask is None):
        raise UsageError("this checkpoint is an inpainting model (model/concat=inpaint): give init_image= and mask= "
                         "(white = regenerate, black = keep)")
    if reads == "lowres" and lowres is None:
        raise UsageError("this checkpoint is a super-resolution model (model/concat=superres): give lowres= (the "
                         "low-resolution image to upscale)")


def available_devices() -> list[str]:
    """The devices torch can use on this machine, as ``device=`` takes them."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    return ["cpu", *(f"cuda:{i}" for i in range(gpus)), *(["mps"] if mps is not None and mps.is_available() else [])]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (``auto`` or None: the GPU if there is one, else the CPU); a CUDA or MPS device
    this machine does not have is a :class:`UsageError` listing the ones it has."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device={device}: not a device name; this machine has {', '.join(have)} "
                         "(or device=auto)") from None
    if dev.type in ("cuda", "mps") and str(dev) not in have and f"{dev}:0" not in have:
        raise UsageError(f"device={device}: not available here; this machine has {', '.join(have)} (device=auto "
                         "takes the GPU when there is one)")
    return dev


@dataclass(frozen=True)
class SampleRequest:
    """What a user asks of sampling, checked once when it is made, before any model is loaded: the numeric
    options, the sampler's name and its ``sampler_options`` (``eta`` is a shortcut for ``sampler_options.eta``),
    the image files. What depends on the model (its conditions, its concat inputs, its step count) is checked by
    :meth:`sdlight.pipeline.Pipeline.run`, which takes it. See :meth:`sdlight.pipeline.Pipeline.__call__`."""

    conditions: Any = None
    num_samples: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    negative: Any = None
    sampler: str | None = None
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    eta: float | None = None
    seed: int = 0
    use_ema: bool = True
    init_image: ImageInput | None = None
    strength: float = 0.6
    mask: ImageInput | None = None
    lowres: ImageInput | None = None
    save_attention: bool = False
    progress: bool = False
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        check_sampling_options(self.num_samples, self.steps, self.guidance_scale, self.guidance_rescale,
                               self.strength, self.eta, self.sampler)
        for name, side in (("height", self.height), ("width", self.width)):
            if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
                raise UsageError(f"{name}={side!r}: give a whole number of pixels (null: the model's image size)")
        options = resolve_sampler_options(self.sampler, SAMPLERS.get(self.sampler) if self.sampler else None,
                                          given_options(self.sampler_options), self.eta)
        object.__setattr__(self, "sampler_options", options)  # with the eta shortcut folded in
        for path, option in ((self.init_image, "init_image"), (self.mask, "mask"), (self.lowres, "lowres")):
            check_image_file(path, option)
        check_mask(self.mask, self.init_image)
