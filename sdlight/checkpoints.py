"""Reading and writing checkpoints: our Lightning checkpoints, released CompVis / Stable Diffusion files.

Untrusted files are read with ``weights_only=True`` or safetensors: nothing in a checkpoint is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdlight.errors import UsageError

AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable, or not of the kind that was asked for."""


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a legacy pickle: what ``torch.load`` can read at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a ``.ckpt``/``.pt``/``.pth``/``.bin`` (weights only) or ``.safetensors`` file into a dict.

    Safetensors files come back as ``{"state_dict": tensors}`` so callers see one shape.
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
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save file nor .safetensors (give a "
                              ".ckpt written by sdlight.train, e.g. logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
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
                              "layout file of the same VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    if not sd:
        raise CheckpointError(f"{path} has no autoencoder weights (no encoder.*/decoder.* keys)")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path} does not fit this autoencoder: missing {_some(missing)}, unexpected {_some(unexpected)}, "
            f"shape mismatches (file vs model) {_some(mismatched, 3)}. "
            "Check that model/autoencoder matches the checkpoint's architecture.")
    model.load_state_dict(sd, strict=True)


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


def load_first_stage(ckpt: str | Path, autoencoder: nn.Module | None = None) -> nn.Module:
    """The frozen stage-1 model of a latent diffusion model.

    With ``autoencoder`` (an architecture built from a config, e.g. ``kl_f8``), ``ckpt`` may be any released
    VAE / SD checkpoint and is loaded into it; without, ``ckpt`` must be one of our stage-1 checkpoints, which
    carry their architecture.
    """
    if not Path(ckpt).is_file():
        raise CheckpointError(
            f"model.first_stage.ckpt={ckpt}: no such file. Stage 2 needs a trained stage 1: run its experiment first "
            "(e.g. `python -m sdlight.train +experiment=quickstart_vae hydra.run.dir=logs/quickstart/vae`) and point "
            "model.first_stage.ckpt at its checkpoints/last.ckpt (a +debug=fdr run writes no checkpoint)")
    if autoencoder is None:
        return load_autoencoder(ckpt)
    load_autoencoder_weights(autoencoder, ckpt)
    return autoencoder
