"""KL-regularised autoencoder of latent diffusion (CompVis ``ldm.modules.diffusionmodules.model``).

Module and parameter names follow the CompVis code exactly, so the ``first_stage_model.*`` part of a released
Stable Diffusion checkpoint loads into :class:`AutoencoderKL` with ``strict=True``, and the constructor takes the
``ddconfig`` names of an SD yaml plus ``embed_dim``::

    vae = AutoencoderKL(**ddconfig, embed_dim=4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdlight.nn.distributions import DiagonalGaussianDistribution

ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, conv) x 2 with dropout before the second conv."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 conv_shortcut: bool = False):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        elif hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        # (b, c, h, w) -> (b, 1 head, h*w tokens, c); SDPA scales by c**-0.5 like the original bmm version.
        q, k, v = (t(h).reshape(b, 1, c, height * width).transpose(2, 3) for t in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """``vanilla`` and ``vanilla-xformers`` are the same math here (SDPA picks the fused kernel)."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
    return nn.Identity() if attn_type == "none" else AttnBlock(in_channels)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right and bottom only), as in CompVis."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Checkpointed(nn.Module):
    """Shared switch for activation checkpointing of the residual and attention blocks."""

    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)


def _mid_block(channels: int, dropout: float, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(channels, channels, dropout=dropout)
    return mid


class Encoder(_Checkpointed):
    """Image -> ``2 * z_channels`` (mean and logvar) or ``z_channels`` maps at ``1 / 2**(len(ch_mult)-1)`` size."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, in_channels: int, resolution: int,
                 z_channels: int, double_z: bool = True, attn_type: str = "vanilla"):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = _mid_block(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = self._run(block, h)
                if len(down.attn) > 0:
                    h = self._run(down.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Checkpointed):
    """``z_channels`` latent -> image; ``up`` is indexed by resolution level (``up.0`` is the full-size level)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resolution: int, z_channels: int,
                 give_pre_end: bool = False, tanh_out: bool = False, attn_type: str = "vanilla"):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.resolution, self.give_pre_end, self.tanh_out = resolution, give_pre_end, tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout, attn_type)

        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            up_levels.insert(0, up)  # built coarse-to-fine, stored fine-to-coarse to match checkpoint indices
        self.up = nn.ModuleList(up_levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = self._run(block, h)
                if len(up.attn) > 0:
                    h = self._run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: encoder -> ``quant_conv`` -> diagonal Gaussian -> ``post_quant_conv`` -> decoder.

    Arguments are the CompVis ``ddconfig`` names plus ``embed_dim`` (the latent channels seen by the UNet);
    ``use_quant_conv`` / ``use_post_quant_conv`` false drop the 1x1 convs, as SD3's and Flux's VAEs (diffusers' names).
    ``resolution`` only decides where ``attn_resolutions`` apply; inputs of any size divisible by
    :attr:`downsample_factor` work.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), z_channels: int = 4, double_z: bool = True,
                 resolution: int = 256, in_channels: int = 3, out_ch: int = 3, dropout: float = 0.0,
                 embed_dim: int = 4, attn_type: str = "vanilla", use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True):
        super().__init__()
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True: the encoder must predict a mean and a logvar")
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        # constructor arguments as plain values: checkpoints store them to rebuild the model
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), z_channels=z_channels, double_z=double_z,
                           resolution=resolution, in_channels=in_channels, out_ch=out_ch, dropout=dropout,
                           embed_dim=embed_dim, attn_type=attn_type)
        if not (use_quant_conv and use_post_quant_conv):  # SD3 / Flux VAEs; older configs keep their keys
            if embed_dim != z_channels:
                raise ValueError(f"without quant_conv / post_quant_conv the latents are the encoder's: embed_dim "
                                 f"({embed_dim}) must equal z_channels ({z_channels})")
            self.config.update(use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv)
        shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      dropout=dropout, resolution=resolution, z_channels=z_channels, attn_type=attn_type)
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **shared)
        self.decoder = Decoder(out_ch=out_ch, **shared)
        # None: no weights under that name (SD3's VAE has neither 1x1 conv)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1) if use_post_quant_conv else None
        self.embed_dim = embed_dim
        self._downsample_factor = 2 ** (len(ch_mult) - 1)

    @property
    def downsample_factor(self) -> int:
        return self._downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        h = self.encoder(x)
        return DiagonalGaussianDistribution(self.quant_conv(h) if self.quant_conv is not None else h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); the posterior sample's eps from ``generator``, or ``noise(shape)``."""
        posterior = self.encode(x)
        if not sample_posterior:
            z = posterior.mode()
        else:
            z = posterior.sample(generator, noise(tuple(posterior.mean.shape)) if noise is not None else None)
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        """Weight whose gradient norms balance reconstruction and GAN losses (adaptive discriminator weight)."""
        return self.decoder.conv_out.weight

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward: trades ~30% compute for much less memory at 256+ px."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
