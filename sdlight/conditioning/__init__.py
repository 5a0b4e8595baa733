"""Condition encoders: batch entry (captions, class labels, attributes) → cross-attention context (B, L, D)."""

from .base import ConditionEncoder, drop_mask
from .embeddings import AttributeEmbedder, ClassEmbedder, NoConditioning
from .text import ClipTokenizer, LearnedTextEncoder, OpenCLIPTextEncoder

__all__ = [
    "AttributeEmbedder",
    "ClassEmbedder",
    "ClipTokenizer",
    "ConditionEncoder",
    "LearnedTextEncoder",
    "NoConditioning",
    "OpenCLIPTextEncoder",
    "drop_mask",
]
