"""Condition encoders: batch entry (captions, class labels, attributes, sizes) → an embedding routed to the UNet
(cross-attention context, class vector ``y`` or concatenated channels) by a :class:`Conditioner`."""

from .base import ROUTES, ConditionEncoder, drop_mask
from .conditioner import Conditioner
from .embeddings import AttributeEmbedder, ClassEmbedder, NoConditioning, SizeEmbedder
from .sdxl_text import CLIPTextTower, SDXLTextEncoder
from .t5 import T5Tower
from .text import ClipTokenizer, LearnedTextEncoder, OpenCLIPTextEncoder, TextEncoder

__all__ = [
    "AttributeEmbedder",
    "CLIPTextTower",
    "ClassEmbedder",
    "ClipTokenizer",
    "ConditionEncoder",
    "Conditioner",
    "LearnedTextEncoder",
    "NoConditioning",
    "OpenCLIPTextEncoder",
    "ROUTES",
    "SDXLTextEncoder",
    "SizeEmbedder",
    "T5Tower",
    "TextEncoder",
    "drop_mask",
]
