"""Reading and writing checkpoints: our Lightning checkpoints, released CompVis / Stable Diffusion files.

Untrusted files are read with ``weights_only=True`` or safetensors: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdlight.errors import UsageError

AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable, or not of the kind that was asked for."""


TRUST_PICKLE_ENV = "SDLIGHT_TRUST_PICKLE"


class NotACheckpointError(CheckpointError, TypeError):
    """The file holds something other than a dict (a list, a whole pickled module)."""


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a legacy pickle: what ``torch.load`` can read at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _trusted(trust_pickle: bool | None) -> bool:
    if trust_pickle is not None:
        return trust_pickle
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def read_checkpoint(path: str | Path, *, mmap: bool = False, trust_pickle: bool | None = None) -> dict[str, Any]:
    """Loads a ``.ckpt``/``.pt``/``.pth``/``.bin`` or ``.safetensors`` file into a dict: the package's one reader.

    Safetensors files come back as ``{"state_dict": tensors}`` so callers see one shape. Pickled files are read
    with ``weights_only=True``; one that needs full unpickling (it names classes, which could run code) is refused
    unless ``trust_pickle`` (default: ``$SDLIGHT_TRUST_PICKLE=1``) says the file is trusted. ``mmap`` maps zip
    files instead of reading them (a multi-GB file whose metadata alone is wanted).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as e:  # truncated or not safetensors at all
            raise CheckpointError(f"could not read {path} as safetensors: {e}") from e
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save file nor .safetensors "
                              "(give a .ckpt written by sdlight.train, e.g. logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:  # legacy (non-zip) files cannot be mapped
            if not mmap:
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _trusted(trust_pickle):
            found = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
            raise CheckpointError(
                f"could not read checkpoint {path} without full unpickling, which can run code stored in the file"
                f"{' (' + found[0] + ')' if found else ''}; if you trust it, set {TRUST_PICKLE_ENV}=1, or "
                "re-save its tensors as .safetensors") from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated files, not a pickle at all
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise NotACheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``state_dict`` entry, or the dict itself for bare state dicts."""
    sd = ckpt.get("state_dict", ckpt)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed, if any key has it; otherwise ``sd`` unchanged."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def autoencoder_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's own weights from a stage-1 checkpoint, a released SD VAE, or a full SD checkpoint
    (``first_stage_model.`` prefix); loss / discriminator / LPIPS keys are dropped."""
    sd = strip_prefix(sd, "first_stage_model.")
    return {k: v for k, v in sd.items() if k.startswith(AUTOENCODER_PARTS)}


def _some(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} {keys[:n]}{'…' if len(keys) > n else ''}"


def load_autoencoder_weights(model: nn.Module, path: str | Path) -> None:
    """Loads a released or our own autoencoder checkpoint into ``model``; every key and shape must match.

    Accepts CompVis-layout ``.ckpt`` / ``.safetensors`` files with or without the ``first_stage_model.`` prefix
    and with or without ``loss.*`` keys (a released SD VAE, a full SD checkpoint, a stage-1 checkpoint of ours).
    """
    _load_autoencoder_state(model, autoencoder_state_dict(state_dict_of(read_checkpoint(path))), path)


def _load_autoencoder_state(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    if any(part in k for k in sd for part in (".down_blocks.", ".up_blocks.", ".mid_block.")):
        raise CheckpointError(f"{path} is in the diffusers layout (down_blocks/up_blocks keys); give the CompVis "
                              "layout file of the same VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors), or the "
                              "diffusers folder as model.init_from")
    if not sd:
        raise CheckpointError(f"{path} has no autoencoder weights (no encoder.*/decoder.* keys)")
    load_exact(model, sd, f"{path} does not fit this autoencoder",
               "Check that model/autoencoder matches the checkpoint's architecture.")


def load_exact(model: nn.Module, sd: dict[str, torch.Tensor], what: str, hint: str = "",
               unused: set[str] = frozenset()) -> list[str]:
    """Loads ``sd`` into ``model``: every key of both must match in name and shape, except that keys in ``unused``
    (weights the model never runs) may be missing. Returns the missing unused keys; anything else raises."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and sd[k].shape != v.shape]
    bad_missing = [k for k in missing if k not in unused]
    if bad_missing or unexpected or mismatched:
        raise CheckpointError(f"{what}: missing {_some(bad_missing)}, unexpected {_some(unexpected)}, "
                              f"shape mismatches (file vs model) {_some(mismatched, 3)}. {hint}".rstrip())
    result = model.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) <= set(unused) and not result.unexpected_keys  # checked above
    return missing


def load_autoencoder(path: str | Path) -> nn.Module:
    """Rebuilds a trained autoencoder from a stage-1 checkpoint of ours (architecture from its hyperparameters)."""
    from sdlight.nn.autoencoder import AutoencoderKL

    ckpt = read_checkpoint(path)
    config = ckpt.get("hyper_parameters", {}).get("autoencoder_config")
    if config is None:
        raise CheckpointError(
            f"{path} is not an sdlight autoencoder checkpoint (no hyper_parameters.autoencoder_config); "
            "train one with `python -m sdlight.train model=autoencoder`, or give a released VAE through "
            "model.first_stage.autoencoder + model.first_stage.ckpt")
    model = AutoencoderKL(**config)
    _load_autoencoder_state(model, autoencoder_state_dict(state_dict_of(ckpt)), path)
    return model


def load_first_stage(ckpt: str | Path | None, autoencoder: nn.Module | None = None) -> nn.Module:
    """The frozen stage-1 model of a latent diffusion model.

    With ``autoencoder`` (an architecture built from a config, e.g. ``kl_f8``), ``ckpt`` may be any released
    VAE / SD checkpoint and is loaded into it, or None when ``model.init_from`` brings the VAE's weights; without,
    ``ckpt`` must be one of our stage-1 checkpoints, which carry their architecture.
    """
    if ckpt is None and autoencoder is not None:
        return autoencoder
    if ckpt is None or not Path(ckpt).is_file():
        raise CheckpointError(
            f"model.first_stage.ckpt={ckpt}: no such file. Stage 2 needs a trained stage 1: run its experiment first "
            "(e.g. `python -m sdlight.train +experiment=quickstart_vae hydra.run.dir=logs/quickstart/vae`) and point "
            "model.first_stage.ckpt at its checkpoints/last.ckpt (a +debug=fdr run writes no checkpoint)")
    if autoencoder is None:
        return load_autoencoder(ckpt)
    load_autoencoder_weights(autoencoder, ckpt)
    return autoencoder


# ------------------------------------------------------------------------------ starting from released weights
DIFFUSERS_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                   "text_encoder": ("model", "pytorch_model")}
CONDITIONING_FILE = "sdlight_conditioning.safetensors"  # our own condition encoder next to a diffusers export
LITEMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")


def component_file(folder: Path, component: str) -> Path | None:
    """The weights file of a diffusers component folder (full precision preferred over an fp16 variant)."""
    for stem in DIFFUSERS_STEMS[component]:
        for suffix in (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin"):
            if (folder / component / (stem + suffix)).is_file():
                return folder / component / (stem + suffix)
    return None


def _under(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ema_swapped(sd: dict[str, torch.Tensor], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """A CompVis-layout state dict with the EMA weights in place of the raw ones (when asked and present), without
    any ``model_ema.*`` key; and which weights those are, in words."""
    raw = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if not use_ema:
        return raw, "raw weights"
    if any(k.startswith("model_ema.module.") for k in sd):  # ours: an AveragedModel of [UNet wrapper, encoder]
        if int(sd.get("model_ema.n_averaged", torch.tensor(1))) == 0:
            return raw, "raw weights (the EMA was never updated)"
        for part, prefix in (("model_ema.module.0.", "model."), ("model_ema.module.1.", "cond_stage_model.")):
            raw.update({prefix + k: v for k, v in _under(sd, part).items()})
        return raw, "EMA weights"
    if any(k.startswith("model_ema.") and k not in LITEMA_BUFFERS for k in sd):
        # CompVis LitEma: "model_ema." + the wrapper-relative parameter name with its dots removed
        for key in [k for k in raw if k.startswith("model.diffusion_model.")]:
            flat = "model_ema." + key[len("model."):].replace(".", "")
            if flat not in sd:
                raise CheckpointError(f"the file has EMA weights but none for {key} ({flat}); use the raw ones "
                                      "with model.init_from_ema=false")
            raw[key] = sd[flat]
        return raw, "EMA weights"
    return raw, "the file's weights (it holds no separate EMA)"


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


@dataclass
class Pretrained:
    """What ``load_pretrained`` loaded: lines describing it, and the file's latent scale factor (None when the file
    has none: released CompVis files do not store it)."""

    lines: list[str]
    scale_factor: float | None


def _diffusers_scale_factor(folder: Path, where: str) -> float | None:
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("shift_factor"):  # SD3 / Flux VAEs: latents are (z - shift) * scale
        raise CheckpointError(f"{where}: its VAE's latents have a shift_factor ({config['shift_factor']}), which "
                              "these latent diffusion models do not apply; use a VAE without one (SD 1.x / 2.x / XL)")
    scale = config.get("scaling_factor")
    return None if scale is None else float(scale)


def load_pretrained(path: str | Path, unet: nn.Module, first_stage: nn.Module, conditioning: nn.Module,
                    use_ema: bool = True) -> Pretrained:
    """Initialises the UNet, the VAE and the condition encoder from a full SD 1.x / 2.x checkpoint (CompVis
    layout, ``.ckpt`` or ``.safetensors``; one of ours too) or a diffusers folder. Every key must fit (missing,
    unexpected and mismatched ones are listed in the error); returns lines describing what was loaded and the
    file's scale factor (a diffusers VAE config's ``scaling_factor``, our files' ``scale_factor``)."""
    from sdlight.convert import invert_map, unet_key_map, vae_key_map

    path, where = Path(path), f"model.init_from={path}"
    if path.is_dir():
        files = {c: component_file(path, c) for c in DIFFUSERS_STEMS}
        if files["unet"] is None or files["vae"] is None:
            raise CheckpointError(f"{where}: not a diffusers folder (no unet/ and vae/ weights) nor a checkpoint file")
        own_unet, own_vae = unet.state_dict(), first_stage.state_dict()
        parts = {"unet": invert_map(state_dict_of(read_checkpoint(files["unet"])),
                                    unet_key_map(own_unet, unet.config), own_unet),
                 "vae": invert_map(state_dict_of(read_checkpoint(files["vae"])),
                                   vae_key_map(own_vae, len(first_stage.config["ch_mult"])), own_vae)}
        text, hf_prefix = {}, None
        if files["text_encoder"] is not None:
            text = state_dict_of(read_checkpoint(files["text_encoder"]))
            hf_prefix = "text_model." if any(k.startswith("text_model.") for k in text) else ""
        elif (path / CONDITIONING_FILE).is_file():
            text = state_dict_of(read_checkpoint(path / CONDITIONING_FILE))
        which, scale = "diffusers folder", _diffusers_scale_factor(path, where)
    elif path.is_file():
        sd, which = ema_swapped(state_dict_of(read_checkpoint(path, mmap=True)), use_ema)
        scale = float(sd["scale_factor"]) if "scale_factor" in sd else None
        parts = {"unet": _under(sd, "model.diffusion_model."), "vae": _under(sd, "first_stage_model.")}
        text, hf_prefix = _under(sd, "cond_stage_model."), None
        if any(k.startswith("transformer.text_model.") for k in text):  # SD 1.x: Hugging Face CLIP layout
            hf_prefix = "transformer.text_model."
    else:
        raise CheckpointError(f"{where}: no such file or directory (give an SD .ckpt/.safetensors or a diffusers "
                              "folder)")
    load_exact(unet, parts["unet"], f"{where}: the UNet does not fit model.unet",
               "Check that model/unet matches the file (sd15 for SD 1.x, sd21 for SD 2.x).")
    load_exact(first_stage, parts["vae"], f"{where}: the VAE does not fit model.first_stage.autoencoder",
               "Check that the autoencoder config matches the file (kl_f8 for SD).")
    lines = [f"init_from {path} ({which}): UNet {len(parts['unet'])} tensors, VAE {len(parts['vae'])} tensors",
             *_text_weights(conditioning, text, hf_prefix, where)]
    return Pretrained(lines, scale)


# ------------------------------------------------------------------------------------------ fault tolerance
def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` such that a process killed at any moment leaves either the old file or the new
    one: written to ``path.tmp`` in the same folder, fsynced, renamed over ``path``, and the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself survives a power loss only once the directory entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename, readable as the user's umask says
    (safetensors creates its files 0600, which hides an export from the other users of a shared machine)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def has_training_state(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint dict can resume training (Lightning's loop state), not only initialise weights."""
    return "loops" in ckpt or "global_step" in ckpt


def newest_checkpoint(*folders: str | Path) -> tuple[Path | None, list[str]]:
    """The most recently written ``*.ckpt`` in ``folders`` that reads and holds training state (a truncated or
    foreign file is passed over), and the reasons the newer ones were passed over."""
    found = [p for folder in map(Path, folders) if folder.is_dir() for p in folder.glob("*.ckpt")]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = []
    for path in candidates:
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err}")
            continue
        if has_training_state(ckpt):
            return path, skipped
        skipped.append(f"{path.name}: no training state")
    return None, skipped
