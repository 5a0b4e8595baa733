"""Caption encoders: a small transformer trained with the UNet, and a frozen pretrained open_clip text tower.

Both use open_clip's bundled CLIP BPE tokenizer (no download) and give per-token embeddings ``(B, L, D)`` for
cross-attention. The null condition is the empty caption, encoded like any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from sdlight.nn.linear import Linear

from .base import ConditionEncoder, as_text_list



@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs each lookup ("Parsing model identifier…", "Loaded built-in … config") on the root logger at
    INFO; under Hydra's logging those lines fill the terminal at every start. Hide INFO while it runs."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))
    try:
        yield
    finally:
        logging.disable(previous)


class ClipTokenizer:
    """open_clip's CLIP BPE tokenizer at a fixed length, returning ids and true lengths, warning once on truncation.

    Ids match ``open_clip.get_tokenizer(arch)(texts)`` exactly: ``<sot> bpe… <eot>`` then zero padding, cut to
    ``max_length`` with ``<eot>`` kept last. Lengths are returned because id 0 is a real token ("!"), so padding
    cannot be recognised from the ids alone. ``pad_with_eot`` pads with ``<eot>`` instead, as Hugging Face's
    ``CLIPTokenizer`` of openai/clip-vit-large-patch14 does (SD-XL's first tower): with a causal tower the padded
    positions' states, which the UNet attends to, depend on the padding id.
    """

    def __init__(self, arch: str = "ViT-B-32", max_length: int = 77, pad_with_eot: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <sot> and <eot>, got {max_length}")
        with quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(arch, context_length=max_length)
        if not isinstance(tokenizer, SimpleTokenizer):
            name = type(tokenizer).__name__
            raise ValueError(f"{arch} uses {name}; choose an arch with the bundled CLIP BPE tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.eot_token_id if pad_with_eot else 0
        self.vocab_size: int = tokenizer.vocab_size
        self.warned_truncation = False

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        n_cut = 0
        for i, text in enumerate(texts):
            seq = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
            if len(seq) > self.max_length:
                n_cut += 1
                seq = seq[: self.max_length - 1] + [tok.eot_token_id]
            ids[i, : len(seq)] = torch.tensor(seq)
            lengths[i] = len(seq)
        if n_cut and not self.warned_truncation:
            warnings.warn(
                f"{n_cut} of {len(texts)} captions exceed max_length={self.max_length} tokens and were truncated "
                "(further truncations are not reported)",
                stacklevel=3,
            )
            self.warned_truncation = True
        return ids, lengths


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, L, D)`` with a boolean mask (True = may attend)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.out_proj = Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(rearrange(x, "b h l d -> b l (h d)"))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block, CLIP layout (``ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(ConditionEncoder):
    """Captions → context; the null caption is the empty one."""

    input_key = "text"

    def describe(self) -> str:
        return "text"

    def check(self, values: Sequence[Any]) -> None:
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{bad[0]!r}: captions are strings")

    def prepare(self, values: str | Sequence[str], device: torch.device | str | None = None) -> list[str]:
        return as_text_list(values)

    def null_like(self, values: str | Sequence[str]) -> list[str]:
        return [""] * len(as_text_list(values))


class LearnedTextEncoder(TextEncoder):
    """A small text transformer trained from scratch together with the UNet.

    Attention is bidirectional by default: the UNet cross-attends to every token, so each token should describe
    the whole caption ("red" should know it is the circle that is red). CLIP's causal mask exists for pooling at
    ``<eot>`` in its contrastive loss, which this encoder does not have. Padding is masked as a key, so the
    embeddings of real tokens do not depend on how much padding follows. ``causal=True`` gives CLIP's masking.

    ``context_scale`` multiplies the output. The UNet's cross-attention keys and values scale with it, and at a
    short budget that decides what is learned: the part of a caption that moves few pixels (the position of a
    small shape) is picked up only when the context is large (BENCHMARKS.md, quickstart adherence probes).
    """

    def __init__(
        self,
        arch: str = "ViT-B-32",
        max_length: int = 32,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        context_scale: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not context_scale > 0:
            raise ValueError(f"context_scale must be > 0, got {context_scale}")
        self.tokenizer = ClipTokenizer(arch, max_length)
        self.context_scale = float(context_scale)
        self.max_length = max_length
        self.causal = causal
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(max_length, width))
        self.resblocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.proj = Linear(width, context_dim) if context_dim is not None and context_dim != width else None
        self.context_dim = context_dim if context_dim is not None else width
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        # CLIP's text-tower initialisation: residual projections scaled down with depth
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.zeros_(linear.bias)

    def attention_mask(self, lengths: Tensor, length: int) -> Tensor:
        """Boolean ``(B, 1, L, L)`` mask: keys past each caption's end are hidden, plus the future if causal."""
        pos = torch.arange(length, device=lengths.device)
        mask = (pos[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L) over keys
        if self.causal:
            mask = mask & (pos[None, :] <= pos[:, None])  # key j visible from query i iff j <= i
        return mask

    def encode_tokens(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Token ids ``(B, L)`` and caption lengths ``(B,)`` → context ``(B, L, context_dim)``."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = self.attention_mask(lengths, length)
        for block in self.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        x = self.proj(x) if self.proj is not None else x
        return x * self.context_scale if self.context_scale != 1.0 else x

    def forward(self, values: str | Sequence[str]) -> Tensor:
        tokens, lengths = self.tokenizer(as_text_list(values))
        device = self.token_embedding.weight.device
        return self.encode_tokens(tokens.to(device), lengths.to(device))


class OpenCLIPTextEncoder(TextEncoder):
    """Frozen open_clip text tower → per-token embeddings from its last or penultimate block, after ``ln_final``.

    Stable Diffusion 2.x uses ViT-H-14 (laion2b_s32b_b79k), penultimate layer, 77 tokens, context_dim 1024. The
    open_clip model is kept as ``self.model`` without its visual tower, so the state dict reads
    ``model.transformer.resblocks.…`` like CompVis ``FrozenOpenCLIPEmbedder``.

    Weights come from ``checkpoint_path`` when given, else from open_clip's Hugging Face cache when the release is
    already there, else through :func:`sdlight.weights.resolve_weights`. ``model=`` injects a built open_clip model.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        checkpoint_path: str | os.PathLike | None = None,
        layer: str = "penultimate",
        max_length: int = 77,
        model: nn.Module | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.layer = layer
        # weights first: a missing file is reported before anything else is built
        if model is None:
            from .open_clip_weights import load_open_clip_text_model

            model = load_open_clip_text_model(arch, pretrained, checkpoint_path)
        self.model = model
        self.tokenizer = ClipTokenizer(arch, max_length)
        self.max_length = max_length
        if hasattr(self.model, "visual"):
            del self.model.visual
        tower = self.tower
        if max_length > tower.positional_embedding.shape[0]:
            positions = tower.positional_embedding.shape[0]
            raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
        if self.tokenizer.vocab_size > tower.token_embedding.num_embeddings:
            raise ValueError("the tokenizer's vocabulary is larger than the model's token embedding")
        if layer == "penultimate" and len(tower.transformer.resblocks) < 2:
            raise ValueError("layer='penultimate' needs a text transformer with at least 2 blocks")
        self.context_dim = tower.transformer.width
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def tower(self) -> nn.Module:
        """The module holding ``token_embedding … ln_final`` (the CLIP itself, or ``.text`` for custom-text CLIPs).

        A property rather than an attribute, so the weights are not registered twice in the state dict.
        """
        return text_tower(self.model)

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: Lightning's model.train() must not switch it back
        return self

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids ``(B, L)`` → ``(B, L, width)`` from the chosen block, through ``ln_final``."""
        tower = self.tower
        length = tokens.shape[1]
        dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(dtype) + tower.positional_embedding[:length].to(dtype)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        blocks = list(tower.transformer.resblocks)
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return tower.ln_final(x)

    def forward(self, values: str | Sequence[str]) -> Tensor:
        tokens, _ = self.tokenizer(as_text_list(values))
        return self.encode_tokens(tokens.to(self.tower.token_embedding.weight.device))


def text_tower(model: nn.Module) -> nn.Module:
    """The part of an open_clip model that holds its own text transformer; HF text towers are refused."""
    tower = model.text if hasattr(model, "text") else model
    if not (hasattr(tower, "token_embedding") and hasattr(tower, "transformer") and hasattr(tower, "ln_final")):
        name = type(tower).__name__
        raise ValueError(f"{name} is not an open_clip text transformer (HF text towers are not supported)")
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise ValueError("text towers with a class token or padding mask (CoCa style) are not supported")
    return tower
