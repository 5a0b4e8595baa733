"""Key maps between our transformer backbones and diffusers' models, and those models' configs: SD3's MMDiT (the
reference implementation's names) ↔ ``SD3Transformer2DModel``, PixArt-α's DiT ↔ ``PixArtTransformer2DModel``.

A map is a list of rules ``(our key, their keys, how)`` built from *our* module's keys, so one list serves export
and import: ``copy``; ``chunk`` (ours is theirs concatenated along dim 0: the fused q,k,v and k,v projections);
``swap`` (ours holds shift then scale, diffusers' ``AdaLayerNormContinuous`` scale then shift). The mappings are
those of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` and ``scripts/convert_pixart_alpha_to_
diffusers.py``, written out so that exporting needs no diffusers. Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.convert import ConversionError

Rule = tuple[str, tuple[str, ...], str]

# ------------------------------------------------------------------------------------------------ SD3 MMDiT
MMDIT_FIXED = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj": "pos_embed.proj",
               "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
               "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
               "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
               "context_embedder": "context_embedder", "final_layer.linear": "proj_out",
               "final_layer.adaLN_modulation.1": "norm_out.linear"}
QKV = ("to_q", "to_k", "to_v")
MMDIT_STREAMS = {  # (stream, our module) → diffusers' module(s) inside transformer_blocks.N
    "x_block": {"attn.qkv": tuple(f"attn.{n}" for n in QKV), "attn.proj": ("attn.to_out.0",),
                "attn.ln_q": ("attn.norm_q",), "attn.ln_k": ("attn.norm_k",),
                "attn2.qkv": tuple(f"attn2.{n}" for n in QKV), "attn2.proj": ("attn2.to_out.0",),
                "attn2.ln_q": ("attn2.norm_q",), "attn2.ln_k": ("attn2.norm_k",),
                "adaLN_modulation.1": ("norm1.linear",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",)},
    "context_block": {"attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                      "attn.proj": ("attn.to_add_out",), "attn.ln_q": ("attn.norm_added_q",),
                      "attn.ln_k": ("attn.norm_added_k",), "adaLN_modulation.1": ("norm1_context.linear",),
                      "mlp.fc1": ("ff_context.net.0.proj",), "mlp.fc2": ("ff_context.net.2",)},
}


def _rule(key: str, module: str, theirs: tuple[str, ...], how: str | None = None) -> Rule:
    """The rule for ``key`` = ``module`` + its parameter name (weight, bias or nothing for a buffer)."""
    kind = key[len(module):]
    names = tuple(t + kind for t in theirs)
    return key, names, how or ("chunk" if len(names) > 1 else "copy")


def mmdit_rules(keys: Iterable[str]) -> list[Rule]:
    """Rules for an MMDiT's state-dict keys. The last block's context stream is ``pre_only`` (a shift and scale
    only), stored by diffusers as an ``AdaLayerNormContinuous``: swapped halves, as the final layer's."""
    keys = list(keys)
    depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("joint_blocks."))
    rules, unknown = [], []
    for key in keys:
        module = key.rpartition(".")[0] if key != "pos_embed" else key
        if module in MMDIT_FIXED:
            rules.append(_rule(key, module, (MMDIT_FIXED[module],),
                               "swap" if module == "final_layer.adaLN_modulation.1" else None))
            continue
        parts = module.split(".", 3)
        table = MMDIT_STREAMS.get(parts[2]) if parts[0] == "joint_blocks" and len(parts) == 4 else None
        if table is None or parts[3] not in table:
            unknown.append(key)
            continue
        n, stream, inner = int(parts[1]), parts[2], parts[3]
        swap = stream == "context_block" and inner == "adaLN_modulation.1" and n == depth - 1
        rules.append(_rule(key, module, tuple(f"transformer_blocks.{n}.{t}" for t in table[inner]),
                           "swap" if swap else None))
    if unknown:
        raise ConversionError(f"MMDiT keys without an SD3Transformer2DModel counterpart: {unknown[:3]} (a patch "
                              "mixer, mixer_depth > 0, exists only in sdlight: export with format=single_file)")
    return rules


def sd3_transformer_config(config: Mapping[str, Any], hidden: int, sample_size: int) -> dict[str, Any]:
    """``SD3Transformer2DModel``'s config for an MMDiT built from ``config`` (its width ``hidden``), trained on
    ``sample_size``-wide latents. An MMDiT without a pooled input gets a 1-wide one whose embedder is zero."""
    _check_transformer(config, "SD3Transformer2DModel")
    heads = int(config["num_heads"] or config["depth"])
    pooled = config["pooled_dim"]
    return {"_class_name": "SD3Transformer2DModel", "sample_size": sample_size,
            "patch_size": config["patch_size"], "in_channels": config["in_channels"],
            "num_layers": config["depth"], "attention_head_dim": hidden // heads, "num_attention_heads": heads,
            "joint_attention_dim": config["context_dim"], "caption_projection_dim": hidden,
            "pooled_projection_dim": 1 if pooled is None else pooled,
            "out_channels": config["out_channels"] or config["in_channels"],
            "pos_embed_max_size": config["pos_embed_max_size"],
            "dual_attention_layers": sorted(config["dual_attention_layers"] or ()),
            "qk_norm": "rms_norm" if config["qk_norm"] == "rms" else None}


def zero_pooled_embedder(hidden: int) -> dict[str, Tensor]:
    """The text embedder diffusers' SD3 model always has, for an MMDiT without one: zero weights and biases, so it
    adds exactly nothing to the time embedding whatever pooled vector it is given."""
    names = ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")
    shapes = ((hidden, 1), (hidden, hidden))
    out = {}
    for name, shape in zip(names, shapes):
        out[f"{name}.weight"], out[f"{name}.bias"] = torch.zeros(shape), torch.zeros(shape[0])
    return out


# --------------------------------------------------------------------------------------------- PixArt-α DiT
PIXART_FIXED = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
                "y_embedder.y_proj.fc2": "caption_projection.linear_2",
                "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
                "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
                "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
                "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
                "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
                "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
                "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out",
                "final_layer.scale_shift_table": "scale_shift_table"}
PIXART_BLOCK = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": ("attn1.to_out.0",),
                "cross_attn.q_linear": ("attn2.to_q",), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
                "cross_attn.proj": ("attn2.to_out.0",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",),
                "scale_shift_table": ("scale_shift_table",)}
# fixed tables diffusers recomputes from its config (the position table) or has no use for (PixArt's null caption)
PIXART_NOT_EXPORTED = ("pos_embed", "y_embedder.y_embedding")


def pixart_rules(keys: Iterable[str]) -> list[Rule]:
    """Rules for a DiT's state-dict keys (the fixed tables in ``PIXART_NOT_EXPORTED`` have none)."""
    rules, unknown = [], []
    for key in keys:
        if key in PIXART_NOT_EXPORTED:
            continue
        module = key if key.endswith("scale_shift_table") else key.rpartition(".")[0]
        if module in PIXART_FIXED:
            rules.append(_rule(key, module, (PIXART_FIXED[module],)))
            continue
        parts = module.split(".", 2)
        if parts[0] != "blocks" or len(parts) < 3 or parts[2] not in PIXART_BLOCK:
            unknown.append(key)
            continue
        rules.append(_rule(key, module, tuple(f"transformer_blocks.{parts[1]}.{t}" for t in PIXART_BLOCK[parts[2]])))
    if unknown:
        raise ConversionError(f"DiT keys without a PixArtTransformer2DModel counterpart: {unknown[:3]} (a patch "
                              "mixer, mixer_depth > 0, exists only in sdlight: export with format=single_file)")
    return rules


def pixart_transformer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``PixArtTransformer2DModel``'s config for a DiT built from ``config`` (a learned variance doubles the
    output channels, as PixArt's files have it)."""
    _check_transformer(config, "PixArtTransformer2DModel")
    out = config["out_channels"] or config["in_channels"]
    return {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": config["num_heads"],
            "attention_head_dim": config["hidden"] // config["num_heads"], "in_channels": config["in_channels"],
            "out_channels": out * (2 if config["learn_sigma"] else 1), "num_layers": config["depth"],
            "cross_attention_dim": config["hidden"], "attention_bias": True, "sample_size": config["input_size"],
            "patch_size": config["patch_size"], "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "interpolation_scale": config["pe_interpolation"],
            "use_additional_conditions": bool(config["use_additional_conditions"]),
            "caption_channels": config["context_dim"]}


def _check_transformer(config: Mapping[str, Any], target: str) -> None:
    if float(config.get("mlp_ratio", 4.0)) != 4.0:
        raise ConversionError(f"mlp_ratio={config['mlp_ratio']}: {target} has 4x MLPs only")
    if int(config.get("mixer_depth") or 0):
        raise ConversionError(f"mixer_depth={config['mixer_depth']}: {target} has no patch mixer (sdlight's "
                              "deferred masking); export with format=single_file")


# ------------------------------------------------------------------------------------------- applying rules
def to_diffusers(sd: Mapping[str, Tensor], rules: Iterable[Rule]) -> dict[str, Tensor]:
    """``sd`` (ours) in diffusers' keys."""
    out = {}
    for ours, theirs, how in rules:
        value = sd[ours]
        if how == "swap":
            value = torch.cat(value.chunk(2)[::-1])
        pieces = value.chunk(len(theirs)) if how == "chunk" else (value,)
        out.update(zip(theirs, pieces))
    return out


def from_diffusers(theirs: Mapping[str, Tensor], rules: Iterable[Rule], own: Mapping[str, Tensor]
                   ) -> dict[str, Tensor]:
    """``theirs`` in our keys. Our keys no rule covers (fixed tables diffusers recomputes) keep ``own``'s values;
    their keys no rule takes keep their names, and a rule whose keys are absent is left out, so a strict load
    reports both."""
    theirs, out = dict(theirs), {}
    covered = set()
    for ours, names, how in rules:
        covered.add(ours)
        if not all(n in theirs for n in names):
            continue
        value = torch.cat([theirs.pop(n) for n in names]) if how == "chunk" else theirs.pop(names[0])
        out[ours] = torch.cat(value.chunk(2)[::-1]) if how == "swap" else value
    out.update({k: v for k, v in own.items() if k not in covered})
    out.update(theirs)
    return out


# ---------------------------------------------------------------------------------------------- by backbone
def diffusers_class(backbone: nn.Module) -> str | None:
    """The diffusers model class of a transformer backbone (None for any other backbone)."""
    from sdlight.nn.dit import DiT
    from sdlight.nn.mmdit import MMDiT

    return {MMDiT: "SD3Transformer2DModel", DiT: "PixArtTransformer2DModel"}.get(type(backbone))


def backbone_rules(backbone: nn.Module, keys: Iterable[str]) -> list[Rule]:
    """The rules of ``backbone``'s kind for ``keys``."""
    return mmdit_rules(keys) if diffusers_class(backbone) == "SD3Transformer2DModel" else pixart_rules(keys)


def diffusers_transformer(backbone: nn.Module, sample_size: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(weights, config) of ``backbone`` as its diffusers transformer, trained on ``sample_size``-wide latents;
    checked before anything is written."""
    name = diffusers_class(backbone)
    if name is None:
        raise ConversionError(f"format=diffusers: a {type(backbone).__name__} backbone has no diffusers "
                              "counterpart; export it with format=single_file")
    if name == "SD3Transformer2DModel":
        config = sd3_transformer_config(backbone.config, backbone.hidden, sample_size)
    else:
        config = pixart_transformer_config(backbone.config)
    sd = {k: v.detach() for k, v in backbone.state_dict().items()}
    weights = to_diffusers(sd, backbone_rules(backbone, sd))
    if name == "SD3Transformer2DModel" and backbone.pooled_dim is None:
        weights.update(zero_pooled_embedder(backbone.hidden))
    return weights, config


def transformer_from_diffusers(theirs: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """A diffusers transformer's weights in ``backbone``'s keys (the zero pooled embedder of an MMDiT without a
    pooled input dropped; one that is not zero would change the outputs, so it stays for the strict load to
    report)."""
    theirs = dict(theirs)
    if diffusers_class(backbone) == "SD3Transformer2DModel" and backbone.pooled_dim is None:
        pooled = [k for k in theirs if k.startswith("time_text_embed.text_embedder.")]
        if all(not theirs[k].any() for k in pooled):
            for k in pooled:
                del theirs[k]
    own = backbone.state_dict()
    return from_diffusers(theirs, backbone_rules(backbone, own), own)
