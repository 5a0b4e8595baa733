"""SD3's text encoders in the layouts other tools read: diffusers' ``StableDiffusion3Pipeline`` folder
(``text_encoder`` and ``text_encoder_2`` = CLIPTextModelWithProjection, ``text_encoder_3`` = T5EncoderModel) and
SD3's single files (``text_encoders.clip_l.transformer.*``, ``.clip_g.``, ``.t5xxl.``), both ways.

Plain torch: the encoders are read through their attributes (``towers``, ``t5``, ``pooled`` …). SD3 reads CLIP-L's
pooled output without a projection (Stability's reference code, ``return_projected_pooled=False``); its
Hugging Face form is a CLIPTextModelWithProjection whose projection is the identity, as diffusers builds it from
an SD3 single file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.conditioning.t5 import EMBED_TOKENS
from sdlight.convert import ConversionError, hf_to_open_clip
from sdlight.convert_sdxl import hf_text_model, tower_state

SD3_TEXT = "text_encoders."  # SD3's single files: one entry per text encoder, in Hugging Face names
CLIP_NAMES = ("clip_l", "clip_g")
T5_NAME = "t5xxl"
HF = "transformer."


def sd3_text_encoder(conditioner: nn.Module) -> nn.Module | None:
    """The conditioner's encoder when it is SD3's text conditioning: the only encoder, two pooled CLIP towers
    (CLIP-L, then bigG), with or without T5; else None."""
    encoder = getattr(conditioner, "single", None)
    towers = getattr(encoder, "towers", None)
    if towers is None or len(towers) != 2 or not all(t.pooled for t in towers):
        return None
    return encoder


def sd3_pipeline_parts(conditioner: nn.Module, backbone_config: Mapping[str, Any], scheduler: str) -> nn.Module:
    """The text encoder when the model is what ``StableDiffusion3Pipeline`` runs; otherwise a
    :class:`ConversionError` saying what differs. The pipeline feeds the transformer ``hidden_states[-2]`` of its
    two CLIP models side by side (penultimate, no final LayerNorm), zero-padded to T5's width, then T5's last
    hidden state; the two pooled outputs side by side as ``pooled_projections``; and steps a flow-matching
    scheduler."""
    encoder = sd3_text_encoder(conditioner)
    problems = []
    if encoder is None:
        problems.append("one condition encoder: two pooled CLIP towers (and T5)")
    else:
        if any(t.layer != "penultimate" or t.final_norm for t in encoder.towers):
            problems.append("per-token states of the penultimate layer without the final LayerNorm")
        if encoder.t5 is None:
            problems.append("a T5 tower (without one the pipeline feeds 256 zero tokens)")
        if backbone_config.get("context_dim") != encoder.context_dim or \
                backbone_config.get("pooled_dim") != encoder.vector_dim:
            problems.append("a transformer that reads the tokens and the pooled vector of these towers")
    if not scheduler.startswith("FlowMatch"):
        problems.append(f"a flow-matching scheduler (rectified flow; this model's: {scheduler})")
    if problems:
        raise ConversionError("StableDiffusion3Pipeline needs " + "; ".join(problems))
    return encoder


def hf_t5(t5: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The T5 tower's ``T5EncoderModel`` weights (the tied input embedding once, as T5's files hold it) and
    config."""
    weights = tower_state(t5)  # the tower's state dict holds the tied embedding once already
    config = {**t5.model.config.to_dict(), "architectures": ["T5EncoderModel"]}
    return weights, config


def _clip_to_ours(tower: nn.Module, sd: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """A Hugging Face CLIP text model's weights (``text_model.*``, ``text_projection.weight``) in the tower's keys."""
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
    projection = sd.pop("text_projection.weight", None)
    out = {"model." + k: v for k, v in hf_to_open_clip(sd).items()}
    if tower.project_pooled:
        if projection is None:
            raise ConversionError(f"{where} has no text_projection.weight; model.conditioning's tower projects its "
                                  "pooled output")
        out["model.text_projection"] = projection.T.contiguous()
    elif projection is not None and not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        raise ConversionError(f"{where}'s text_projection is not the identity; model.conditioning's tower reads its "
                              "pooled output unprojected (SD3's CLIP-L): set project_pooled: true for this file")
    return out


def sd3_text_to_ours(parts: Mapping[str, Mapping[str, Tensor]], encoder: nn.Module) -> dict[str, Tensor]:
    """Hugging Face weights by SD3 name (``clip_l``, ``clip_g``: CLIP text models; ``t5xxl``: a T5 encoder) in the
    encoder's own keys (``towers.N.model.*``, ``t5.model.*``)."""
    out: dict[str, Tensor] = {}
    for i, (name, tower) in enumerate(zip(CLIP_NAMES, encoder.towers)):
        if name in parts:
            out.update({f"towers.{i}.{k}": v for k, v in _clip_to_ours(tower, parts[name], name).items()})
    if T5_NAME in parts:
        if encoder.t5 is None:
            raise ConversionError("the file has T5 weights (t5xxl) but model.conditioning has no T5 tower: choose "
                                  "model/conditioning=sd3_text_t5")
        out.update({"t5.model." + k: v for k, v in parts[T5_NAME].items() if k != EMBED_TOKENS})
    return out


def sd3_single_file_text(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder as SD3's single files hold it: ``text_encoders.clip_l.transformer.text_model.*`` (no
    projection when unprojected, as SD3's), ``text_encoders.clip_g.transformer.{text_model.*, text_projection.
    weight}``, ``text_encoders.t5xxl.transformer.*``; tensors may share storage (cast them to save)."""
    out: dict[str, Tensor] = {}
    for name, tower in zip(CLIP_NAMES, encoder.towers):
        weights, _ = hf_text_model(tower)
        if not tower.project_pooled:  # SD3's files leave CLIP-L's out; readers take the identity
            del weights["text_projection.weight"]
        out.update({f"{SD3_TEXT}{name}.{HF}{k}": v for k, v in weights.items()})
    if encoder.t5 is not None:  # the input embedding under both its names, as SD3's files and diffusers' loader
        t5 = hf_t5(encoder.t5)[0]
        out.update({f"{SD3_TEXT}{T5_NAME}.{HF}{k}": v for k, v in {**t5, EMBED_TOKENS: t5["shared.weight"]}.items()})
    return out


def sd3_single_file_parts(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """An SD3 single file's text encoders by name, in Hugging Face keys; empty when the file has none."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(SD3_TEXT):
            name, rest = key[len(SD3_TEXT):].split(".", 1)
            if not rest.startswith(HF) or name not in (*CLIP_NAMES, T5_NAME):
                raise ConversionError(f"{key}: not one of SD3's text encoders ({', '.join((*CLIP_NAMES, T5_NAME))}"
                                      f" under .{HF})")
            parts.setdefault(name, {})[rest[len(HF):]] = value
    return parts


def model_index(scheduler: str, tokenizer_3: str, version: str) -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusion3Pipeline``."""
    clip = ["transformers", "CLIPTextModelWithProjection"]
    return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": version,
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler],
            "text_encoder": clip, "text_encoder_2": clip, "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", tokenizer_3], "image_encoder": [None, None],
            "feature_extractor": [None, None]}
