"""Diagonal Gaussian posterior of the KL autoencoder (CompVis ``DiagonalGaussianDistribution``)."""

from __future__ import annotations

import math

import torch

from sdlight.diffusion.draw import draw


class DiagonalGaussianDistribution:
    """Gaussian with diagonal covariance, parameterised by ``cat([mean, logvar], dim=1)``.

    All reductions (``kl``, ``nll``) sum over every dimension except the batch, giving one value per sample,
    as in the CompVis code. ``deterministic=True`` collapses the distribution onto its mean (zero variance).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite early in training, when the encoder's logvar can be wild.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @property
    def _reduce_dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable w.r.t. the parameters), with ``noise`` as
        eps when given."""
        mean = self.mean
        # a CPU generator gives the same latents on every device, the way diffusers' randn_tensor does
        eps = draw(torch.randn, mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) \
            if noise is None else noise
        return mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample; ``other=None`` means the standard normal prior."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            kl = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.sum(dim=self._reduce_dims)

    def nll(self, sample: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims`` (default: all but the batch)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._reduce_dims if dims is None else dims
        nll = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * nll.sum(dim=dims)

    def to(self, *args, **kwargs) -> DiagonalGaussianDistribution:
        """Move or cast the parameters (e.g. upcast to float32 before computing the KL term)."""
        return DiagonalGaussianDistribution(self.parameters.to(*args, **kwargs), deterministic=self.deterministic)
