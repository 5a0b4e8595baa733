"""Reading and writing checkpoints: our Lightning checkpoints, released CompVis / Stable Diffusion files.

Untrusted files are read with ``weights_only=True`` or safetensors: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import pickle
from collections.abc import Mapping, Sequence
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


def to_plain(value: Any) -> Any:
    """Config containers (OmegaConf's included) as plain dicts / lists: what checkpoints hold, so that they load
    with ``weights_only=True``."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    return value


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


# ------------------------------------------------------------------------------------------------ EMA weights
LITEMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
# what the EMA of a latent diffusion stage averages: [UNet wrapper, training encoders] (model_ema.module.<i>.*),
# each under its CompVis prefix
EMA_PARTS = ("model.", "cond_stage_model.")


def ema_part_names(names: Sequence[str]) -> dict[str, str]:
    """The EMA module's keys (``<i>.rest``, i an index of EMA_PARTS) to their CompVis names."""
    out = {}
    for name in names:
        index, rest = name.split(".", 1)
        out[name] = EMA_PARTS[int(index)] + rest
    return out


def ema_slot(name: str) -> str | None:
    """The EMA module's key (``model_ema.module.<i>.rest``) of a CompVis name; None outside EMA_PARTS."""
    index = next((i for i, p in enumerate(EMA_PARTS) if name.startswith(p)), None)
    return None if index is None else f"model_ema.module.{index}.{name[len(EMA_PARTS[index]):]}"


def under_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
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
        for i, prefix in enumerate(EMA_PARTS):
            raw.update({prefix + k: v for k, v in under_prefix(sd, f"model_ema.module.{i}.").items()})
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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                     ) -> None:
    """``safetensors.torch.save_file`` (with ``metadata``) through a temporary file and a rename, readable as the
    user's umask says (safetensors creates its files 0600, which hides an export from the other users)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def has_training_state(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint dict can resume training (Lightning's loop state), not only initialise weights."""
    return "loops" in ckpt or "global_step" in ckpt


def newest_checkpoint(*folders: str | Path, max_step: int | None = None) -> tuple[Path | None, list[str]]:
    """The most recently written ``*.ckpt`` in ``folders`` that reads and holds training state (a truncated or
    foreign file is passed over; with ``max_step``, one saved after that optimizer step too), and the reasons the
    newer ones were passed over."""
    found = [p for folder in map(Path, folders) if folder.is_dir() for p in folder.glob("*.ckpt")]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = []
    for path in candidates:
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err}")
            continue
        if not has_training_state(ckpt):
            skipped.append(f"{path.name}: no training state")
        elif max_step is not None and int(ckpt.get("global_step", 0)) > max_step:
            skipped.append(f"{path.name}: saved at step {ckpt.get('global_step')}, after step {max_step}")
        else:
            return path, skipped
    return None, skipped


# --------------------------------------------------------------------------- a latent diffusion model, rebuilt
MODEL_PARTS = ("unet", "schedule", "conditioning", "conditioners", "concat", "objective", "prediction_type",
               "loss_type", "loss_weighting", "snr_gamma", "image_size", "sampler", "guidance_scale")
_CONFIG_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")


def build_from_config(node: Any) -> Any:
    """A stored config node made into its object, as ``hydra.utils.instantiate`` would (``_target_``, nested
    nodes, ``_partial_``), without Hydra; only ``sdlight.*`` targets: a checkpoint's config names what to call,
    and nothing outside this package is called on a file's say-so."""
    if isinstance(node, Mapping):
        kwargs = {k: build_from_config(v) for k, v in node.items() if k not in _CONFIG_KEYS}
        target = node.get("_target_")
        if target is None:
            return kwargs
        if not str(target).startswith("sdlight."):
            raise CheckpointError(f"the stored config names {target}, which is not part of sdlight: not called")
        call = _import(str(target))
        return functools.partial(call, **kwargs) if node.get("_partial_") else call(**kwargs)
    if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        return [build_from_config(v) for v in node]
    return node


def _import(dotted: str) -> Any:
    """``pkg.module.Name`` or ``pkg.module.Class.method``."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise CheckpointError(f"cannot import {dotted}")


def latent_diffusion_config(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The stored ``model`` config of a latent diffusion checkpoint of ours (a one-line error for other files)."""
    config = (ckpt.get("sdlight") or {}).get("config", {}).get("model")
    if not config or not str(config.get("_target_", "")).endswith("LatentDiffusion"):
        kind = (config or {}).get("_target_", "no sdlight config")
        raise CheckpointError(f"{path} is not a latent diffusion checkpoint of sdlight ({kind}); sample from the "
                              "checkpoint of a `model=ldm` run (e.g. logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    return config


def load_latent_diffusion(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, str]:
    """The :class:`~sdlight.models.LatentDiffusionModel` of one of our latent diffusion checkpoints, rebuilt from its
    stored config and weights without Hydra or Lightning, with its EMA weights when ``use_ema`` and it has them;
    and which weights those are, in words. Every checkpoint written since the config was first stored loads."""
    from sdlight.models.latent_diffusion import build_latent_diffusion, with_objective
    from sdlight.nn.autoencoder import AutoencoderKL

    ckpt = read_checkpoint(path)
    config = latent_diffusion_config(ckpt, path)
    hparams = ckpt.get("hyper_parameters", {})
    parts = {k: copy.deepcopy(config[k]) for k in MODEL_PARTS if k in config}
    more = parts.get("conditioners") or {}  # by name in configs; a list works too
    for node in [parts.get("conditioning"), *(more.values() if isinstance(more, Mapping) else more)]:
        if node and "pretrained" in node:  # a pretrained tower (or towers): their weights are in this checkpoint too
            node.update(pretrained=None, **({"checkpoint_path": None} if "checkpoint_path" in node else {}))
    # the weights of every part are in this checkpoint: the first stage's architecture only
    built = build_from_config(parts)
    settings = hparams.get("objective_settings")  # the model's own: init_from may have replaced the config's
    if built.get("objective") is not None and not settings:
        settings = built["objective"].settings()
    if settings:  # also clears the DDPM keys another objective never used (named once, when the run was built)
        built = with_objective(built, settings)
    model = build_latent_diffusion(first_stage=AutoencoderKL(**hparams["first_stage_config"]), **built)
    sd, which = ema_swapped(state_dict_of(ckpt), use_ema)
    model.load_state_dict(sd, strict=True)
    posthoc = ckpt.get("posthoc_ema")
    if posthoc and use_ema:
        which = f"post-hoc EMA weights (sigma_rel {posthoc['sigma_rel']} at step {posthoc['step']})"
    return model, which
