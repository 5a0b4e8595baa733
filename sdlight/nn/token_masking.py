"""Deferred patch masking (Sehwag et al., 2025, "Stretching Each Dollar: Diffusion Training from Scratch on a
Micro-Budget"), shared by the transformer backbones (`sdlight.nn.mmdit`, `sdlight.nn.dit`).

A light patch-mixer (``mixer_depth`` blocks of self-attention over all image tokens, after the patch embedding
and its positions) runs first; in training a random ``mask_ratio`` of the image tokens is then dropped and only
the kept ones go through the backbone's main blocks, which is what makes a step cheaper. The output is put back
on the full grid with the dropped patches zero, and the loss is the mean over the kept patches' elements
(`patch_elements`). The mixer lets a kept token carry what it saw of the dropped ones. At sampling nothing is
dropped; the mixer still runs.

    keep = draw_token_keep(draws, mask_ratio, batch, (h, w), device)   # the step's keyed draws, one row a sample
    out = backbone(x, t, context, token_keep=keep)                     # (B, C, H, W), dropped patches zero
    weight = patch_elements(keep, patch_size, out.shape)               # 1 on the kept patches' elements
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlight.errors import UsageError
from sdlight.nn.adaln import gated, modulate
from sdlight.nn.linear import Linear


def masking_options(mask_ratio: float, mixer_depth: int) -> tuple[float, int]:
    """The two options checked: ``mask_ratio`` in [0, 1), ``mixer_depth`` a whole number >= 0 (one line else)."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise UsageError(f"model.unet.mask_ratio={mask_ratio!r}: the share of image tokens dropped in training, a "
                         "number in [0, 1) (0: none)")
    if isinstance(mixer_depth, bool) or not isinstance(mixer_depth, int) or mixer_depth < 0:
        raise UsageError(f"model.unet.mixer_depth={mixer_depth!r}: the patch-mixer's number of blocks, a whole "
                         "number >= 0")
    return float(mask_ratio), mixer_depth


def refuse_token_masking(backbone: str, mask_ratio: float, mixer_depth: int) -> None:
    """One line for a backbone without image tokens (the UNet) given the options of one with them."""
    given = [f"model.unet.{k}={v}" for k, v in (("mask_ratio", mask_ratio), ("mixer_depth", mixer_depth)) if v]
    if given:
        raise UsageError(f"{', '.join(given)}: the {backbone} has no image tokens to mix or drop; patch masking "
                         "needs a transformer backbone (model/unet=mmdit_tiny, dit_tiny, ...)")


class MixerBlock(nn.Module):
    """DiT's block over the image tokens alone: adaLN-modulated self-attention and tanh-GELU MLP, each with a gated
    residual, modulated by the backbone's time (+ vector) embedding ``c`` (B, hidden). The same block serves both
    backbones: the mixer only needs to spread information between image tokens, not to read the text."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1 = Linear(hidden, int(hidden * mlp_ratio))
        self.fc2 = Linear(int(hidden * mlp_ratio), hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).split(x.shape[-1], dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in qkv)  # each (B, heads, N, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = gated(x, gate1, self.proj(attn))
        h = modulate(self.norm2(x), shift2, scale2)
        return gated(x, gate2, self.fc2(F.gelu(self.fc1(h), approximate="tanh")))


class PatchMixer(nn.ModuleList):
    """``depth`` :class:`MixerBlock` s in a row (state-dict keys ``patch_mixer.N.*``); no blocks: the identity."""

    def __init__(self, depth: int, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__([MixerBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self:
            x = block(x, c)
        return x

    def zero_modulations(self) -> None:
        """adaLN-Zero, as the backbones' own blocks: each block starts as the identity."""
        for block in self:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)


def draw_token_keep(draws: Any, mask_ratio: float, batch: int, grid: tuple[int, int],
                    device: torch.device | str | None = None) -> Tensor:
    """(B, h·w) bool keep-mask: each sample keeps the same number, ``h·w - round(mask_ratio · h·w)`` (at least
    one), chosen by one uniform draw per token through ``draws`` (`sdlight.diffusion.draw.Draws`; keyed draws make
    a sample's mask independent of its batch): the tokens with the smallest numbers are dropped."""
    tokens = grid[0] * grid[1]
    dropped = min(round(mask_ratio * tokens), tokens - 1)
    order = draws.uniform((batch, tokens), device).argsort(dim=1)
    keep = torch.ones(batch, tokens, dtype=torch.bool, device=order.device)
    return keep.scatter(1, order[:, :dropped], False)


def kept_indices(keep: Tensor) -> Tensor:
    """(B, n) positions of the kept tokens of a (B, N) keep-mask, ascending; every row must keep n tokens."""
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"token_keep keeps {counts.tolist()} tokens per sample: every sample must keep as many")
    return keep.nonzero()[:, 1].view(keep.shape[0], -1)  # row-major: each row's positions in order


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """(B, N, D) tokens → (B, n, D) at ``index`` (B, n)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor, tokens: int) -> Tensor:
    """(B, n, D) → (B, tokens, D): ``x`` at ``index``, zeros at the dropped positions."""
    full = x.new_zeros(x.shape[0], tokens, x.shape[-1])
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def drop_tokens(x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The kept tokens of ``x`` (B, N, D) and their positions; ``keep`` None: all of them, positions None."""
    if keep is None:
        return x, None
    if keep.dtype != torch.bool or tuple(keep.shape) != tuple(x.shape[:2]):
        raise ValueError(f"token_keep must be a (B, N) = {tuple(x.shape[:2])} bool mask of the image tokens, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    index = kept_indices(keep)
    return gather_tokens(x, index), index


def restore_tokens(x: Tensor, index: Tensor | None, tokens: int) -> Tensor:
    """`drop_tokens` undone on the output tokens: the dropped positions zero."""
    return x if index is None else scatter_tokens(x, index, tokens)


def patch_elements(keep: Tensor, patch_size: int, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """(B, C, H, W) float32 weight of an output of ``shape``: 1 on the elements of the kept patches (each
    patch_size² pixels × every channel), 0 on the dropped ones; tokens in row-major order of the patch grid."""
    batch, channels, height, width = shape
    p = patch_size
    mask = keep.view(batch, 1, height // p, width // p).float()
    return mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3).expand(batch, channels, height, width)
