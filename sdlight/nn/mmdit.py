"""SD3's MMDiT (Esser et al., 2024): a transformer over image patches and text tokens in plain torch.

Module names and ``state_dict()`` keys are those of Stability's reference implementation (``mmditx.py``), so the
``model.diffusion_model.*`` weights of SD3 / SD3.5 single files load strict, and diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` maps ours to ``SD3Transformer2DModel``.

Each joint block holds a ``context_block`` (text tokens) and an ``x_block`` (image tokens) with their own weights
and adaLN modulation from the time + pooled-text vector; the two streams meet in one attention over the
concatenated tokens. The last block's context stream is ``pre_only``: its output is never read, so it has no
output projection and no MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlight.nn.adaln import gated, modulate
from sdlight.nn.linear import Linear
from sdlight.nn.token_masking import PatchMixer, drop_tokens, masking_options, restore_tokens
from sdlight.nn.unet import timestep_embedding

QKV = tuple[Tensor, Tensor, Tensor]


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions → (N, dim): sines then cosines at frequencies 10000^(-i / (dim/2)) (MAE / DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed(dim: int, grid_size: int, scaling_factor: float | None = None) -> Tensor:
    """The fixed 2-D table (grid_size², dim), rows of the grid outermost. As in the reference (and MAE), the first
    half of each vector encodes the column, the second half the row."""
    coords = torch.arange(grid_size, dtype=torch.float64) / (scaling_factor or 1.0)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return table.float()


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, L, H, D) each → (B, L, H·D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class Mlp(nn.Module):
    """``fc1``, tanh GELU, ``fc2`` (back to ``dim``, or to ``out_dim``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Embedder(nn.Module):
    """``mlp.{0,2}``: Linear, SiLU, Linear (the reference's TimestepEmbedder / VectorEmbedder)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """``proj``: a patch_size-strided conv, (B, C, H, W) → (B, H/p · W/p, hidden)."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """The qkv projection (with per-head ``ln_q`` / ``ln_k`` for SD3.5's qk_norm) and the output ``proj``; the
    attention itself runs in the joint block, over both streams' tokens."""

    def __init__(self, dim: int, num_heads: int, pre_only: bool = False, qk_norm: str | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.ln_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        elif qk_norm is None:
            self.ln_q = self.ln_k = nn.Identity()
        else:
            raise ValueError(f"qk_norm must be null or 'rms', got {qk_norm!r}")

    def pre_attention(self, x: Tensor) -> QKV:
        # split, not unflatten + unbind: the backward of a split is one cat into the fused gradient, cheaper on the
        # CPU than the stack an unbind needs
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim))
                   for t in self.qkv(x).split(self.num_heads * self.head_dim, dim=-1))
        return self.ln_q(q), self.ln_k(k), v


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: adaLN-modulated attention input, then the gated residual updates.

    Modulation chunks: shift, scale, gate of the attention; shift, scale, gate of the MLP; for SD3.5's dual
    attention (``attn2``: a self-attention over this stream alone) shift, scale, gate of it; ``pre_only``: the
    attention's shift and scale only."""

    def __init__(self, hidden: int, num_heads: int, pre_only: bool = False, qk_norm: str | None = None,
                 dual_attention: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        if dual_attention and pre_only:
            raise ValueError("a pre_only block has no dual attention")
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, num_heads, pre_only, qk_norm)
        self.attn2 = SelfAttention(hidden, num_heads, False, qk_norm) if dual_attention else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.num_mods = 9 if dual_attention else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, self.num_mods * hidden))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[QKV, tuple]:
        """The joint attention's q, k, v of this stream, and what `post_attention` needs."""
        mods = self.adaLN_modulation(c).chunk(self.num_mods, dim=1)
        h = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(h, mods[0], mods[1]))
        # the dual attention reads the same normalised tokens with its own shift and scale
        h2 = modulate(h, mods[6], mods[7]) if self.attn2 is not None else None
        return qkv, (x, mods, h2)

    def post_attention(self, attn: Tensor, state: tuple) -> Tensor:
        x, mods, h2 = state
        x = gated(x, mods[2], self.attn.proj(attn))
        if self.attn2 is not None:
            x = gated(x, mods[8], self.attn2.proj(attention(*self.attn2.pre_attention(h2))))
        return gated(x, mods[5], self.mlp(modulate(self.norm2(x), mods[3], mods[4])))


class JointBlock(nn.Module):
    """Both streams through one attention over [context tokens; image tokens]."""

    def __init__(self, hidden: int, num_heads: int, pre_only: bool = False, qk_norm: str | None = None,
                 dual_attention: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        self.context_block = DismantledBlock(hidden, num_heads, pre_only, qk_norm, mlp_ratio=mlp_ratio)
        self.x_block = DismantledBlock(hidden, num_heads, False, qk_norm, dual_attention, mlp_ratio)
        self.use_checkpoint = False

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, context, x, c, use_reentrant=False)
        return self._forward(context, x, c)

    def _forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        context_qkv, context_state = self.context_block.pre_attention(context, c)
        x_qkv, x_state = self.x_block.pre_attention(x, c)
        out = attention(*(torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv)))
        # split, not two slices: the backward is one cat, not two zero-filled copies added together
        out_context, out_x = out.split([context.shape[1], x.shape[1]], dim=1)
        if self.context_block.pre_only:
            context = None  # the last block: nothing reads the text tokens after it
        else:
            context = self.context_block.post_attention(out_context, context_state)
        return context, self.x_block.post_attention(out_x, x_state)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchTransformer(nn.Module):
    """What the transformer backbones (MMDiT, `sdlight.nn.dit.DiT`) share around their blocks: inputs cut into
    ``patch_size`` patches, and per-block gradient checkpointing over the module list named ``checkpointed``."""

    patch_size: int
    checkpointed = "blocks"

    @property
    def size_multiple(self) -> int:
        """What the input's height and width must be multiples of: the patch size."""
        return self.patch_size

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Each block recomputes its activations in the backward pass instead of keeping them: less memory for about
        a third more compute in training, the same gradients."""
        for block in getattr(self, self.checkpointed):
            block.use_checkpoint = enabled

    def xavier_init(self) -> None:
        """DiT's and PixArt's start for every linear layer and the patch conv: Xavier-uniform weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)


class MMDiT(PatchTransformer):
    """SD3's backbone: ``backbone(x, t, context=None, y=None)``.

    Arguments in the reference's vocabulary: ``depth`` joint blocks of width ``hidden`` (SD3: 64·depth) with
    ``num_heads`` heads (SD3: depth); ``context_dim`` the text tokens' width (SD3: 4096, T5-XXL and the CLIP
    tokens padded to it), ``pooled_dim`` the pooled text vector's (SD3: 2048, CLIP-L + bigG); ``pos_embed_max_size``
    the side of the position table, cropped at its centre to the input's patch grid (positions divided by
    ``pos_embed_scaling_factor`` when given); ``qk_norm`` null | "rms" (SD3.5); ``dual_attention_layers``
    the blocks whose image stream has SD3.5-medium's second self-attention. ``use_checkpoint`` recomputes each
    block's activations in the backward pass. ``mixer_depth`` blocks of self-attention over the image tokens
    (``patch_mixer``) run before the joint blocks, and a training step drops ``mask_ratio`` of the image tokens
    after them (`sdlight.nn.token_masking`: the kept ones are given as ``token_keep``).

    ``t`` is the time input as SD3 takes it (sigma · 1000 under rectified flow). Without a pooled vector
    (``y=None``: a conditioning that gives only tokens, as the learned text encoder) the vector embedder sees
    zeros; with ``pooled_dim=None`` there is none. Without a context the image tokens attend among themselves.
    """

    checkpointed = "joint_blocks"

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        depth: int = 24,
        num_heads: int | None = None,
        hidden: int | None = None,
        pos_embed_max_size: int = 192,
        context_dim: int = 4096,
        pooled_dim: int | None = 2048,
        out_channels: int | None = None,
        qk_norm: str | None = None,
        dual_attention_layers: Sequence[int] = (),
        pos_embed_scaling_factor: float | None = None,
        mlp_ratio: float = 4.0,
        use_checkpoint: bool = False,
        mask_ratio: float = 0.0,
        mixer_depth: int = 0,
    ):
        super().__init__()
        # constructor arguments as plain values: checkpoints store them to rebuild the model
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()
                       if k not in ("self", "__class__")}
        self.mask_ratio, mixer_depth = masking_options(mask_ratio, mixer_depth)
        num_heads = depth if num_heads is None else num_heads
        hidden = 64 * depth if hidden is None else hidden
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} is not a multiple of num_heads={num_heads}")
        if hidden % 4:
            raise ValueError(f"hidden={hidden} must be a multiple of 4 for the 2-D sin-cos position table")
        dual = sorted(set(dual_attention_layers))
        if dual and not 0 <= dual[0] <= dual[-1] < depth - 1:
            raise ValueError(f"dual_attention_layers {dual}: blocks 0..{depth - 2} (the last one is pre_only)")
        self.patch_size, self.in_channels, self.hidden = patch_size, in_channels, hidden
        self.out_channels = in_channels if out_channels is None else out_channels
        self.context_dim, self.pooled_dim, self.pos_embed_max_size = context_dim, pooled_dim, pos_embed_max_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden)
        self.t_embedder = Embedder(256, hidden)
        if pooled_dim is not None:
            self.y_embedder = Embedder(pooled_dim, hidden)
        self.context_embedder = Linear(context_dim, hidden)
        # fixed, but kept in the state dict as SD3 files keep it
        table = sincos_pos_embed(hidden, pos_embed_max_size, pos_embed_scaling_factor)
        self.register_buffer("pos_embed", table.unsqueeze(0))
        self.patch_mixer = PatchMixer(mixer_depth, hidden, num_heads, mlp_ratio)
        self.joint_blocks = nn.ModuleList([
            JointBlock(hidden, num_heads, i == depth - 1, qk_norm, i in dual, mlp_ratio) for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()
        self.set_gradient_checkpointing(use_checkpoint)

    def initialize_weights(self) -> None:
        """DiT's initialisation for training from scratch: Xavier-uniform linears and patch conv, N(0, 0.02) time
        embedder, and adaLN-Zero: zero modulations and output layer, so every block starts as the identity."""
        self.xavier_init()
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        modulations = [b.adaLN_modulation[-1] for blk in self.joint_blocks for b in (blk.context_block, blk.x_block)]
        for layer in modulations + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.patch_mixer.zero_modulations()

    def cropped_pos_embed(self, height: int, width: int) -> Tensor:
        """(1, h·w, hidden): the centre h x w of the table for a grid of h x w patches (SD3's crop)."""
        h, w, side = height // self.patch_size, width // self.patch_size, self.pos_embed_max_size
        if h > side or w > side:
            raise ValueError(f"a {h}x{w} patch grid is larger than the {side}x{side} position table "
                             "(pos_embed_max_size)")
        top, left = (side - h) // 2, (side - w) // 2
        table = self.pos_embed.unflatten(1, (side, side))[:, top:top + h, left:left + w]
        return table.flatten(1, 2)

    def unpatchify(self, x: Tensor, height: int, width: int) -> Tensor:
        """(B, h·w, p·p·C) → (B, C, h·p, w·p)."""
        p = self.patch_size
        x = x.reshape(x.shape[0], height // p, width // p, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, height, width)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None, *,
                token_keep: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W); t: (B,) or scalar; context: (B, L, context_dim); y: (B, pooled_dim);
        token_keep: (B, h·w) bool, the image tokens the joint blocks see (the others' output patches are zero)."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"spatial size {(height, width)} must be divisible by {self.patch_size}")
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        dtype = self.context_embedder.weight.dtype
        h = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(height, width).to(dtype)
        c = self.t_embedder(timestep_embedding(t, 256).to(dtype))
        if self.pooled_dim is not None:
            y = x.new_zeros(batch, self.pooled_dim) if y is None else y
            if y.ndim != 2 or y.shape[1] != self.pooled_dim:
                raise ValueError(f"y must be (B, pooled_dim={self.pooled_dim}) vectors, got {tuple(y.shape)}")
            c = c + self.y_embedder(y.to(dtype))
        elif y is not None:
            raise ValueError("y given, but this MMDiT has no vector embedder (pooled_dim=None)")
        tokens = h.shape[1]
        h, kept = drop_tokens(self.patch_mixer(h, c), token_keep)  # mixed after the positions: kept ones keep theirs
        if context is None:  # no text tokens: an empty sequence
            context = x.new_zeros(batch, 0, self.context_dim)
        ctx = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            ctx, h = block(ctx, h, c)
        out = restore_tokens(self.final_layer(h, c), kept, tokens)
        return self.unpatchify(out, height, width).type(x.dtype)
