"""PixArt-α's DiT (Chen et al., 2023): a transformer over image patches with cross-attention to text tokens and
adaLN-single, in plain torch.

Module names and ``state_dict()`` keys are those of the reference implementation (PixArt-alpha's
``diffusion/model/nets/PixArt.py`` / ``PixArtMS.py``), so released PixArt-α files load strict and diffusers'
``scripts/convert_pixart_alpha_to_diffusers.py`` maps ours to ``PixArtTransformer2DModel``.

adaLN-single: one ``t_block`` turns the time embedding into 6 · hidden modulation numbers (shift, scale, gate of
the self-attention; shift, scale, gate of the MLP) shared by every block, and each block adds its own learned
``scale_shift_table`` to them. The cross-attention reads the un-normalised tokens and has no gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlight.nn.adaln import gated, modulate
from sdlight.nn.linear import Linear
from sdlight.nn.mmdit import Embedder, Mlp, PatchEmbed, PatchTransformer, SelfAttention, attention, sincos_1d
from sdlight.nn.token_masking import PatchMixer, drop_tokens, masking_options, restore_tokens
from sdlight.nn.unet import timestep_embedding

SIZE_EMBED_DIM = 256  # the sinusoid width of the time and size embedders
MASKED = -10000.0  # the attention bias of a masked-out text token (diffusers' value: finite, never NaN)


def pixart_pos_embed(dim: int, height: int, width: int, base_size: int, pe_interpolation: float = 1.0) -> Tensor:
    """PixArt's fixed table (h·w, dim) for an h x w patch grid, rows outermost: each axis is stretched to span
    ``base_size`` positions (the training grid's side), divided by ``pe_interpolation``; the first half of each
    vector encodes the column, the second half the row. Positions in float32, as the reference computes them."""
    rows = torch.arange(height, dtype=torch.float32) / (height / base_size) / pe_interpolation
    cols = torch.arange(width, dtype=torch.float32) / (width / base_size) / pe_interpolation
    rows, cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


class CaptionEmbedder(nn.Module):
    """``y_proj``; with ``tokens``, also PixArt's ``y_embedding`` buffer (its training's null caption, (tokens,
    in_dim)) so that released files load strict. Nothing reads it here: the conditioner supplies the null caption."""

    def __init__(self, in_dim: int, hidden: int, tokens: int | None = None):
        super().__init__()
        self.y_proj = Mlp(in_dim, hidden, hidden)  # the text tokens to the model's width
        if tokens is not None:
            self.register_buffer("y_embedding", torch.randn(tokens, in_dim) / in_dim**0.5)

    def forward(self, context: Tensor) -> Tensor:
        return self.y_proj(context)


class CrossAttention(nn.Module):
    """``q_linear`` (image tokens), ``kv_linear`` (text tokens: keys, then values), ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        """bias: (B, 1, 1, L) added to the attention scores, or None."""
        q = self.q_linear(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # each (B, heads, L, head_dim)
                for t in self.kv_linear(context).split(self.num_heads * self.head_dim, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).flatten(2))


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by the shared adaLN-single vector plus this block's table; cross-attention
    between them, unmodulated."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, num_heads)
        self.cross_attn = CrossAttention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)
        self.use_checkpoint = False

    def forward(self, x: Tensor, context: Tensor | None, t0: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, t0, bias, use_reentrant=False)
        return self._forward(x, context, t0, bias)

    def _forward(self, x: Tensor, context: Tensor | None, t0: Tensor, bias: Tensor | None) -> Tensor:
        mods = (self.scale_shift_table[None] + t0.unflatten(1, (6, -1))).unbind(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = gated(x, gate_msa, self.attn.proj(attention(*self.attn.pre_attention(h))))
        if context is not None:
            x = x + self.cross_attn(x, context, bias)
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class T2IFinalLayer(nn.Module):
    """LayerNorm modulated by the time embedding plus a learned table (no SiLU, no linear), then the patch output."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(PatchTransformer):
    """PixArt-α's backbone: ``backbone(x, t, context=None, y=None)``.

    Arguments in the reference's vocabulary: ``depth`` blocks of width ``hidden`` with ``num_heads`` heads
    (PixArt-α: 28, 1152, 16); ``input_size`` the latent side it is trained at (512 px: 64; 1024 px: 128), whose
    patch grid is the position table's ``base_size``; ``pe_interpolation`` PixArt's divisor of the positions
    (256 / 512 / 1024 px: 0.5 / 1 / 2); ``context_dim`` the text tokens' width (T5-XXL: 4096); ``learn_sigma``
    (PixArt's ``pred_sigma``) makes the output layer emit a variance half after the ``out_channels`` of the
    prediction; ``use_additional_conditions`` adds PixArt-α 1024's resolution and aspect-ratio embedders;
    ``caption_tokens`` (PixArt: 120) keeps the reference's ``y_embedder.y_embedding`` buffer, unused here.

    ``t`` is the time input as the objective hands it (DDPM's timesteps 0..999, as PixArt trains). ``context``
    (B, L, context_dim) is cross-attended, with ``context_mask`` (B, L; true / 1 = keep) when given and every token
    when not (as PixArt without a mask); without a context the blocks skip their cross-attention. ``y`` is used
    only with ``use_additional_conditions``: (B, 3) numbers (height, width in pixels, aspect ratio h / w) or their
    (B, 768) sinusoidal embeddings (``SizeEmbedder(n=3, dim=256)`` routed as the vector). The output has
    ``out_channels`` channels; with ``learn_sigma`` the variance half follows when ``return_variance`` is set
    (sdlight's objectives train and sample the prediction half only, as PixArt's DPM-Solver sampling does).

    ``mixer_depth`` blocks of self-attention over the image tokens (``patch_mixer``, modulated by the time
    embedding) run before the blocks, and a training step drops ``mask_ratio`` of the image tokens after them
    (`sdlight.nn.token_masking`: the kept ones are given as ``token_keep``).
    """

    def __init__(
        self,
        input_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        depth: int = 28,
        hidden: int = 1152,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pe_interpolation: float = 1.0,
        learn_sigma: bool = False,
        use_additional_conditions: bool = False,
        caption_tokens: int | None = None,
        use_checkpoint: bool = False,
        mask_ratio: float = 0.0,
        mixer_depth: int = 0,
    ):
        super().__init__()
        # constructor arguments as plain values: checkpoints store them to rebuild the model
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.mask_ratio, mixer_depth = masking_options(mask_ratio, mixer_depth)
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} is not a multiple of num_heads={num_heads}")
        if hidden % 4:
            raise ValueError(f"hidden={hidden} must be a multiple of 4 for the 2-D sin-cos position table")
        if use_additional_conditions and hidden % 3:
            raise ValueError(f"hidden={hidden} must be a multiple of 3 for the resolution + aspect-ratio embedders")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.patch_size, self.in_channels, self.hidden = patch_size, in_channels, hidden
        self.out_channels = in_channels if out_channels is None else out_channels
        self.context_dim, self.learn_sigma = context_dim, learn_sigma
        self.base_size, self.pe_interpolation = input_size // patch_size, pe_interpolation
        self.use_additional_conditions = use_additional_conditions

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden)
        self.t_embedder = Embedder(SIZE_EMBED_DIM, hidden)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(hidden, 6 * hidden))
        if use_additional_conditions:
            self.csize_embedder = Embedder(SIZE_EMBED_DIM, hidden // 3)
            self.ar_embedder = Embedder(SIZE_EMBED_DIM, hidden // 3)
        self.y_embedder = CaptionEmbedder(context_dim, hidden, caption_tokens)
        # the table of the training grid, kept in the state dict as PixArt files keep it; other grids compute theirs
        table = pixart_pos_embed(hidden, self.base_size, self.base_size, self.base_size, pe_interpolation)
        self.register_buffer("pos_embed", table.unsqueeze(0))
        self.patch_mixer = PatchMixer(mixer_depth, hidden, num_heads, mlp_ratio)
        self.blocks = nn.ModuleList([PixArtBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = T2IFinalLayer(hidden, patch_size, self.out_channels * (2 if learn_sigma else 1))
        self.initialize_weights()
        self.set_gradient_checkpointing(use_checkpoint)

    def initialize_weights(self) -> None:
        """PixArt's initialisation for training from scratch: Xavier-uniform linears and patch conv, N(0, 0.02) time,
        size and caption embedders and t_block, zero cross-attention outputs and output layer (training starts from
        a zero prediction). The scale-shift tables keep their N(0, 1/hidden) draw."""
        self.xavier_init()
        embedders = [self.t_embedder] + ([self.csize_embedder, self.ar_embedder] if self.use_additional_conditions
                                         else [])
        normal = [e.mlp[i] for e in embedders for i in (0, 2)] + [self.t_block[1]]
        for layer in normal + [self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]:
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.cross_attn.proj for b in self.blocks] + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.patch_mixer.zero_modulations()

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        """(1, h·w, hidden) for an h x w patch grid: the stored table on the training grid, else PixArt-MS's."""
        if h == w == self.base_size:
            return self.pos_embed
        table = pixart_pos_embed(self.hidden, h, w, self.base_size, self.pe_interpolation)
        return table.unsqueeze(0).to(self.pos_embed.device)

    def size_embedding(self, y: Tensor | None, batch: int) -> Tensor:
        """PixArt-α 1024's (B, hidden) addition to the time embedding: resolution (2 numbers) and aspect ratio."""
        if y is None:
            raise ValueError("this DiT has use_additional_conditions: give y, (B, 3) = height, width, aspect ratio")
        if y.ndim != 2 or y.shape[0] != batch or y.shape[1] not in (3, 3 * SIZE_EMBED_DIM):
            raise ValueError(f"y must be (B, 3) numbers or their (B, {3 * SIZE_EMBED_DIM}) sinusoidal embeddings, got "
                             f"{tuple(y.shape)}")
        dtype = self.t_block[1].weight.dtype
        emb = y.reshape(-1, SIZE_EMBED_DIM) if y.shape[1] != 3 else timestep_embedding(y.reshape(-1), SIZE_EMBED_DIM)
        emb = emb.to(dtype).unflatten(0, (batch, 3))
        return torch.cat([self.csize_embedder(emb[:, :2]).flatten(1), self.ar_embedder(emb[:, 2])], dim=1)

    def unpatchify(self, x: Tensor, height: int, width: int) -> Tensor:
        """(B, h·w, p·p·C) → (B, C, h·p, w·p)."""
        p, c = self.patch_size, x.shape[-1] // self.patch_size**2
        x = x.reshape(x.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, height, width)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None, *,
                context_mask: Tensor | None = None, return_variance: bool = False,
                token_keep: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W); t: (B,) or scalar; context: (B, L, context_dim); y: see the class;
        token_keep: (B, h·w) bool, the image tokens the blocks see (the others' output patches are zero)."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"spatial size {(height, width)} must be divisible by {self.patch_size}")
        if return_variance and not self.learn_sigma:
            raise ValueError("return_variance needs learn_sigma=True")
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        dtype = self.t_block[1].weight.dtype
        pos = self.pos_embed_for(height // self.patch_size, width // self.patch_size)
        h = self.x_embedder(x.to(dtype)) + pos.to(dtype)
        c = self.t_embedder(timestep_embedding(t, SIZE_EMBED_DIM).to(dtype))
        if self.use_additional_conditions:
            c = c + self.size_embedding(y, batch)
        elif y is not None:
            raise ValueError("y given, but this DiT has no size embedders (use_additional_conditions=False)")
        t0 = self.t_block(c)
        tokens = h.shape[1]
        h, kept = drop_tokens(self.patch_mixer(h, c), token_keep)  # mixed after the positions: kept ones keep theirs
        bias = None
        if context is not None:
            context = self.y_embedder(context.to(dtype))
            if context_mask is not None:  # (B, L) keep-mask → an additive bias on the scores
                bias = torch.zeros(context_mask.shape, dtype=dtype, device=x.device)
                bias = bias.masked_fill(~context_mask.bool(), MASKED)[:, None, None, :]
        for block in self.blocks:
            h = block(h, context, t0, bias)
        out = self.unpatchify(restore_tokens(self.final_layer(h, c), kept, tokens), height, width).type(x.dtype)
        return out if return_variance or not self.learn_sigma else out[:, :self.out_channels]
