"""T5's encoder as a frozen text tower: Stable Diffusion 3's third text encoder (T5-XXL v1.1), through transformers.

SD3 reads the encoder's last hidden state (after its final RMS norm) at every position of the caption tokenized
to ``max_length`` (256 in diffusers' ``StableDiffusion3Pipeline``, 77 in Stability's reference code): ``</s>``
after the words, ``<pad>`` after it, and no attention mask, so the padded positions' states are part of the
context. Weights: a ``T5EncoderModel`` folder or hub id (``google/t5-v1_1-xxl``; an SD3 diffusers folder with
``subfolder: text_encoder_3``), found locally first ($SDLIGHT_WEIGHTS/<name>, the Hugging Face cache) and
downloaded only online. ``config`` builds a random encoder instead (tests, the CPU); its tokenizer can be
``byt5``, T5's byte-level tokenizer, which needs no file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.weights import WeightsNotFoundError, is_offline, weights_dir

BYTE_TOKENIZER = "byt5"
EMBED_TOKENS = "encoder.embed_tokens.weight"  # T5's input embedding: the same tensor as shared.weight
TIED = "model." + EMBED_TOKENS  # stored once (as shared), as T5's own files do


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # an optional dependency: only T5 towers need it
        raise ImportError("a T5 text tower needs transformers: pip install 'sdlight[t5]'") from err
    return transformers


def _local(name: str | os.PathLike) -> str:
    """``name`` itself when it is a folder; else $SDLIGHT_WEIGHTS/<its last part> when that is one; else the id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    root = weights_dir()
    if root is not None and (root / Path(str(name)).name).is_dir():
        return str(root / Path(str(name)).name)
    return str(name)


def _from_pretrained(cls: Any, name: str | os.PathLike, subfolder: str | None, what: str) -> Any:
    """``cls.from_pretrained`` from a local folder or the hub cache, downloading only online; a file that is
    nowhere is one line naming what was looked for."""
    source = _local(name)
    offline = is_offline() and not Path(source).is_dir()
    try:
        return cls.from_pretrained(source, subfolder=subfolder or "", local_files_only=offline)
    except (OSError, ValueError) as err:
        where = f"{source}{'/' + subfolder if subfolder else ''}"
        hint = ("offline: give a local folder, put it in $SDLIGHT_WEIGHTS, or fetch it into the Hugging Face cache "
                "online" if offline else str(err).splitlines()[0])
        raise WeightsNotFoundError(f"the T5 {what} {where} was not found ({hint})") from None


class T5Tower(nn.Module):
    """Captions → T5 encoder states ``(B, max_length, d_model)``, frozen.

    ``pretrained``: a ``T5EncoderModel`` folder or hub id (with ``subfolder``); ``config``: ``T5Config`` options for
    a random encoder instead, for a whole checkpoint that holds its weights or for tests (``vocab_size`` defaults
    to the tokenizer's). ``tokenizer``: a folder or hub id, ``byt5``, or None for ``pretrained``'s own
    (``tokenizer_subfolder``: SD3's ``tokenizer_3``); a tokenizer object, and ``model=``, inject built ones.
    """

    pooled = False  # T5 gives tokens only: SD3's pooled vector is the CLIP towers'
    embed_dim = None

    def __init__(self, pretrained: str | os.PathLike | None = None, subfolder: str | None = None,
                 tokenizer: Any = None, tokenizer_subfolder: str | None = None, max_length: int = 256,
                 config: Mapping[str, Any] | None = None, model: nn.Module | None = None) -> None:
        super().__init__()
        transformers = _transformers()
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if tokenizer is None and pretrained is None:
            raise ValueError("give the T5 tower a tokenizer (a folder, a hub id, or 'byt5') or pretrained weights")
        if isinstance(tokenizer, str) and tokenizer == BYTE_TOKENIZER:
            tokenizer = transformers.ByT5Tokenizer()
        elif tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            name, sub = (pretrained, tokenizer_subfolder) if tokenizer is None else (tokenizer, tokenizer_subfolder)
            tokenizer = _from_pretrained(transformers.AutoTokenizer, name, sub, "tokenizer")
        self.tokenizer = tokenizer
        if model is None:
            if pretrained is not None:
                model = _from_pretrained(transformers.T5EncoderModel, pretrained, subfolder, "encoder")
            elif config is not None:
                model = transformers.T5EncoderModel(transformers.T5Config(**{"vocab_size": len(tokenizer),
                                                                             **dict(config)}))
            else:
                raise ValueError("give the T5 tower pretrained weights or a config (random weights)")
        self.model = model.float()
        self.max_length = max_length
        self.width: int = self.model.config.d_model
        self.model.requires_grad_(False).eval()
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_fill_tied)

    def train(self, mode: bool = True) -> T5Tower:
        super().train(mode)
        self.model.eval()  # frozen: Lightning's model.train() must not switch it back
        return self

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Ids ``(B, max_length)`` exactly as diffusers' SD3 pipeline tokenizes (``</s>``, then ``<pad>``)."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[Tensor, None]:
        ids = self.tokenize(texts).to(self.model.shared.weight.device)
        return self.model(input_ids=ids).last_hidden_state, None


def _drop_tied(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + TIED, None)  # safetensors refuses shared tensors; T5's own files store it once


def _fill_tied(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "model.shared.weight" in state_dict and prefix + TIED not in state_dict:
        state_dict[prefix + TIED] = state_dict[prefix + "model.shared.weight"]
