"""The latent space of a latent diffusion model: its latents are ``scale_factor · (z - shift_factor)``, with the
scale 1 / std and (where asked for) the shift the mean of its training latents, estimated once at the start of
training (pooled over ranks), or those of the file it starts from; a resumed run keeps its own."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from sdlight.data.resumable import keyed_draws
from sdlight.models.latent_diffusion import LatentDiffusionModel
from sdlight.models.latents import posterior_of

log = logging.getLogger("sdlight")
SCALE_FACTOR_SEED = 0  # posterior samples of the estimate: the same value on every run


@torch.no_grad()
def estimate_scale_factor(trainer: L.Trainer, net: LatentDiffusionModel, batches: int, scale: bool = True,
                          shift: bool = False) -> float:
    """1 / std of the latents over ``batches`` global training batches (each rank's share, every accumulated
    part), pooled over all ranks, set in ``net`` when ``scale``; with ``shift`` also their mean as its shift
    factor (from the same sums: the std is that of the shifted latents). The same samples on any number of
    ranks; returns the scale factor that ``net`` then holds.

    The latents are posterior samples, as training sees them (their variance includes the posterior's), drawn
    from a seeded generator; the global RNG is restored afterwards, so the estimate changes neither the data
    order nor the noise of the training that follows.
    """
    device = net.device
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # n, sum, sum of squares
    generator = torch.Generator().manual_seed(SCALE_FACTOR_SEED + trainer.global_rank)
    loader_batches = batches * trainer.accumulate_grad_batches
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(trainer.train_dataloader):
            if i >= loader_batches:
                break
            posterior = posterior_of(batch, net.first_stage_model, device)
            keyed = keyed_draws(batch, 0, SCALE_FACTOR_SEED)  # the same latents on any number of ranks
            noise = keyed.normal(posterior.mean.shape, device, posterior.mean.dtype) if keyed is not None else None
            z = posterior.sample(generator, noise).double()
            stats += torch.stack([stats.new_tensor(z.numel()), z.sum(), (z * z).sum()])
    if trainer.world_size > 1:
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
    n, s, ss = stats.tolist()
    if n < 2:
        raise RuntimeError("the scale factor estimate found no training batches")
    mean = s / n
    std = math.sqrt((ss - s * s / n) / (n - 1))  # the unbiased std, as torch.std; shifting leaves it unchanged
    if shift:
        net.shift_factor.fill_(mean)
        log.info(f"shift_factor = mean(z) = {mean:.5f} (from {int(n)} latent values)")
    if scale:
        net.scale_factor.fill_(1.0 / std)
        what = "z - shift" if float(net.shift_factor) else "z"
        log.info(f"scale_factor = 1/std({what}) = {1.0 / std:.5f} (from {int(n)} latent values)")
    return float(net.scale_factor)


def take_latent_factors(net: LatentDiffusionModel, found: tuple[float | None, float | None], given_scale: float | None,
                        given_shift: float | None) -> tuple[bool, bool]:
    """The latent space (scale, shift) of an ``init_from`` file (its latents are what its backbone was trained on)
    into ``net``: both the file's, unless ``model.scale_factor`` was given, which makes the config's scale and
    shift the latent space. A file with a scale and no shift (SD 1.x / 2.x / XL) has shift 0. Returns whether
    ``net`` now holds a scale and a shift that must not be estimated."""
    scale, shift = found
    if scale is None:
        log.info("init_from: the file stores no scale factor; it is estimated from the training data")
        return False, given_shift is not None
    shift = shift or 0.0
    if given_scale is not None:
        if abs(scale - float(given_scale)) > 1e-6 * abs(scale):
            log.warning(f"init_from: model.scale_factor={given_scale} is used, not the file's {scale:.5f}")
        if given_shift is not None and abs(shift - float(given_shift)) > 1e-6 * max(abs(shift), 1e-6):
            log.warning(f"init_from: model.shift_factor={given_shift} is used, not the file's {shift:.5f}")
        return True, given_shift is not None
    if given_shift not in (None, 0.0) and abs(shift - float(given_shift)) > 1e-6 * max(abs(shift), 1e-6):
        log.warning(f"init_from: the file's shift_factor {shift:.5f} is used with its scale, not "
                    f"model.shift_factor={given_shift} (give model.scale_factor too to use the config's)")
    net.scale_factor.fill_(scale)
    net.shift_factor.fill_(shift)
    log.info(f"scale_factor = {scale:.5f}, shift_factor = {shift:.5f}, the init_from file's (not re-estimated)")
    return True, True
