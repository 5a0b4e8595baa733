"""The latent scale factor of a latent diffusion model: 1 / std of its training latents, estimated once at the
start of training (pooled over ranks), or the one of the file it starts from; a resumed run keeps its own."""

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
def estimate_scale_factor(trainer: L.Trainer, net: LatentDiffusionModel, batches: int) -> float:
    """1 / std of the latents over ``batches`` global training batches (each rank's share, every accumulated
    part), pooled over all ranks, set in ``net``: the same samples on any number of ranks.

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
    std = math.sqrt((ss - s * s / n) / (n - 1))  # the unbiased std, as torch.std
    net.scale_factor.fill_(1.0 / std)
    log.info(f"scale_factor = 1/std(z) = {1.0 / std:.5f} (from {int(n)} latent values)")
    return 1.0 / std


def take_scale_factor(net: LatentDiffusionModel, found: float | None, given: float | None) -> bool:
    """The scale factor of an ``init_from`` file (its latents are what its backbone was trained on) into ``net``,
    unless one was given; returns whether ``net`` now holds a scale factor that must not be estimated."""
    if found is None:
        log.info("init_from: the file stores no scale factor; it is estimated from the training data")
        return False
    if given is not None:
        if abs(found - float(given)) > 1e-6 * abs(found):
            log.warning(f"init_from: model.scale_factor={given} is used, not the file's {found:.5f}")
        return True
    net.scale_factor.fill_(found)
    log.info(f"scale_factor = {found:.5f}, the init_from file's (not re-estimated)")
    return True
