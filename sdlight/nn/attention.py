"""Spatial transformer with cross-attention, as in CompVis `ldm/modules/attention.py`.

Module and parameter names follow the CompVis code so that released Stable Diffusion UNet weights load strict:
`SpatialTransformer.{norm, proj_in, transformer_blocks.N, proj_out}`, `BasicTransformerBlock.{attn1, attn2, ff,
norm1, norm2, norm3}`, `CrossAttention.{to_q, to_k, to_v, to_out.0}`, `FeedForward.net.{0.proj, 2}`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlight.nn.linear import Linear

AttentionHook = Callable[["CrossAttention", Tensor], None]


class CrossAttention(nn.Module):
    """Multi-head attention from `query_dim` tokens to `context_dim` tokens (self-attention when context is None).

    Set `attention_hook` to observe the attention probabilities (e.g. for cross-attention heat maps): the module then
    computes softmax(QK^T / sqrt(d)) explicitly, in float32, with shape (batch * heads, Lq, Lk) and calls
    `attention_hook(self, probs)` before applying it to V. Otherwise it runs the fused
    `scaled_dot_product_attention` kernel.
    """

    attention_hook: AttentionHook | None = None
    # {id(context): (context, version, k, v)} inside `cached_context_projections`, else None
    _kv_cache: dict[int, tuple[Tensor, int, Tensor, Tensor]] | None = None

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        # A module built with a context dimension attends to the conditioning sequence.
        self.is_cross_attention = context_dim is not None
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, Lq, query_dim); context: (B, Lk, context_dim) or None → (B, Lq, query_dim)."""
        q = self.to_q(x)
        k, v = self._project_context(x if context is None else context)
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads) for t in (q, k, v))
        if self.attention_hook is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Explicit path: softmax in float32 (as CompVis does under _ATTN_PRECISION="fp32") so the hook sees
            # probabilities that sum to one even under half-precision autocast.
            wide = torch.promote_types(q.dtype, torch.float32)
            sim = torch.einsum("bhid,bhjd->bhij", q.to(wide), k.to(wide)) * self.scale
            probs = sim.softmax(dim=-1)
            self.attention_hook(self, probs.flatten(0, 1))
            out = torch.einsum("bhij,bhjd->bhid", probs.to(v.dtype), v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))

    def _project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        cache = self._kv_cache
        # only cross-attentions get a cache (`cached_context_projections`)
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.to_k(context), self.to_v(context)
        hit = cache.get(id(context))
        # the cache holds the context itself, so an id seen here is that same, live tensor
        if hit is not None and hit[0] is context and hit[1] == context._version:
            return hit[2], hit[3]
        k, v = self.to_k(context), self.to_v(context)
        cache[id(context)] = (context, context._version, k, v)
        return k, v


@contextlib.contextmanager
def cached_context_projections(model: nn.Module) -> Iterator[None]:
    """Within the block, each cross-attention of ``model`` projects a given context tensor to K and V once.

    A sampler calls the UNet tens of times with the same context (the prompt's, or guidance's [null; prompt]
    batch): its K and V need not be recomputed at each step. Only without gradients; the weights must not
    change inside the block (a sampling loop). An in-place change of the context is seen (its version).
    """
    layers = [m for m in model.modules() if isinstance(m, CrossAttention) and m.is_cross_attention]
    outer = [layer.__dict__.get("_kv_cache") for layer in layers]  # a block inside another keeps the outer one
    for layer in layers:
        layer._kv_cache = {}
    try:
        yield
    finally:
        for layer, cache in zip(layers, outer):
            if cache is None:
                layer.__dict__.pop("_kv_cache", None)  # back to the class default: nothing kept, nothing pickled
            else:
                layer._kv_cache = cache


class GEGLU(nn.Module):
    """Gated GELU projection: x W_a * gelu(x W_b) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (or Linear+GELU) to `mult * dim`, dropout, Linear back."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True, dropout: float = 0.0
    ):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, gated feed-forward.

    With `disable_self_attn` the first attention also attends to the context (SD 2 x4 upscaler).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head,
            dropout=dropout,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token sequence.

    GroupNorm, project to `n_heads * d_head` (1x1 conv, or Linear after flattening when `use_linear` as in SD 2),
    `depth` transformer blocks, zero-initialised projection back, residual.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        # Zero init: a fresh block is the identity, so the UNet starts as its convolutional skeleton.
        if use_linear:
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim) or None → (B, C, H, W)."""
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
