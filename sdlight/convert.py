"""Key maps between our CompVis-layout state dicts and the diffusers / Hugging Face layouts, and their configs.

One map per network, built from *our* module's keys, so the same table serves export (ours → theirs) and import
(theirs → ours, by inverting it): a key the table does not cover is reported, never guessed. Plain torch; nothing
here imports diffusers or transformers (the exported files are written without them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sdlight.errors import UsageError


class ConversionError(UsageError):
    """A network that has no counterpart in the target layout (or a file whose keys do not fit ours)."""


# ----------------------------------------------------------------------------------------------------- UNet
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2",
              "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
              "out.2": "conv_out", "middle_block.1": "mid_block.attentions.0"}


def _renamed(rest: str, table: Mapping[str, str]) -> str:
    """``rest`` with its leading module path replaced by ``table``'s entry (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def _unet_key(key: str, n: int) -> str | None:
    """The diffusers name of one of our UNet keys (``n`` res blocks per level), or None when it has none."""
    for old in sorted(UNET_FIXED, key=len, reverse=True):
        if key.startswith(old + "."):
            return UNET_FIXED[old] + key[len(old):]
    parts = key.split(".")
    if parts[0] == "middle_block" and parts[1] in ("0", "2"):
        return f"mid_block.resnets.{int(parts[1]) // 2}." + _renamed(".".join(parts[2:]), UNET_RESNET)
    if parts[0] not in ("input_blocks", "output_blocks") or len(parts) < 4:
        return None
    i, sub, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if parts[0] == "input_blocks":
        level, j = divmod(i - 1, n + 1)
        if j == n:  # the level's downsampler: a strided conv (a ResBlock with resblock_updown has no counterpart)
            return f"down_blocks.{level}.downsamplers.0.conv." + rest[3:] if rest.startswith("op.") else None
        if sub == 0:
            return f"down_blocks.{level}.resnets.{j}." + _renamed(rest, UNET_RESNET)
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    level, j = divmod(i, n + 1)
    if sub == 0:
        return f"up_blocks.{level}.resnets.{j}." + _renamed(rest, UNET_RESNET)
    if rest.startswith("conv."):
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None


def unet_key_map(keys: Iterable[str], config: Mapping[str, Any], text_time: bool = False) -> dict[str, str]:
    """``{our key: diffusers UNet2DConditionModel key}`` for the keys of a UNet built from ``config``. With
    ``text_time`` the vector input's ``label_emb`` is SD-XL's ``add_embedding`` instead of a ``class_embedding``."""
    check_unet_exportable(config)
    table, missing = {}, []
    for key in keys:
        theirs = _unet_key(key, int(config["num_res_blocks"]))
        if text_time and theirs is not None and theirs.startswith("class_embedding.linear_"):
            theirs = "add_embedding." + theirs[len("class_embedding."):]
        (missing.append(key) if theirs is None else table.__setitem__(key, theirs))
    if missing:
        raise ConversionError(f"UNet keys without a diffusers counterpart: {missing[:5]}")
    return table


def check_unet_exportable(config: Mapping[str, Any]) -> None:
    """Refuses the UNet options diffusers' UNet2DConditionModel cannot express."""
    problems = {
        "num_res_blocks": not isinstance(config["num_res_blocks"], int),
        "resblock_updown": config.get("resblock_updown", False),
        "use_spatial_transformer": not config.get("use_spatial_transformer", False),
        "num_classes": config.get("num_classes") == "continuous",
        "num_attention_blocks": config.get("num_attention_blocks") is not None,
        "disable_middle_self_attn": config.get("disable_middle_self_attn", False),
        "conv_resample": not config.get("conv_resample", True),
        "transformer_depth": not _int_or_ints(config.get("transformer_depth", 1), len(config["channel_mult"])),
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        found = ", ".join(f"{k}={config.get(k)}" for k in bad)
        raise ConversionError(f"this UNet has no diffusers counterpart: {found}"
                              " (UNet2DConditionModel needs a spatial transformer, int num_res_blocks, "
                              "transformer_depth an int or one per level, conv up/downsampling)")


def _int_or_ints(value: Any, levels: int) -> bool:
    """An int, or one int per level (SD-XL's [1, 2, 10]: diffusers' transformer_layers_per_block list, whose last
    entry is the middle block's depth, as ours)."""
    return isinstance(value, int) or (isinstance(value, Sequence) and len(value) == levels
                                      and all(isinstance(v, int) for v in value))


def diffusers_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of our UNet's constructor arguments."""
    check_unet_exportable(config)
    mc, mult = config["model_channels"], list(config["channel_mult"])
    attn = [2**level in config["attention_resolutions"] for level in range(len(mult))]
    if config.get("num_head_channels", -1) != -1:
        heads: Any = [mc * m // config["num_head_channels"] for m in mult]
    else:
        heads = config["num_heads"]
    num_classes, depth = config.get("num_classes"), config.get("transformer_depth", 1)
    out = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": config["image_size"], "in_channels": config["in_channels"],
        "out_channels": config["out_channels"], "block_out_channels": [mc * m for m in mult],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "layers_per_block": config["num_res_blocks"], "cross_attention_dim": config.get("context_dim"),
        # diffusers' "attention_head_dim" is the number of heads (a known misnomer kept for SD configs)
        "attention_head_dim": heads, "use_linear_projection": bool(config.get("use_linear_in_transformer")),
        "transformer_layers_per_block": depth if isinstance(depth, int) else [int(d) for d in depth],
        "resnet_time_scale_shift": "scale_shift" if config.get("use_scale_shift_norm") else "default",
        "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "upcast_attention": False,
    }
    if config.get("disable_self_attentions") is not None:
        out["only_cross_attention"] = list(config["disable_self_attentions"])
    if isinstance(num_classes, int):
        out["num_class_embeds"] = num_classes
    elif num_classes == "sequential":
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=config["adm_in_channels"])
    return out


# ------------------------------------------------------------------------------------------------------ VAE
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_key(key: str, levels: int) -> str | None:
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
        return None
    side, name = parts[0], parts[1]
    if name in ("conv_in", "conv_out"):
        return key
    if name == "norm_out":
        return f"{side}.conv_norm_out.{parts[2]}"
    if name == "mid":
        rest = ".".join(parts[3:])
        if parts[2] == "attn_1":
            return f"{side}.mid_block.attentions.0." + _renamed(rest, VAE_ATTENTION)
        if parts[2] in ("block_1", "block_2"):
            return f"{side}.mid_block.resnets.{int(parts[2][-1]) - 1}." + _renamed(rest, VAE_RESNET)
        return None
    if name not in ("down", "up") or len(parts) < 5:
        return None
    level = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])  # the decoder counts upward
    block = f"{side}.{name}_blocks.{level}"
    kind, rest = parts[3], ".".join(parts[5:])
    if kind in ("downsample", "upsample"):
        return f"{block}.{kind}rs.0.{'.'.join(parts[4:])}"
    if kind == "block":
        return f"{block}.resnets.{parts[4]}." + _renamed(rest, VAE_RESNET)
    if kind == "attn":
        return f"{block}.attentions.{parts[4]}." + _renamed(rest, VAE_ATTENTION)
    return None


def vae_key_map(keys: Iterable[str], levels: int) -> dict[str, str]:
    """``{our key: diffusers AutoencoderKL key}`` for an autoencoder with ``levels`` resolutions."""
    table, missing = {}, []
    for key in keys:
        theirs = _vae_key(key, levels)
        (missing.append(key) if theirs is None else table.__setitem__(key, theirs))
    if missing:
        raise ConversionError(f"autoencoder keys without a diffusers counterpart: {missing[:5]}")
    return table


def is_vae_attention_weight(key: str) -> bool:
    """Our 1x1-conv attention projections, which diffusers stores as linear weights."""
    parts = key.split(".")
    return parts[-1] == "weight" and parts[-2] in ("q", "k", "v", "proj_out") and (".attn" in key)


def diffusers_vae_config(config: Mapping[str, Any], scaling_factor: float, shift_factor: float = 0.0
                         ) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of our autoencoder's constructor arguments; a nonzero
    ``shift_factor`` (SD3 / Flux latents: (z - shift) * scale) is written as diffusers' ``shift_factor``, a zero one
    left out, as SD 1.x / 2.x / XL configs have it."""
    if config["embed_dim"] != config["z_channels"] or not config.get("double_z", True):
        raise ConversionError(f"diffusers' AutoencoderKL needs embed_dim == z_channels and double_z; this one has "
                              f"embed_dim={config['embed_dim']}, z_channels={config['z_channels']}")
    if config.get("attn_type", "vanilla") != "vanilla":
        raise ConversionError(f"attn_type={config['attn_type']} has no diffusers counterpart (use vanilla)")
    mult = list(config["ch_mult"])
    res = config["resolution"]
    attn = [res // 2**i in config.get("attn_resolutions", []) for i in range(len(mult))]
    out = {
        "_class_name": "AutoencoderKL", "in_channels": config.get("in_channels", 3),
        "out_channels": config.get("out_ch", 3), "block_out_channels": [config["ch"] * m for m in mult],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]],
        "layers_per_block": config["num_res_blocks"], "latent_channels": config["z_channels"],
        "sample_size": res, "scaling_factor": float(scaling_factor), "norm_num_groups": 32, "act_fn": "silu",
        "force_upcast": True,
    }
    for key in ("use_quant_conv", "use_post_quant_conv"):  # SD3's VAE has neither 1x1 conv
        if not config.get(key, True):
            out[key] = False
    if shift_factor:
        out["shift_factor"] = float(shift_factor)
    return out


# ---------------------------------------------------------------------------------------------- text towers
CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CLIP_FIXED = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
CLIP_UNUSED = ("text_projection", "logit_scale", "logit_bias")  # contrastive heads: not part of CLIPTextModel


def open_clip_to_hf(sd: Mapping[str, Tensor], layers: int, prefix: str = "text_model.") -> dict[str, Tensor]:
    """An open_clip text tower's state dict as a Hugging Face ``CLIPTextModel``'s, keeping the first ``layers``
    blocks (SD 2 keeps all but the last and reads the last hidden state: its penultimate layer)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in CLIP_FIXED:
            out[prefix + CLIP_FIXED[key]] = value
            continue
        if key.startswith(CLIP_UNUSED):
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"]:
            raise ConversionError(f"open_clip text key without a CLIPTextModel counterpart: {key}")
        if int(parts[2]) >= layers:
            continue
        block, rest = f"{prefix}encoder.layers.{parts[2]}.", ".".join(parts[3:])
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{block}self_attn.{name}_proj.{rest.rsplit('_', 1)[1]}"] = part.contiguous()
        else:
            out[block + _renamed(rest, CLIP_BLOCK)] = value
    return out


def hf_to_open_clip(sd: Mapping[str, Tensor], prefix: str = "text_model.") -> dict[str, Tensor]:
    """The inverse of :func:`open_clip_to_hf` (q/k/v joined into ``in_proj``); unknown keys raise."""
    fixed = {v: k for k, v in CLIP_FIXED.items()}
    block = {v: k for k, v in CLIP_BLOCK.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a constant buffer of transformers' CLIP
        if not key.startswith(prefix):
            raise ConversionError(f"not a CLIPTextModel key: {key}")
        key = key[len(prefix):]
        if key in fixed:
            out[fixed[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layers"]:
            raise ConversionError(f"CLIPTextModel key without an open_clip counterpart: {prefix}{key}")
        ours, rest = f"transformer.resblocks.{parts[2]}.", ".".join(parts[3:])
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            kind = rest.rsplit(".", 1)[1]
            qkv.setdefault(f"{ours}attn.in_proj_{kind}", {})[rest.split(".")[1][0]] = value
        else:
            out[ours + _renamed(rest, block)] = value
    for key, parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ConversionError(f"{key}: the file lacks {sorted(set('qkv') - set(parts))} of q/k/v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_clip_text_config(sd: Mapping[str, Tensor], heads: int, layers: int, quick_gelu: bool) -> dict[str, Any]:
    """The ``CLIPTextConfig`` of an open_clip text tower (its state dict, head count, kept layers, activation)."""
    width = sd["token_embedding.weight"].shape[1]
    projection = sd.get("text_projection")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": sd["token_embedding.weight"].shape[0], "hidden_size": width,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "projection_dim": projection.shape[1] if projection is not None else width,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "hidden_act": "quick_gelu" if quick_gelu else "gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------- applying maps
def apply_map(sd: Mapping[str, Tensor], table: Mapping[str, str], squeeze: bool = False) -> dict[str, Tensor]:
    """``sd`` renamed by ``table`` (ours → theirs); with ``squeeze`` the VAE's 1x1 attention convs become linear."""
    out = {}
    for key, theirs in table.items():
        value = sd[key]
        out[theirs] = value[:, :, 0, 0] if squeeze and value.ndim == 4 and is_vae_attention_weight(key) else value
    return out


def invert_map(theirs: Mapping[str, Tensor], table: Mapping[str, str], own: Mapping[str, Tensor]
               ) -> dict[str, Tensor]:
    """``theirs`` renamed back to our keys by ``table`` (ours → theirs), each shaped like ``own``'s tensor
    (linear ↔ 1x1 conv). Keys nothing of ours maps to keep their names, so a strict load reports them."""
    back = {v: k for k, v in table.items()}
    out = {}
    for key, value in theirs.items():
        ours = back.get(key, key)
        if ours in own and value.ndim == 2 and own[ours].ndim == 4 and own[ours].shape[2:] == (1, 1):
            value = value[:, :, None, None]
        out[ours] = value
    return out
