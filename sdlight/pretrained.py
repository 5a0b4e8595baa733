"""Starting from released weights: a full Stable Diffusion checkpoint (CompVis layout, ``.ckpt`` or
``.safetensors``; SD-XL's generative-models layout; one of ours too) or a diffusers folder as a latent diffusion
model's initialisation (``model.init_from``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdlight.checkpoints import CheckpointError, ema_swapped, load_exact, read_checkpoint, state_dict_of, under_prefix
from sdlight.nn.unet import UNetModel

DIFFUSERS_STEMS = {"unet": ("diffusion_pytorch_model",), "transformer": ("diffusion_pytorch_model",),
                   "vae": ("diffusion_pytorch_model",),
                   "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model"),
                   "text_encoder_3": ("model", "pytorch_model")}
CONDITIONING_FILE = "sdlight_conditioning.safetensors"  # our own condition encoder next to a diffusers export
OBJECTIVE_METADATA = "sdlight.objective"  # the training objective's settings, in an exported weights file's metadata


def component_file(folder: Path, component: str) -> Path | None:
    """The weights file of a diffusers component folder (full precision preferred over an fp16 variant; the
    index of a sharded one, ``*.safetensors.index.json``, as SD3's T5)."""
    for stem in DIFFUSERS_STEMS[component]:
        for suffix in (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin", ".safetensors.index.json",
                       ".bin.index.json"):
            if (folder / component / (stem + suffix)).is_file():
                return folder / component / (stem + suffix)
    return None


def component_weights(path: Path) -> dict[str, torch.Tensor]:
    """A component's weights: one file, or every shard an ``.index.json`` names."""
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in state_dict_of(read_checkpoint(path.parent / shard)).items()}
    return state_dict_of(read_checkpoint(path))


def _load_sd3_text(conditioning: nn.Module, parts: dict[str, dict[str, torch.Tensor]], where: str) -> list[str]:
    """SD3's text encoders (Hugging Face weights by SD3 name) into model.conditioning; a T5 the file does not
    hold keeps its own weights (SD3's files come with and without it)."""
    from sdlight.convert import ConversionError
    from sdlight.convert_sd3 import sd3_text_encoder, sd3_text_to_ours

    encoder = sd3_text_encoder(conditioning)
    if encoder is None:
        raise CheckpointError(f"{where} holds SD3's text encoders ({', '.join(parts)}); model.conditioning is not "
                              "SD3's: choose model/conditioning=sd3_text or sd3_text_t5")
    try:
        sd = sd3_text_to_ours(parts, encoder)
    except ConversionError as err:
        raise CheckpointError(f"{where}: {err}") from None
    unused = {k for k in encoder.state_dict() if k.startswith("t5.")} if "t5xxl" not in parts else set()
    load_exact(conditioning, sd, f"{where}: SD3's text encoders do not fit model.conditioning",
               "Check model/conditioning (sd3_text, or sd3_text_t5 with T5).", unused)
    kept = " (T5: none in the file, keeps its own weights)" if unused else ""
    return [f"text encoders: {len(sd)} tensors (SD3 layout: {', '.join(parts)}){kept}"]


def _text_weights(conditioning: nn.Module, sd: dict[str, torch.Tensor], hf_prefix: str | None, where: str
                  ) -> list[str]:
    """Loads a text encoder's weights (ours, open_clip's, or Hugging Face CLIP's layout) into ``conditioning``
    (a conditioner's only encoder when it has one: released checkpoints hold one text encoder)."""
    from sdlight.convert import hf_to_open_clip

    conditioning = getattr(conditioning, "single", None) or conditioning

    own = conditioning.state_dict()
    if not sd:
        if own and all(not p.requires_grad for p in conditioning.parameters()):
            return ["text encoder: none in the file; model.conditioning keeps its own pretrained weights"]
        if own:
            raise CheckpointError(f"{where} holds no weights for model.conditioning ({type(conditioning).__name__})")
        return []
    if not own:
        raise CheckpointError(f"{where} has a condition encoder ({len(sd)} tensors) but model.conditioning "
                              f"({type(conditioning).__name__}) has no weights: choose the matching conditioning")
    if hf_prefix is not None:  # Hugging Face CLIPTextModel → the open_clip tower our encoder holds as .model
        sd = {"model." + k: v for k, v in hf_to_open_clip(sd, hf_prefix).items()}
    unused = {"model.text_projection", "model.logit_scale"}  # the contrastive head: never run for contexts
    if getattr(conditioning, "layer", None) == "penultimate":
        last = len(conditioning.tower.transformer.resblocks) - 1
        unused |= {k for k in own if k.startswith(f"model.transformer.resblocks.{last}.")}
    skipped = load_exact(conditioning, sd, f"{where}: the text encoder does not fit model.conditioning",
                         "Check arch / layer of model/conditioning (SD 1.x: ViT-L-14-quickgelu, last; "
                         "SD 2.x: ViT-H-14, penultimate).", unused)
    note = f" ({len(skipped)} unused tensors not in the file, e.g. {skipped[0]})" if skipped else ""
    return [f"text encoder: {len(sd)} tensors{note}"]


SGM_CONDITIONER = "conditioner.embedders."  # SD-XL's files (Stability's generative-models): one entry per embedder


def sgm_conditioner_weights(sd: dict[str, torch.Tensor], conditioner: nn.Module) -> dict[str, torch.Tensor]:
    """SD-XL's ``conditioner.embedders.N.*`` under our conditioner's keys. SD-XL lists each text tower as an
    embedder of its own (0: CLIP ViT-L/14 in Hugging Face names, ``transformer.text_model.*``; 1: OpenCLIP
    ViT-bigG/14 in open_clip names, ``model.*``), then the weightless size embedders; ours holds the towers of one
    :class:`~sdlight.conditioning.SDXLTextEncoder` (``embedders.<i>.towers.<t>.model.*``), so each tower takes
    one of their places, any other encoder one."""
    from sdlight.convert import hf_to_open_clip

    slots = []  # our key prefix for each of their embedders, in order
    for i, encoder in enumerate(conditioner.embedders):
        towers = getattr(encoder, "towers", None)
        slots += [f"embedders.{i}.towers.{t}." for t in range(len(towers))] if towers is not None else \
            [f"embedders.{i}."]
    theirs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(SGM_CONDITIONER):
            index, rest = key[len(SGM_CONDITIONER):].split(".", 1)
            theirs.setdefault(int(index), {})[rest] = value
    out = {}
    for index, part in sorted(theirs.items()):
        if index >= len(slots):
            raise CheckpointError(f"the file's conditioner has weights for embedder {index} (e.g. "
                                  f"{next(iter(part))}); model.conditioning + model.conditioners have {len(slots)}")
        if any(k.startswith("transformer.text_model.") for k in part):  # Hugging Face CLIPTextModel
            part = {"model." + k: v for k, v in hf_to_open_clip(part, "transformer.text_model.").items()}
        part = {k: v for k, v in part.items() if k not in ("model.logit_scale", "model.logit_bias")}  # never run
        out.update({slots[index] + k: v for k, v in part.items()})
    if getattr(conditioner, "single", None) is not None:  # a lone encoder's keys carry no embedders.0.
        out = {k.removeprefix("embedders.0."): v for k, v in out.items()}
    return out


@dataclass
class Pretrained:
    """What ``load_pretrained`` loaded: lines describing it, and the file's latent scale factor (None when the file
    has none: released CompVis files do not store it) and shift factor (None when it has none: a shift of 0)."""

    lines: list[str]
    scale_factor: float | None
    shift_factor: float | None = None


def _diffusers_latent_factors(folder: Path) -> tuple[float | None, float | None]:
    """The VAE config's ``scaling_factor`` and ``shift_factor`` (SD3 / Flux: latents are (z - shift) * scale)."""
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    return None if scale is None else float(scale), None if shift is None else float(shift)


def _diffusers_denoiser(path: Path, files: dict[str, Path | None], backbone: nn.Module, where: str
                        ) -> dict[str, torch.Tensor]:
    """The folder's unet/ or transformer/ weights in ``backbone``'s keys; a folder for another kind of backbone
    is one line."""
    from sdlight.convert import invert_map, unet_key_map
    from sdlight.convert_sdxl import is_text_time
    from sdlight.convert_transformer import diffusers_class, transformer_from_diffusers

    component = "unet" if files["unet"] is not None else "transformer"
    config_file = path / component / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    theirs = config.get("_class_name")  # None: a config that does not say; the folder's layout still must fit
    ours = "UNet2DConditionModel" if isinstance(backbone, UNetModel) else diffusers_class(backbone)
    if ours is None or (component == "unet") != isinstance(backbone, UNetModel) or theirs not in (None, ours):
        raise CheckpointError(f"{where}: its {component}/ holds a {theirs or component}; model.unet is a "
                              f"{type(backbone).__name__} ({ours or 'no diffusers counterpart'}): choose the "
                              "model/unet the folder was exported from")
    weights = state_dict_of(read_checkpoint(files[component]))
    if component == "transformer":
        return transformer_from_diffusers(weights, backbone)
    own = backbone.state_dict()
    return invert_map(weights, unet_key_map(own, backbone.config, is_text_time(config)), own)


def load_pretrained(path: str | Path, unet: nn.Module, first_stage: nn.Module, conditioning: nn.Module,
                    use_ema: bool = True) -> Pretrained:
    """Initialises the UNet, the VAE and the condition encoder from a full SD 1.x / 2.x / XL checkpoint (CompVis
    layout, ``.ckpt`` or ``.safetensors``; SD-XL's ``conditioner.embedders.*``; one of ours too) or a diffusers
    folder. Every key must fit (missing, unexpected and mismatched ones are listed in the error); returns lines
    describing what was loaded and the file's scale and shift factors (a diffusers VAE config's ``scaling_factor``
    and ``shift_factor``, our files' ``scale_factor`` and ``shift_factor``)."""
    from sdlight.convert import ConversionError, invert_map, vae_key_map
    from sdlight.convert_sd3 import sd3_single_file_parts
    from sdlight.convert_sdxl import diffusers_text_to_sgm

    path, where = Path(path), f"model.init_from={path}"
    sgm, sd3 = None, None
    if path.is_dir():
        files = {c: component_file(path, c) for c in DIFFUSERS_STEMS}
        if (files["unet"] is None and files["transformer"] is None) or files["vae"] is None:
            raise CheckpointError(f"{where}: not a diffusers folder (no unet/ or transformer/, and vae/ weights) nor "
                                  "a checkpoint file")
        own_vae = first_stage.state_dict()
        parts = {"unet": _diffusers_denoiser(path, files, unet, where),
                 "vae": invert_map(state_dict_of(read_checkpoint(files["vae"])),
                                   vae_key_map(own_vae, len(first_stage.config["ch_mult"])), own_vae)}
        text, hf_prefix = {}, None
        if files["transformer"] is not None and files["text_encoder"] is not None and \
                files["text_encoder_2"] is not None:  # SD3: CLIP-L, bigG and (when there) T5
            sd3 = {name: component_weights(files[component]) for name, component in
                   (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))
                   if files[component] is not None}
        elif files["text_encoder"] is not None and files["text_encoder_2"] is not None:  # SD-XL: SD-XL's file names
            sgm = sgm_conditioner_weights(diffusers_text_to_sgm(
                state_dict_of(read_checkpoint(files["text_encoder"])),
                state_dict_of(read_checkpoint(files["text_encoder_2"]))), conditioning)
        elif files["text_encoder"] is not None:
            text = state_dict_of(read_checkpoint(files["text_encoder"]))
            hf_prefix = "text_model." if any(k.startswith("text_model.") for k in text) else ""
        elif (path / CONDITIONING_FILE).is_file():
            text = state_dict_of(read_checkpoint(path / CONDITIONING_FILE))
        which, (scale, shift) = "diffusers folder", _diffusers_latent_factors(path)
    elif path.is_file():
        sd, which = ema_swapped(state_dict_of(read_checkpoint(path, mmap=True)), use_ema)
        scale = float(sd["scale_factor"]) if "scale_factor" in sd else None
        shift = float(sd["shift_factor"]) if "shift_factor" in sd else None
        parts = {"unet": under_prefix(sd, "model.diffusion_model."), "vae": under_prefix(sd, "first_stage_model.")}
        text, hf_prefix = under_prefix(sd, "cond_stage_model."), None
        if any(k.startswith("transformer.text_model.") for k in text):  # SD 1.x: Hugging Face CLIP layout
            hf_prefix = "transformer.text_model."
        if any(k.startswith(SGM_CONDITIONER) for k in sd):  # SD-XL: the whole conditioner, in our keys
            sgm = sgm_conditioner_weights(sd, conditioning)
        try:  # SD3: text_encoders.{clip_l, clip_g, t5xxl}.transformer.*
            sd3 = sd3_single_file_parts(sd) or None
        except ConversionError as err:
            raise CheckpointError(f"{where}: {err}") from None
    else:
        raise CheckpointError(f"{where}: no such file or directory (give an SD .ckpt/.safetensors or a diffusers "
                              "folder)")
    load_exact(unet, parts["unet"], f"{where}: the {'UNet' if isinstance(unet, UNetModel) else 'transformer'} does "
               "not fit model.unet", "Check that model/unet matches the file (sd15 for SD 1.x, sd21 for SD 2.x, "
               "sdxl, mmdit_sd3_medium, pixart_alpha_512).")
    load_exact(first_stage, parts["vae"], f"{where}: the VAE does not fit model.first_stage.autoencoder",
               "Check that the autoencoder config matches the file (kl_f8 for SD).")
    lines = [f"init_from {path} ({which}): UNet {len(parts['unet'])} tensors, VAE {len(parts['vae'])} tensors"]
    if sgm is not None:
        load_exact(conditioning, sgm, f"{where}: the SD-XL conditioner does not fit model.conditioning (+ "
                   "model.conditioners)", "Check model/conditioning (sdxl_text for SD-XL base).")
        lines.append(f"text encoders: {len(sgm)} tensors (SD-XL layout)")
    elif sd3 is not None:
        lines += _load_sd3_text(conditioning, sd3, where)
    else:
        lines += _text_weights(conditioning, text, hf_prefix, where)
    return Pretrained(lines, scale, shift)


def recorded_objective(path: str | Path) -> dict | None:
    """The objective settings (`Objective.settings`) that ``path`` records: an export's metadata (the single
    file's, a diffusers folder's UNet file's) or one of our checkpoints; None for files that record none (released
    SD weights: DDPM, with the prediction type their config says)."""
    path = Path(path)
    if path.is_dir():
        path = component_file(path, "unet") or component_file(path, "transformer") or path
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(OBJECTIVE_METADATA)
        return json.loads(text) if text else None
    if path.is_file():
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError:
            return None  # load_pretrained says what is wrong with it
        return (ckpt.get("hyper_parameters") or {}).get("objective_settings")
    return None
