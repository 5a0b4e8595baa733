"""Image grids to every logger that takes images (W&B, TensorBoard) and to the run directory on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from PIL import Image

from sdlight.pixels import to_uint8
from sdlight.stages.sharding import is_sharded


def to_grid(rows: list[torch.Tensor], nrow: int | None = None) -> torch.Tensor:
    """Stacks equally sized image batches in [-1, 1] into one (3, H, W) grid in [-1, 1] (black padding); one row
    per batch."""
    images = torch.cat([r.detach().float().cpu() for r in rows]).clamp(-1, 1)
    return torchvision.utils.make_grid(images, nrow=nrow or rows[0].shape[0], padding=1, pad_value=-1.0)


def log_grid(module: L.LightningModule, key: str, grid: torch.Tensor, caption: str | None = None) -> Path | None:
    """Writes ``grid`` (in [-1, 1]) as ``<run dir>/images/<key>_<step>.png`` and sends it to image-capable loggers.

    Every logger gets the same 8-bit picture (:func:`sdlight.pixels.to_uint8`) as the file on disk
    (``wandb.Image`` does not rescale float tensors). Only rank 0 writes. Returns the PNG path (None on other
    ranks or without a trainer).
    """
    trainer = module._trainer
    if trainer is None or not trainer.is_global_zero:
        return None
    step = trainer.global_step
    u8 = to_uint8(grid)
    picture = Image.fromarray(u8.permute(1, 2, 0).numpy())
    for lg in trainer.loggers:
        if hasattr(lg, "log_image"):  # WandbLogger
            extra = {"caption": [caption]} if caption else {}  # WandbLogger takes no caption=None
            lg.log_image(key=key, images=[picture], step=step, **extra)
        elif hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
            lg.experiment.add_image(key, u8, global_step=step)  # uint8: TensorBoard does not rescale it
    path = Path(trainer.default_root_dir, "images", f"{key.replace('/', '_')}_{step:07d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def log_sample_grid(module: L.LightningModule, batch: dict[str, Any] | None = None) -> None:
    """A latent diffusion stage's grid of samples for fixed conditions (its ``log_conditions``, else the batch's
    first ones), with its EMA weights, logged by rank 0; inpainting / super-resolution models show their input
    row too."""
    net = module.net
    if module._trainer is None or net.sampler is None:
        return
    # sharded weights (trainer=fsdp) are gathered from every rank at each forward: all ranks sample, rank 0 logs
    if not (module.trainer.is_global_zero or is_sharded(net.model)):
        return
    n = module.num_log_samples
    conditions = None
    if net.condition_keys:
        try:
            conditions = net.condition_values(module.log_conditions or batch or {})
        except KeyError:
            return  # no fixed conditions and no batch to take them from
        n = min(n, *(len(v) for v in conditions.values()))
    gen = torch.Generator(device="cpu").manual_seed(0)
    concat, rows = None, []
    if net.concat_stage is not None:  # inpainting / super-resolution: the batch's images are the inputs
        if batch is None:
            return
        n = min(n, batch["image"].shape[0])
        part = {k: v[:n] for k, v in batch.items()}
        concat = net.make_concat(net.concat_stage.training_inputs(part, gen), gen)
        rows = [part["image"]]
    conditions = {k: v[:n] for k, v in conditions.items()} if conditions is not None else None
    x_T = torch.randn((n, *net.latent_shape), generator=gen)
    images = module.generate(conditions, n if conditions is None else None, x_T=x_T, generator=gen, concat=concat)
    captions = [v for v in (conditions or {}).values() if isinstance(v, list)]  # prompts; ids are not captions
    caption = " | ".join(map(str, captions[0])) if captions else None
    log_grid(module, "samples", to_grid(rows + [images], nrow=n), caption=caption)
