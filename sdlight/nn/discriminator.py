"""PatchGAN discriminator of pix2pix, as used by the CompVis/taming autoencoder losses.

Parameter names match ``taming.modules.discriminator.model.NLayerDiscriminator`` (``main.N.*``) and
``taming.modules.util.ActNorm`` (``loc``, ``scale``, ``initialized``), so loss checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

NORMS = ("batch", "actnorm")


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` initialised from the first training batch.

    On the first forward in training mode, ``loc`` and ``scale`` are set so that the output of that batch has
    zero mean and unit (unbiased) standard deviation per channel. Under ``torch.distributed`` the statistics
    are all-reduced, so every rank starts from identical parameters.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        # Sum moments (count, sum, sum of squares) so the statistics can be all-reduced across ranks.
        moments = torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1), flat.pow(2).sum(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
        n, s, ss = moments
        mean = s / n
        std = ((ss - n * mean.pow(2)).clamp_min(0) / (n - 1)).sqrt()
        self.loc.copy_(-mean.view(1, -1, 1, 1).to(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view(1, -1, 1, 1).to(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, :, None, None]
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
        h = self.scale * (x + self.loc)
        return h.squeeze(-1).squeeze(-1) if squeeze else h


def weights_init(m: nn.Module) -> None:
    """pix2pix init: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0 (conv biases untouched)."""
    classname = m.__class__.__name__
    if "Conv" in classname:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in classname:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs, then two stride-1 4x4 convs ending in one logit per patch.

    With the default ``n_layers=3`` each output logit sees a 70x70 input patch. With BatchNorm the convs that
    feed a norm layer carry no bias (the norm has its own); with ActNorm they keep it, as in the original.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm_layer = nn.BatchNorm2d if norm == "batch" else ActNorm
        use_bias = norm != "batch"
        kw, padw = 4, 1

        sequence: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):  # double the width each stride-2 layer, capped at 8 * ndf
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*sequence)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_nc, H, W) -> (B, 1, H', W') real/fake logits, one per overlapping patch."""
        return self.main(x)
