"""SD-XL's and SD3's text conditioning: frozen CLIP text towers side by side, and SD3's T5 after them.

Each caption goes through every tower; their per-token states are joined along the width into the
cross-attention context (SD-XL: CLIP ViT-L/14 768 + OpenCLIP ViT-bigG/14 1280 = 2048), and the pooled, projected
``<eot>`` embedding of the towers that give one (SD-XL: bigG's, 1280) goes to the UNet's ``y``, beside the size
embeddings. As in Stability's generative-models (``FrozenCLIPEmbedder`` with ``layer: hidden, layer_idx: 11`` and
``FrozenOpenCLIPEmbedder2`` with ``legacy: False``), the per-token states are the penultimate block's output
*without* the final LayerNorm, while the pooled output is taken after the last block and ``ln_final``.

SD3 adds T5's tokens (``t5``: a :class:`~sdlight.conditioning.t5.T5Tower`): the CLIP towers' tokens, zero-padded
to T5's width, then T5's tokens, one sequence (SD3: 77 + 256 tokens of 4096), as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` and Stability's reference code join them.

The null condition is all zeros, context and vector (SD-XL's: generative-models zeroes dropped embeddings, and
diffusers' SD-XL pipeline samples against zeros, ``force_zeros_for_empty_prompt``); ``null_text: empty`` encodes the
empty caption instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import as_text_list
from .text import ClipTokenizer, TextEncoder, quiet_open_clip, text_tower

NULLS = ("zeros", "empty")


class CLIPTextTower(nn.Module):
    """One frozen open_clip text transformer read at ``layer`` (``last`` | ``penultimate``): per-token states
    ``(B, L, width)`` (through ``ln_final`` when ``final_norm``) and, with ``pooled``, the projected ``<eot>``
    embedding ``(B, embed_dim)``; ``project_pooled=False`` gives it unprojected, ``(B, width)`` (SD3's CLIP-L:
    Stability's reference code reads its pooled output without the projection, ``return_projected_pooled=False``).

    ``arch`` names open_clip's configuration and tokenizer; ``text_cfg`` / ``embed_dim`` override it (tiny random
    towers for tests and the CPU). Weights: ``checkpoint_path``, else the open_clip release ``pretrained`` (found
    as :func:`sdlight.conditioning.open_clip_weights.find_open_clip_weights` finds it); with neither, random, for
    a whole checkpoint that holds them. The transformer is ``self.model`` (open_clip names: ``model.transformer.
    resblocks.N…``); ``model=`` injects a built one.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-L-14-quickgelu", pretrained: str | None = None,
                 checkpoint_path: str | os.PathLike | None = None, layer: str = "penultimate",
                 final_norm: bool = False, pooled: bool = False, project_pooled: bool = True,
                 pad_with_eot: bool = False, max_length: int = 77, text_cfg: Mapping[str, Any] | None = None,
                 embed_dim: int | None = None, model: nn.Module | None = None) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        from .open_clip_weights import build_text_transformer, load_text_transformer

        if model is None:
            with quiet_open_clip():
                model = build_text_transformer(arch, dict(text_cfg or {}), embed_dim,
                                               projection=pooled and project_pooled)
            if pretrained is not None or checkpoint_path is not None:
                load_text_transformer(model, arch, pretrained, checkpoint_path)
        self.model = model
        tower = text_tower(model)
        blocks = len(tower.transformer.resblocks)
        if layer == "penultimate" and blocks < 2:
            raise ValueError("layer='penultimate' needs a text transformer with at least 2 blocks")
        if pooled and project_pooled and tower.text_projection is None:
            raise ValueError("pooled=True needs a tower with a text projection (or project_pooled=False)")
        self.layer, self.final_norm, self.pooled = layer, final_norm, pooled
        self.project_pooled = bool(pooled and project_pooled)
        self.tokenizer = ClipTokenizer(arch, max_length, pad_with_eot=pad_with_eot)
        if max_length > tower.positional_embedding.shape[0]:
            raise ValueError(f"max_length {max_length} exceeds the tower's {tower.positional_embedding.shape[0]} "
                             "positions")
        self.width = tower.transformer.width
        self.embed_dim = (tower.text_projection.shape[1] if self.project_pooled else self.width) if pooled else None
        self.model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> CLIPTextTower:
        super().train(mode)
        self.model.eval()  # frozen: Lightning's model.train() must not switch it back
        return self

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token ids ``(B, L)`` → (per-token states, pooled output or None)."""
        tower = text_tower(self.model)
        length = tokens.shape[1]
        dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(dtype) + tower.positional_embedding[:length].to(dtype)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        blocks = list(tower.transformer.resblocks)
        if self.layer == "penultimate" and not self.pooled:
            blocks = blocks[:-1]  # the last block is never read
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        states = None
        for i, block in enumerate(blocks):
            if i == len(tower.transformer.resblocks) - 1:
                states = x
            x = block(x, attn_mask=mask)
        if not batch_first:
            x, states = x.transpose(0, 1), None if states is None else states.transpose(0, 1)
        states = x if self.layer == "last" or states is None else states
        states = tower.ln_final(states) if self.final_norm else states
        if not self.pooled:
            return states, None
        # the <eot> token has the largest id: its position is the argmax (the first one, with <eot> padding)
        last = tower.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return states, last @ tower.text_projection if self.project_pooled else last

    def forward(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        tokens, _ = self.tokenizer(list(texts))
        return self.encode_tokens(tokens.to(text_tower(self.model).token_embedding.weight.device))


class SDXLTextEncoder(TextEncoder):
    """Captions → ``{"crossattn": (B, L, Σ width), "vector": (B, Σ embed_dim)}`` through frozen CLIP text towers.

    ``towers``: :class:`CLIPTextTower` keyword dicts (or built towers), by name (a config's) or in a list, in
    order; all must give the same number of tokens. The vector route is there when a tower is ``pooled``.
    ``pretrained=False`` (or None) builds every tower without its released weights (they come from
    ``model.init_from`` or a checkpoint). ``null_text``: ``zeros`` (SD-XL) or ``empty`` (the empty caption
    encoded). ``t5``: a :class:`~sdlight.conditioning.t5.T5Tower`'s keyword dict (or one built), whose tokens
    follow the CLIP towers' (SD3); the context is then T5's width.
    Dropping a caption drops it from every tower at once: one null for "no text".
    """

    def __init__(self, towers: Sequence[Mapping[str, Any] | CLIPTextTower] | Mapping[str, Any],
                 null_text: str = "zeros", pretrained: bool | None = True,
                 t5: Mapping[str, Any] | nn.Module | None = None, **options: Any) -> None:
        super().__init__(**options)
        if null_text not in NULLS:
            raise ValueError(f"null_text must be one of {NULLS}, got {null_text!r}")
        towers = list(towers.values()) if isinstance(towers, Mapping) else list(towers)
        if not towers:
            raise ValueError("give at least one text tower")
        if not pretrained:  # the weights come later: no file is looked for
            towers = [t if isinstance(t, nn.Module) else {**t, "pretrained": None, "checkpoint_path": None}
                      for t in towers]
        self.towers = nn.ModuleList(t if isinstance(t, nn.Module) else CLIPTextTower(**dict(t)) for t in towers)
        lengths = {t.tokenizer.max_length for t in self.towers}
        if len(lengths) > 1:
            raise ValueError(f"the towers give different numbers of tokens ({sorted(lengths)}): give one max_length")
        self.null_text = null_text
        self.context_dim = sum(t.width for t in self.towers)
        if t5 is not None and not isinstance(t5, nn.Module):
            from .t5 import T5Tower

            t5 = T5Tower(**({**t5, "pretrained": None} if not pretrained else dict(t5)))
        self.t5 = t5
        if t5 is not None:
            if t5.width < self.context_dim:
                raise ValueError(f"T5's width {t5.width} is below the CLIP towers' {self.context_dim}: SD3 pads "
                                 "the CLIP tokens to T5's width")
            self.context_dim = t5.width
        self.vector_dim = sum(t.embed_dim for t in self.towers if t.pooled)

    @property
    def routes(self) -> tuple[str, ...]:
        return ("crossattn", "vector") if self.vector_dim else ("crossattn",)

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The first tower's (what attention maps per word read)."""
        return self.towers[0].tokenizer

    def null_like(self, values: str | Sequence[str | None]) -> list[str | None]:
        n = 1 if isinstance(values, str) else len(values)
        return [None] * n if self.null_text == "zeros" else [""] * n  # None: this caption's embeddings are zeros

    def forward(self, values: str | Sequence[str | None]) -> dict[str, Tensor]:
        values = [values] if isinstance(values, str) else list(values)
        texts = as_text_list(["" if v is None else v for v in values])
        outputs = [tower(texts) for tower in self.towers]
        out = {"crossattn": torch.cat([states for states, _ in outputs], dim=-1)}
        if self.t5 is not None:
            tokens = self.t5(texts)[0].to(out["crossattn"].dtype)
            clip = F.pad(out["crossattn"], (0, self.context_dim - out["crossattn"].shape[-1]))
            out["crossattn"] = torch.cat([clip, tokens], dim=1)
        if self.vector_dim:
            out["vector"] = torch.cat([pooled for _, pooled in outputs if pooled is not None], dim=-1)
        zero = torch.tensor([v is None for v in values], device=out["crossattn"].device)
        if zero.any():  # the null condition: zeros, as SD-XL's dropped captions
            out = {k: torch.where(zero.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v)
                   for k, v in out.items()}
        return out
