"""Conditioning without text: none, a class label, a set of discrete attributes, or sizes (micro-conditioning).

Each embedding table carries one extra row for the null condition, learned like the others, so classifier-free
guidance works the same way as with captions.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.errors import UsageError
from sdlight.nn.unet import timestep_embedding

from .base import ConditionEncoder


class NoConditioning(ConditionEncoder):
    """Unconditional model: reads nothing from the batch and gives no context."""

    input_key = None
    context_dim = None

    def forward(self, values: None = None) -> None:
        return None

    def null_like(self, values: None = None) -> None:
        return None


class ClassEmbedder(ConditionEncoder):
    """Class label ``(B,)`` → one context token ``(B, 1, D)`` (on the ``vector`` route: the UNet's ``y``,
    ``(B, D)``); row ``num_classes`` is the null class.

    The table is named ``embedding`` as in CompVis ``ClassEmbedder``, so ``cond_stage_model.embedding.weight``
    lines up with their checkpoints.
    """

    input_key = "label"

    def __init__(self, num_classes: int, embed_dim: int, **options: Any) -> None:
        super().__init__(**options)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.context_dim = embed_dim
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, values: Tensor) -> Tensor:
        if values.ndim != 1:
            raise ValueError(f"expected labels of shape (B,), got {tuple(values.shape)}")
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) <= self.num_classes:
            raise UsageError(f"class labels must be in [0, {self.num_classes}), got {values.min()}..{values.max()}: "
                             "-1 is an image without a class (data=folder needs data.label_from=folder); a label "
                             "too large needs model.conditioning.num_classes set to the data's number of classes")
        return self.embedding(values.long())[:, None, :]

    def null_like(self, values: Tensor) -> Tensor:
        return torch.full_like(values, self.null_id)

    def describe(self) -> str:
        return f"class labels 0-{self.num_classes - 1}"

    def check(self, values: Sequence[Any]) -> None:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{v!r}: class labels are whole numbers")
            if not 0 <= v < self.num_classes:
                raise ValueError(f"{v}: this model has {self.num_classes} classes (0-{self.num_classes - 1})")


class AttributeEmbedder(ConditionEncoder):
    """Attributes ``(B, A)``, one index per slot → a set of ``A`` context tokens ``(B, A, D)``.

    Slot ``i`` has its own table of ``vocab_sizes[i] + 1`` rows, the last being that slot's null value. A learned
    slot embedding is added so that cross-attention, which is blind to token order, can still tell slots apart.
    """

    input_key = "attributes"

    def __init__(self, vocab_sizes: Sequence[int], embed_dim: int, **options: Any) -> None:
        super().__init__(**options)
        vocab_sizes = [int(v) for v in vocab_sizes]
        if not vocab_sizes or min(vocab_sizes) < 1:
            raise ValueError(f"vocab_sizes must be a non-empty list of positive sizes, got {vocab_sizes}")
        self.vocab_sizes = vocab_sizes
        self.context_dim = embed_dim
        self.embeddings = nn.ModuleList(nn.Embedding(v + 1, embed_dim) for v in vocab_sizes)
        self.slot_embedding = nn.Parameter(torch.randn(len(vocab_sizes), embed_dim) * 0.02)
        self.register_buffer("null_ids", torch.tensor(vocab_sizes, dtype=torch.long), persistent=False)

    @property
    def num_slots(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, values: Tensor) -> Tensor:
        if values.ndim != 2 or values.shape[1] != self.num_slots:
            raise ValueError(f"expected attributes of shape (B, {self.num_slots}), got {tuple(values.shape)}")
        values = values.long()
        tokens = torch.stack([emb(values[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)
        return tokens + self.slot_embedding

    def null_like(self, values: Tensor) -> Tensor:
        return self.null_ids.to(device=values.device, dtype=values.dtype).expand_as(values).clone()

    def describe(self) -> str:
        return f"attribute sets of {self.num_slots} ids, slot sizes {self.vocab_sizes}"

    def check(self, values: Sequence[Any]) -> None:
        sizes = self.vocab_sizes
        for row in values:
            if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != len(sizes):
                raise ValueError(f"{row!r}: give {len(sizes)} ids per set (slot sizes {sizes})")
            for i, (v, n) in enumerate(zip(row, sizes)):
                if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v < n):
                    raise ValueError(f"{list(row)}: id {v} in slot {i} is out of range (0-{n - 1})")


class SizeEmbedder(ConditionEncoder):
    """SD-XL's micro-conditioning: ``n`` numbers per sample ``(B, n)`` (an original size ``(h, w)``, crop
    coordinates ``(top, left)``, a target size) → their sinusoidal embeddings side by side ``(B, n · dim)``,
    routed to the UNet's ``y`` by default. No weights: the UNet's ``label_emb`` learns what they mean.

    The null value is all zeros; as in SD-XL these are usually never dropped (``drop_rate=0``). ``default``
    (``n`` numbers, e.g. the training size for ``original_size`` / ``target_size``, ``[0, 0]`` for ``crop_coords``)
    stands in where a batch or a sampling request has no such entry, as SD-XL's samplers fill them."""

    route = "vector"

    def __init__(self, input_key: str, dim: int = 256, n: int = 2, default: Sequence[float] | None = None,
                 **options: Any) -> None:
        super().__init__(input_key=input_key, **options)
        if dim < 2 or n < 1:
            raise ValueError(f"dim must be >= 2 and n >= 1, got dim={dim}, n={n}")
        if default is not None and len(default) != n:
            raise ValueError(f"{input_key}: default needs {n} numbers, got {list(default)}")
        self.dim, self.n = dim, n
        self.default = None if default is None else [float(v) for v in default]

    @property
    def output_dim(self) -> int:
        return self.dim * self.n

    def forward(self, values: Tensor) -> Tensor:
        if values.ndim != 2 or values.shape[1] != self.n:
            raise ValueError(f"{self.input_key}: expected shape (B, {self.n}), got {tuple(values.shape)}")
        emb = timestep_embedding(values.reshape(-1), self.dim)
        return emb.reshape(values.shape[0], self.output_dim)

    def null_like(self, values: Tensor) -> Tensor:
        return torch.zeros_like(values)

    def describe(self) -> str:
        default = "" if self.default is None else f", default {[int(v) if v.is_integer() else v for v in self.default]}"
        return f"{self.input_key} ({self.n} numbers per sample{default})"

    def check(self, values: Sequence[Any]) -> None:
        for row in values:
            if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != self.n:
                raise ValueError(f"{row!r}: give {self.n} numbers per sample")
