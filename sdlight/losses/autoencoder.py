"""Loss of the KL autoencoder (stage 1): reconstruction + LPIPS + KL + PatchGAN with an adaptive weight.

This is CompVis' ``LPIPSWithDiscriminator`` (latent-diffusion ``ldm/modules/losses/contperceptual.py``) with
the same numbers and checkpoint keys (``logvar``, ``discriminator.*``, ``perceptual_loss.*``), cleaned up:
the discriminator and the perceptual network are passed in, the generator's adversarial term ramps up over
``disc_warmup_steps`` after ``disc_start``, the clamp of the adaptive weight is explicit and logged, the
discriminator step does not recompute the reconstruction terms, and LPIPS and the discriminator are
back-propagated once per generator step instead of twice (``single_backward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AutoencoderLoss", "hinge_d_loss", "vanilla_d_loss"]


class Posterior(Protocol):
    def kl(self) -> Tensor: ...  # KL to the standard normal prior, one value per sample


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``(E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss ``(E[softplus(-D(x))] + E[softplus(D(G(z)))]) / 2``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_PARTS = {0: "generator", 1: "discriminator", "generator": "generator", "discriminator": "discriminator"}


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of a KL autoencoder trained with a PatchGAN.

    Generator: ``nll = (rec + perceptual_weight * lpips) / exp(logvar) + logvar`` summed over pixels and averaged
    over the batch (a Laplace/Gaussian likelihood with one learned scale), plus ``kl_weight * KL`` and
    ``d_weight * factor * g_loss`` with ``g_loss = -mean(D(reconstruction))``. The adaptive weight
    ``d_weight = disc_weight * clamp(|grad nll| / (|grad g_loss| + 1e-4), 0, d_weight_max)`` is taken at the
    decoder's ``last_layer`` so that the adversarial gradient has the size of the reconstruction gradient.

    Args:
        discriminator: any module mapping images to real/fake logits
            (e.g. ``sdlight.nn.discriminator.NLayerDiscriminator``).
        perceptual: an :class:`~sdlight.losses.LPIPS` (or compatible) module, a zero-argument factory of one
            (built only when ``perceptual_weight > 0``), or None together with ``perceptual_weight=0``.
        rec_loss: ``"l1"`` (CompVis) or ``"l2"`` pixel loss.
        logvar_init: initial log-scale of the likelihood; ``learn_logvar`` makes it a generator parameter
            (see :meth:`generator_parameters`), otherwise it is a fixed buffer.
        kl_weight: weight of the KL term (mean over the batch of the per-sample KL).
        perceptual_weight: weight of LPIPS; 0 switches it off entirely (no network is built or run).
        disc_loss: ``"hinge"`` or ``"vanilla"`` discriminator loss.
        disc_start: step from which the discriminator trains and its loss may reach the generator. Counted in
            whatever ``global_step`` the caller passes (with manual optimisation of G and D, Lightning's
            ``global_step`` advances twice per batch).
        disc_warmup_steps: the generator's adversarial factor ramps linearly from 0 at ``disc_start`` to
            ``disc_factor`` at ``disc_start + disc_warmup_steps``, while the discriminator trains at full
            strength from ``disc_start``. An untrained discriminator switched on at full weight gives large,
            meaningless gradients that can collapse the reconstructions; the ramp lets it learn first.
        disc_factor: overall factor of the adversarial terms (0 disables the GAN).
        disc_weight: multiplies the adaptive weight.
        d_weight_max: upper clamp of the adaptive weight before ``disc_weight``; when it hits, the log says so.
        single_backward: CompVis takes the adaptive weight's two gradients with two backward passes (through
            LPIPS, through the discriminator) and then back-propagates the total through both again. With True
            (the default) the gradients of nll and g_loss are taken once, at the reconstructions; the weight's
            two gradients follow from them through the last layer alone, and the returned loss carries their
            weighted sum to the autoencoder. Same value, same gradients for the autoencoder and ``logvar``
            (tests/losses), ~10 % less time per stage-1 step (BENCHMARKS.md); the discriminator's parameters
            get no gradient from the generator's loss (the stage freezes them for it anyway). It applies in
            training with the adversarial term on; elsewhere (validation, pixel ``weights``, float16 autocast,
            inputs that need a gradient) the loss is CompVis' graph.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        perceptual: nn.Module | Callable[[], nn.Module] | None = None,
        *,
        rec_loss: str = "l1",
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        disc_loss: str = "hinge",
        disc_start: int = 0,
        disc_warmup_steps: int = 0,
        disc_factor: float = 1.0,
        disc_weight: float = 0.5,
        d_weight_max: float = 1e4,
        single_backward: bool = True,
    ):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if disc_warmup_steps < 0 or disc_start < 0:
            raise ValueError("disc_start and disc_warmup_steps must be >= 0")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network; pass perceptual_weight=0 to disable it")

        self.discriminator = discriminator
        self.perceptual_weight = float(perceptual_weight)
        if self.perceptual_weight > 0 and perceptual is not None and not isinstance(perceptual, nn.Module):
            perceptual = perceptual()  # a factory (Hydra ``_partial_``): only now are the weights read
        self.perceptual_loss = perceptual if self.perceptual_weight > 0 else None

        logvar = torch.full((), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

        self.rec_loss = rec_loss
        self.kl_weight = float(kl_weight)
        self.disc_loss = disc_loss
        self.d_loss_fn = D_LOSSES[disc_loss]
        self.disc_start = int(disc_start)
        self.disc_warmup_steps = int(disc_warmup_steps)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.d_weight_max = float(d_weight_max)
        self.single_backward = bool(single_backward)
        self.register_load_state_dict_pre_hook(_drop_unused_perceptual_keys)

    # --- parameters and schedules -------------------------------------------------------------------------

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the loss that the generator's optimiser trains (the learnable ``logvar``, if any)."""
        if isinstance(self.logvar, nn.Parameter):
            yield self.logvar

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that the discriminator's optimiser trains."""
        yield from self.discriminator.parameters()

    def discriminator_factor(self, global_step: int) -> float:
        """Factor of the discriminator's own loss: 0 before ``disc_start``, ``disc_factor`` from then on."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def adversarial_factor(self, global_step: int) -> float:
        """Factor of the generator's adversarial term: 0 before ``disc_start``, then a linear warm-up."""
        if global_step < self.disc_start:
            return 0.0
        if self.disc_warmup_steps == 0:
            return self.disc_factor
        return self.disc_factor * min(1.0, (global_step - self.disc_start) / self.disc_warmup_steps)

    def adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> tuple[Tensor, bool]:
        """``disc_weight * clamp(|d nll/d w| / (|d g_loss/d w| + 1e-4), 0, d_weight_max)`` at ``w = last_layer``.

        Returns the detached weight and whether the clamp hit. Without a graph (validation under no_grad, or
        no ``last_layer`` outside training) the weight is 0.
        """
        zero = torch.zeros((), device=nll_loss.device)
        if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
            return zero, False
        if last_layer is None:
            if self.training:
                raise ValueError("the adaptive weight needs last_layer (the decoder's last weight) in training")
            return zero, False
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        raw = (nll_grad.norm() / (g_grad.norm() + 1e-4)).detach()
        clamped = bool(raw > self.d_weight_max)
        return raw.clamp(0.0, self.d_weight_max) * self.disc_weight, clamped

    # --- losses -------------------------------------------------------------------------------------------

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: Posterior | None,
        part: str | int,
        global_step: int,
        last_layer: Tensor | None = None,
        split: str = "train",
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for ``part`` (``"generator"``/0 or ``"discriminator"``/1, CompVis' ``optimizer_idx``) and a log.

        ``weights`` optionally weighs the per-pixel nll (broadcast against the images), as in CompVis.
        ``posterior`` is only needed for the generator.
        """
        if part not in _PARTS:
            raise ValueError(f"part must be 'generator'/0 or 'discriminator'/1, got {part!r}")
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        if _PARTS[part] == "discriminator":
            return self._discriminator_loss(inputs, reconstructions, global_step, split)
        if posterior is None:
            raise ValueError("the generator loss needs the posterior (for the KL term)")
        return self._generator_loss(inputs, reconstructions, posterior, global_step, last_layer, split, weights)

    def _generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: Posterior,
        global_step: int,
        last_layer: Tensor | None,
        split: str,
        weights: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        diff = inputs - reconstructions
        rec = diff.abs() if self.rec_loss == "l1" else diff.pow(2)
        if self.perceptual_loss is not None:
            # (B, 1, 1, 1) distance added to every pixel, so after the sum it counts C*H*W times (CompVis).
            p_loss = self.perceptual_loss(inputs, reconstructions)
            pixel_nll = rec + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=inputs.device)
            pixel_nll = rec
        nll = pixel_nll / torch.exp(self.logvar) + self.logvar
        batch = inputs.shape[0]
        nll_loss = nll.sum() / batch
        weighted_nll_loss = nll_loss if weights is None else (weights * nll).sum() / batch
        kl = posterior.kl()
        kl_loss = kl.sum() / kl.shape[0]

        logits_fake = self.discriminator(reconstructions)
        g_loss = -logits_fake.mean()
        factor = self.adversarial_factor(global_step)
        if factor > 0 and self.disc_factor > 0 and self._takes_single_backward(inputs, reconstructions, nll_loss,
                                                                                last_layer, weights):
            loss, d_weight, clamped = self._single_backward_loss(reconstructions, nll_loss, g_loss, kl_loss, factor,
                                                                 last_layer)
        else:
            if factor > 0 and self.disc_factor > 0:
                d_weight, clamped = self.adaptive_weight(nll_loss, g_loss, last_layer)
            else:  # skip two backward passes while the term is off
                d_weight, clamped = torch.zeros((), device=inputs.device), False
            # g_loss stays in the graph even with a zero factor, so the set of used parameters never changes (DDP)
            loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * factor * g_loss

        log = {
            "total": loss,
            "rec": rec.mean(),
            "perceptual": p_loss.mean(),
            "nll": nll_loss,
            "kl": kl_loss,
            "logvar": self.logvar,
            "d_weight": d_weight,
            "d_weight_clamped": torch.tensor(float(clamped), device=inputs.device),
            "disc_factor": torch.tensor(factor, device=inputs.device),
            "g_loss": g_loss,
        }
        return loss, {f"{split}/{k}": v.detach() for k, v in log.items()}

    def _takes_single_backward(self, inputs: Tensor, reconstructions: Tensor, nll_loss: Tensor,
                               last_layer: Tensor | None, weights: Tensor | None) -> bool:
        device = reconstructions.device.type
        half = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        # float16 autocast: the gradients taken here are not loss-scaled, as the trainer's backward would be
        return (self.single_backward and torch.is_grad_enabled() and reconstructions.requires_grad
                and nll_loss.requires_grad and not inputs.requires_grad and last_layer is not None
                and weights is None and not half)

    def _single_backward_loss(self, reconstructions: Tensor, nll_loss: Tensor, g_loss: Tensor, kl_loss: Tensor,
                              factor: float, last_layer: Tensor) -> tuple[Tensor, Tensor, bool]:
        """The generator's loss with one backward pass through LPIPS and the discriminator (``single_backward``).

        nll and g_loss reach the autoencoder only through the reconstructions r (and nll reaches ``logvar``), so
        d loss/d theta = (dr/d theta)^T (d nll/dr + w * factor * d g_loss/dr) + d(kl_weight * kl)/d theta: both
        gradients at r are taken once, the adaptive weight's gradients at the last layer follow from them through
        that layer alone, and the returned tensor has the loss as its value and that sum as its gradient.
        """
        learn_logvar = isinstance(self.logvar, nn.Parameter) and self.logvar.requires_grad
        wrt = [reconstructions, self.logvar] if learn_logvar else [reconstructions]
        nll_grads = torch.autograd.grad(nll_loss, wrt)  # frees LPIPS' graph; the autoencoder's stays
        (g_grad,) = torch.autograd.grad(g_loss, reconstructions)  # no gradients for D's weights
        nll_w = torch.autograd.grad(reconstructions, last_layer, nll_grads[0], retain_graph=True)[0]
        g_w = torch.autograd.grad(reconstructions, last_layer, g_grad, retain_graph=True)[0]
        raw = nll_w.norm() / (g_w.norm() + 1e-4)
        clamped = bool(raw > self.d_weight_max)
        d_weight = raw.clamp(0.0, self.d_weight_max) * self.disc_weight
        surrogate = (reconstructions * (nll_grads[0] + d_weight * factor * g_grad)).sum() + self.kl_weight * kl_loss
        if learn_logvar:
            surrogate = surrogate + self.logvar * nll_grads[1]
        value = (nll_loss + self.kl_weight * kl_loss + d_weight * factor * g_loss).detach()
        # value exactly (s - s is 0), gradient of the surrogate
        return surrogate - surrogate.detach() + value, d_weight, clamped

    def _discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int, split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = self.discriminator_factor(global_step) * self.d_loss_fn(logits_real, logits_fake)
        log = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach() for k, v in log.items()}

    def extra_repr(self) -> str:
        return (
            f"rec_loss={self.rec_loss!r}, kl_weight={self.kl_weight}, perceptual_weight={self.perceptual_weight}, "
            f"disc_loss={self.disc_loss!r}, disc_start={self.disc_start}, disc_warmup_steps={self.disc_warmup_steps}, "
            f"disc_factor={self.disc_factor}, disc_weight={self.disc_weight}, d_weight_max={self.d_weight_max}"
        )


def _drop_unused_perceptual_keys(
    module: AutoencoderLoss, state_dict: dict, prefix: str, *args  # local_metadata, strict, missing, unexpected, errors
) -> None:
    # CompVis checkpoints carry LPIPS weights under ``perceptual_loss.``; without a perceptual network they are
    # simply not ours. (With one, LPIPS' own hook replaces them by its pretrained weights.)
    if module.perceptual_loss is None:
        for key in [k for k in state_dict if k.startswith(prefix + "perceptual_loss.")]:
            del state_dict[key]
