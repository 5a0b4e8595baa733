"""SD-XL's parts in the layouts other tools read: diffusers' ``StableDiffusionXLPipeline`` folder (a ``text_time``
UNet, ``text_encoder`` = CLIPTextModel, ``text_encoder_2`` = CLIPTextModelWithProjection) and Stability's
generative-models single files (``conditioner.embedders.N.*``), both ways.

Plain torch, as :mod:`sdlight.convert`: the condition encoders are read through their attributes (``towers``,
``pooled``, ``input_key`` …), and nothing here imports diffusers or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.convert import ConversionError, hf_clip_text_config, hf_to_open_clip, open_clip_to_hf

SIZE_KEYS = ("original_size", "crop_coords", "target_size")  # the order of diffusers' add_time_ids (SD-XL's)
SGM_CONDITIONER = "conditioner.embedders."
HF_TOWER = "transformer."  # generative-models' FrozenCLIPEmbedder: a Hugging Face CLIPTextModel
OPEN_CLIP_TOWER = "model."  # its FrozenOpenCLIPEmbedder2: open_clip names


def sdxl_text_encoder(conditioner: nn.Module) -> nn.Module | None:
    """The conditioner's SD-XL text encoder (the encoder holding several CLIP ``towers``), or None."""
    return next((e for e in conditioner.embedders if hasattr(e, "towers")), None)


def sdxl_pipeline_parts(conditioner: nn.Module, unet_config: Mapping[str, Any]) -> tuple[nn.Module, int]:
    """(the text encoder, the size embedders' width) when the model is what ``StableDiffusionXLPipeline`` runs;
    otherwise a :class:`ConversionError` saying what differs. The pipeline feeds the UNet the per-token
    ``hidden_states[-2]`` of its two text models side by side (penultimate, no final LayerNorm), the second one's
    projected pooled output, then original size, crop and target size (two numbers each) embedded at one width;
    its unconditional branch drops the text and keeps the sizes, as our guidance does only when the text is dropped
    in training and the sizes never are."""
    encoder = sdxl_text_encoder(conditioner)
    if encoder is None or conditioner.embedders[0] is not encoder:
        raise ConversionError("the first condition encoder is not an SDXLTextEncoder")
    towers, sizes = list(encoder.towers), list(conditioner.embedders[1:])
    problems = []
    if len(towers) != 2 or towers[0].pooled or not towers[1].pooled:
        problems.append("two text towers, the second alone pooled")
    if any(t.layer != "penultimate" or t.final_norm for t in towers):
        problems.append("per-token states of the penultimate layer without the final LayerNorm")
    keys = tuple(getattr(e, "input_key", None) for e in sizes)
    dims = {getattr(e, "dim", None) for e in sizes}
    if keys != SIZE_KEYS or any(getattr(e, "n", None) != 2 for e in sizes) or len(dims) != 1:
        problems.append(f"size embedders {', '.join(SIZE_KEYS)} in this order, two numbers each at one width "
                        f"(this model: {list(keys)})")
    elif encoder.drop_rate == 0 or any(e.drop_rate != 0 for e in sizes):
        problems.append("guidance against the null text with the sizes kept (text drop_rate > 0, sizes' 0)")
    dim = next(iter(dims)) if len(dims) == 1 else None
    if not problems and unet_config.get("adm_in_channels") != encoder.vector_dim + 6 * dim:
        problems.append("a UNet vector input of the pooled text and the six size numbers' embeddings")
    if problems:
        raise ConversionError("StableDiffusionXLPipeline needs " + "; ".join(problems))
    return encoder, dim


def text_time_unet_config(config: dict[str, Any], time_dim: int) -> dict[str, Any]:
    """A diffusers UNet config of ours (:func:`sdlight.convert.diffusers_unet_config`) with SD-XL's vector input:
    the ``text_time`` added embedding of the pooled text and the size numbers."""
    out = {k: v for k, v in config.items() if k != "class_embed_type"}  # keeps projection_class_embeddings_input_dim
    return {**out, "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim}


def tower_state(tower: nn.Module) -> dict[str, Tensor]:
    """A text tower's weights without the ``model.`` its module keeps them under, detached."""
    return {k.removeprefix("model."): v.detach() for k, v in tower.state_dict().items()}


def hf_text_model(tower: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One tower as Hugging Face weights and config, every block kept (the pipeline reads ``hidden_states[-2]``
    itself): CLIPTextModel, or CLIPTextModelWithProjection for a pooled tower (``text_projection.weight`` is
    open_clip's ``text_projection`` transposed: a Linear's weight; the identity for an unprojected one)."""
    from open_clip.transformer import QuickGELU

    sd = tower_state(tower)
    blocks = tower.model.transformer.resblocks
    config = hf_clip_text_config(sd, blocks[0].attn.num_heads, len(blocks), isinstance(blocks[0].mlp.gelu, QuickGELU))
    weights = open_clip_to_hf(sd, len(blocks))
    if tower.pooled:  # unprojected (SD3's CLIP-L): the identity, as diffusers builds it from SD3's files
        weights["text_projection.weight"] = sd["text_projection"].T.contiguous() if tower.project_pooled else \
            torch.eye(tower.width)
        config["architectures"] = ["CLIPTextModelWithProjection"]
    return weights, config


def sgm_conditioner(conditioner: nn.Module) -> dict[str, Tensor]:
    """The conditioner's weights as an SD-XL single file holds them: each text tower an embedder of its own
    (``conditioner.embedders.N.``, N counting towers, then the other encoders, as
    :func:`sdlight.pretrained.sgm_conditioner_weights` reads them back); a tower that is not pooled in Hugging Face
    names (``transformer.text_model.*``, generative-models' FrozenCLIPEmbedder), a pooled one in open_clip names
    (``model.*``, FrozenOpenCLIPEmbedder2)."""
    out: dict[str, Tensor] = {}
    slot = 0
    for encoder in conditioner.embedders:
        towers = getattr(encoder, "towers", None)
        for part in towers if towers is not None else [encoder]:
            prefix = f"{SGM_CONDITIONER}{slot}."
            if towers is not None and not part.pooled:
                layers = len(part.model.transformer.resblocks)
                out.update({prefix + HF_TOWER + k: v for k, v in open_clip_to_hf(tower_state(part), layers).items()})
            else:  # a pooled tower's own keys are open_clip's under model.
                out.update({prefix + k: v.detach() for k, v in part.state_dict().items()})
            slot += 1
    return out


def diffusers_text_to_sgm(text: Mapping[str, Tensor], text_2: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers SD-XL folder's ``text_encoder`` and ``text_encoder_2`` weights under SD-XL single-file names
    (``conditioner.embedders.0.transformer.text_model.*``, ``conditioner.embedders.1.model.*``), which
    :func:`sdlight.pretrained.sgm_conditioner_weights` loads."""
    def with_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:  # files written without "text_model." too
        return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}

    out = {f"{SGM_CONDITIONER}0.{HF_TOWER}{k}": v for k, v in with_prefix(text).items()}
    rest = {k: v for k, v in text_2.items() if k != "text_projection.weight"}
    second = hf_to_open_clip(with_prefix(rest))
    if "text_projection.weight" not in text_2:
        raise ConversionError("text_encoder_2 has no text_projection.weight: SD-XL's second text model is a "
                              "CLIPTextModelWithProjection")
    second["text_projection"] = text_2["text_projection.weight"].T.contiguous()
    out.update({f"{SGM_CONDITIONER}1.{OPEN_CLIP_TOWER}{k}": v for k, v in second.items()})
    return out


def model_index(scheduler: str, force_zeros: bool, version: str) -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusionXLPipeline``. ``force_zeros``: the unconditional branch of
    guidance without a negative prompt is all zeros (SD-XL's null condition) rather than the empty caption."""
    return {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": version,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "force_zeros_for_empty_prompt": bool(force_zeros)}


def is_text_time(unet_config: Mapping[str, Any]) -> bool:
    """Whether a diffusers UNet config takes SD-XL's added text and size embedding (our ``label_emb``)."""
    return unet_config.get("addition_embed_type") == "text_time"

