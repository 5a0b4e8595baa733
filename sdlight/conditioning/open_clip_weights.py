"""Pretrained open_clip text towers: finding their weights (an explicit file, the weights folder, the caches;
downloaded only online) and building a text-only model that loads them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from .text import quiet_open_clip

def load_open_clip_text_model(
    arch: str, pretrained: str | None, checkpoint_path: str | os.PathLike | None = None
) -> nn.Module:
    """Build ``arch`` without its visual tower and load pretrained text weights (located before building).

    With neither ``pretrained`` nor ``checkpoint_path`` the tower stays randomly initialised, for callers that
    load a whole model checkpoint holding its weights next.
    """
    from open_clip.model import convert_to_custom_text_state_dict

    from sdlight.weights import load_state_dict

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    if config.get("text_cfg", {}).get("hf_model_name"):
        raise ValueError(f"{arch} has a Hugging Face text tower; only open_clip's own text transformer is supported")
    if pretrained is None and checkpoint_path is None:
        # no pretrained weights asked for: the caller loads a full checkpoint that holds this tower's weights
        with quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=None)
        del model.visual
        return model
    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if tag.get("quick_gelu") and not config.get("quick_gelu"):
        # the weights were trained with QuickGELU: under GELU every context would silently differ
        raise ValueError(f"arch={arch} with pretrained={pretrained}: these weights need QuickGELU; use "
                         f"arch={arch}-quickgelu (same weights and tokenizer)")
    # locate the file first, so that a missing file fails fast, before a large model is initialised
    path = find_open_clip_weights(arch, pretrained, checkpoint_path)
    state = load_state_dict(path)
    with quiet_open_clip():
        model = open_clip.create_model(arch, pretrained=None)
    del model.visual
    state = text_state_dict(state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match the {arch} text tower: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def text_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Unwrap training checkpoints (``state_dict``, DDP ``module.``, CompVis ``cond_stage_model.model.``).

    The visual tower's weights are dropped: only the text tower is built.
    """
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = "cond_stage_model.model."
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def find_open_clip_weights(arch: str, pretrained: str | None, checkpoint_path: str | os.PathLike | None = None) -> Path:
    """Locate the weights file: explicit path, open_clip's own cache, else ``sdlight.weights.resolve_weights``.

    Never waits on the network when offline: the open_clip cache lookup is local, and ``resolve_weights`` raises
    ``WeightsNotFoundError`` at once, naming the file and every place searched.
    """
    from sdlight.weights import WeightsNotFoundError, resolve_weights

    if checkpoint_path is not None:
        return resolve_weights(Path(checkpoint_path).name, path=checkpoint_path)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"no open_clip release {pretrained!r} for {arch}; known: {tags}, or pass checkpoint_path")
    found, searched = _open_clip_cache_lookup(cfg)
    if found is not None:
        return found
    if cfg.get("hf_hub"):
        # "org/repo/" means the default file name, "org/repo/file.bin" a specific one
        repo_id, remote = os.path.split(cfg["hf_hub"])
        remote = remote or open_clip.constants.HF_WEIGHTS_NAME
        url = f"https://huggingface.co/{repo_id}/resolve/main/{remote}"
    else:
        url = cfg["url"]
        remote = url.rsplit("/", 1)[-1]
    try:
        return resolve_weights(f"open_clip-{arch}-{pretrained}{Path(remote).suffix}", url=url)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} Also searched open_clip's cache: {', '.join(searched)}.") from None


def _open_clip_cache_lookup(cfg: dict) -> tuple[Path | None, list[str]]:
    """A copy already downloaded by open_clip (HF hub cache or ``~/.cache/clip``); never touches the network."""
    searched: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, remote = os.path.split(cfg["hf_hub"])
        remote = remote or open_clip.constants.HF_WEIGHTS_NAME
        # open_clip prefers a safetensors twin of the published file when the repo has one
        names = [remote]
        if remote == open_clip.constants.HF_WEIGHTS_NAME:
            names.insert(0, open_clip.constants.HF_SAFE_WEIGHTS_NAME)
        elif remote.endswith((".bin", ".pth")):
            names.insert(0, remote.rsplit(".", 1)[0] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found), searched
            searched.append(f"hf://{repo_id}/{name}")
    if cfg.get("url"):
        candidate = Path("~/.cache/clip").expanduser() / cfg["url"].rsplit("/", 1)[-1]
        if candidate.is_file():
            return candidate, searched
        searched.append(str(candidate))
    return None, searched


def build_text_transformer(arch: str, text_cfg: Mapping[str, Any] | None = None, embed_dim: int | None = None,
                           projection: bool = True) -> nn.Module:
    """open_clip's text transformer alone (no visual tower: ViT-bigG-14's would be 1.8 B parameters built for
    nothing), as ``arch`` configures it, with ``text_cfg`` / ``embed_dim`` overriding (tiny random towers);
    ``projection=False`` leaves out the pooled output's projection (towers read per token only)."""
    from open_clip.model import _build_text_tower

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    cfg = {**config["text_cfg"], **(text_cfg or {})}
    if cfg.get("hf_model_name"):
        raise ValueError(f"{arch} has a Hugging Face text tower; only open_clip's own text transformer is supported")
    if not projection:
        cfg["proj_type"] = "none"
    return _build_text_tower(embed_dim or config["embed_dim"], cfg, quick_gelu=bool(config.get("quick_gelu")))


def load_text_transformer(model: nn.Module, arch: str, pretrained: str | None,
                          checkpoint_path: str | os.PathLike | None = None) -> None:
    """Loads a released CLIP's text weights (found as :func:`find_open_clip_weights` finds them) into ``model``
    (from :func:`build_text_transformer`); the contrastive temperature, and the projection where the model has
    none, are left out. Every other key must fit."""
    from sdlight.weights import load_state_dict

    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if tag.get("quick_gelu") and not (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        raise ValueError(f"arch={arch} with pretrained={pretrained}: these weights need QuickGELU; use "
                         f"arch={arch}-quickgelu (same weights and tokenizer)")
    path = find_open_clip_weights(arch, pretrained, checkpoint_path)
    state = text_state_dict(load_state_dict(path))
    unused = {"logit_scale", "logit_bias", "attn_mask"} | ({"text_projection"} if model.text_projection is None
                                                           else set())
    state = {k: v for k, v in state.items() if k not in unused}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{path} does not match the {arch} text tower: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
