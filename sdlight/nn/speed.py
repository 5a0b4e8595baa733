"""Speed switches for any module, in place (parameter names, hence checkpoints, are unchanged)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def speed_up(modules: Iterable[nn.Module], *, compile: bool = False, channels_last: bool = False) -> None:
    """``channels_last`` stores 4-D weights NHWC, so convolutions run on NHWC activations (faster kernels on
    tensor cores and some CPUs); ``compile`` makes each module's call ``torch.compile``d (inductor: C++ on the
    CPU, Triton on CUDA), compiled lazily at the first call and again for each new input shape.
    """
    for module in modules:
        if channels_last:
            module.to(memory_format=torch.channels_last)
        if compile and getattr(module, "_compiled_call_impl", None) is None:
            # static shapes: a new shape (CFG's doubled batch, another resolution) compiles anew instead of
            # switching to a symbolic-shape graph, which inductor failed to build for the VAE here (torch 2.14)
            module.compile(dynamic=False)


def allow_retained_graphs() -> None:
    """Lets compiled modules run backward more than once on a graph (``retain_graph=True``), as the adaptive GAN
    weight does through the decoder. Compiled backward functions free ("donate") saved buffers by default and
    then refuse a second pass; this turns that off for the process (slightly more memory in backward)."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
