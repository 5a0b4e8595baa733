"""The Stable Diffusion UNet: CompVis `ldm/modules/diffusionmodules/openaimodel.py` in plain torch.

Constructor arguments and `state_dict()` keys are those of CompVis `UNetModel`, so the `unet_config.params` of the
SD 1.x / 2.x yaml files map 1:1 and released `model.diffusion_model.*` weights load strict.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlight.nn.attention import SpatialTransformer
from sdlight.nn.linear import Linear
from sdlight.nn.token_masking import refuse_token_masking


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) → (B, dim), cos half first (CompVis order), frequencies max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (statistics overflow in fp16); float64 stays float64."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling when `use_conv` is False."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block modulated by the timestep embedding (added, or FiLM scale/shift after the second norm).

    `up`/`down` resample inside the block (BigGAN style, `resblock_updown`).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the activation and the conv, as in CompVis / BigGAN.
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels without conditioning (`use_spatial_transformer: false`, e.g. unconditional LDMs).

    `qkv` is a 1x1 conv1d; the legacy order splits channels per head as (q, k, v) blocks, the new order splits
    q, k, v first and heads second (`use_new_attention_order`).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels != -1 and channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        heads, ch = self.num_heads, c // self.num_heads
        if self.use_new_attention_order:
            q, k, v = (t.reshape(b * heads, ch, -1) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(h.transpose(1, 2).reshape(b, c, -1))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """Diffusion UNet with timestep embedding, optional class embedding and cross-attention to a context.

    Arguments are CompVis `UNetModel`'s. `attention_resolutions` are downsampling factors (1 = input resolution).
    Heads: `num_head_channels=-1` fixes the head count (`num_heads`, SD 1) and derives the head width, otherwise the
    head width is fixed and the count derived per level (SD 2). `context_dim=None` with the spatial transformer makes
    its second attention a self-attention (unconditional). `use_fp16` is accepted for config compatibility; run
    under autocast / Lightning precision instead. `transformer_depth` and `num_res_blocks` may be per-level lists.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        mask_ratio: float = 0.0,
        mixer_depth: int = 0,
    ):
        super().__init__()
        # the transformers' patch-masking options, taken only to refuse them in one line: a UNet has no tokens
        refuse_token_masking("UNet", mask_ratio, mixer_depth)
        # constructor arguments as plain values: checkpoints store them to rebuild the model
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()
                       if k not in ("self", "__class__", "mask_ratio", "mixer_depth")}
        if dims != 2:
            raise ValueError(f"only 2D UNets are supported, got dims={dims}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim needs use_spatial_transformer: the context would be ignored otherwise")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        channel_mult = list(channel_mult)
        levels = len(channel_mult)
        self.num_res_blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        depth = [transformer_depth] * levels if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(self.num_res_blocks) != levels or len(depth) != levels:
            raise ValueError("num_res_blocks and transformer_depth lists need one entry per channel_mult level")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.use_fp16 = use_fp16

        def attention(ch: int, disable_sa: bool, tdepth: int, block_heads: int) -> nn.Module:
            # Head arithmetic exactly as CompVis: num_head_channels wins and derives the head count;
            # `block_heads` (num_heads_upsample on the way up) only reaches the legacy AttentionBlock.
            if num_head_channels == -1:
                n_heads, dim_head = num_heads, ch // num_heads
            else:
                n_heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // n_heads if use_spatial_transformer else num_head_channels
            if not use_spatial_transformer:
                return AttentionBlock(ch, block_heads, dim_head, use_checkpoint, use_new_attention_order)
            return SpatialTransformer(
                ch, n_heads, dim_head, depth=tdepth, context_dim=context_dim,  # CompVis: no dropout here
                disable_self_attn=disable_sa, use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint,
            )

        def resblock(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, time_embed_dim, dropout, out_channels=out_ch, use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint, up=up, down=down,
            )

        def wants_attention(ds: int, level: int, index: int) -> bool:
            return ds in self.attention_resolutions and (
                num_attention_blocks is None or index < num_attention_blocks[level]
            )

        disabled = list(disable_self_attentions) if disable_self_attentions is not None else [False] * levels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            Linear(model_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError("num_classes='sequential' needs adm_in_channels")
                self.label_emb = nn.Sequential(
                    nn.Sequential(
                        Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                        Linear(time_embed_dim, time_embed_dim),
                    )
                )
            else:
                raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if wants_attention(ds, level, nr):
                    layers.append(attention(ch, disabled[level], depth[level], num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != levels - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch),
            attention(ch, disable_middle_self_attn, depth[-1], num_heads),
            resblock(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if wants_attention(ds, level, i):
                    layers.append(attention(ch, disabled[level], depth[level], num_heads_upsample))
                if level and i == self.num_res_blocks[level]:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    @property
    def size_multiple(self) -> int:
        """What the input's height and width must be multiples of: the UNet halves them once per level but the last."""
        return 2 ** (len(self.channel_mult) - 1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Each ResBlock, attention block and transformer block recomputes its activations in the backward pass
        instead of keeping them (``use_checkpoint`` for all of them): less memory for about a third more compute
        in training, the same gradients."""
        for module in self.modules():
            if isinstance(module, (ResBlock, AttentionBlock)):
                module.use_checkpoint = enabled
            elif hasattr(module, "checkpoint") and isinstance(module.checkpoint, bool):
                module.checkpoint = enabled  # BasicTransformerBlock

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,) or scalar, integer or continuous; context: (B, L, context_dim);
        y: (B,) class indices (or (B, adm_in_channels) vectors) when the model is class-conditional."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional (num_classes set)")
        factor = self.size_multiple
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} must be divisible by {factor}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch {y.shape[0]}, x has {x.shape[0]}")
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).type(x.dtype)
