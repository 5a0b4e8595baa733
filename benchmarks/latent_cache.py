"""Stage-2 training throughput from a latent cache vs encoding the images on the fly, in one run.

    python benchmarks/latent_cache.py                      # quickstart size and the SD-like size
    python benchmarks/latent_cache.py --only quickstart --steps 2   # a quick check

For each size it writes images, encodes them once with sdlight.encode's ``encode_dataset`` (timing that too),
then times training steps (next batch from the loader, loss, backward, AdamW step) of the same latent diffusion
fed by the image datamodule (the frozen VAE encodes every batch) and by ``data=latents``, alternating one step
of each so that other load on the machine hits both alike; one warm-up step each is not timed. Random-init
networks: speed does not depend on the weights.

- quickstart: shapes at 32 px, the tiny f=4 VAE (kl_f4_tiny), the tiny UNet, a learned text encoder, batch 64.
- sd_like: random smooth JPEGs at 256 px through data=folder, the Stable Diffusion VAE architecture (kl_f8,
  32x32x4 latents), a mid-size UNet (128 channels, mult 1-2-4, attention at 16x16 and 8x8), batch 4.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlight.conditioning import LearnedTextEncoder
from sdlight.data.datamodules import ShapesDataModule
from sdlight.data.folder import FolderDataModule
from sdlight.data.latents import LatentsDataModule
from sdlight.diffusion import NoiseSchedule
from sdlight.encode import encode_dataset
from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.unet import UNetModel
from sdlight.models.latent_diffusion import LatentDiffusionModel, build_latent_diffusion
from sdlight.optim import build_optimizer, decay_groups

KL_F4_TINY = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4,
                  resolution=32)
KL_F8 = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], z_channels=4, embed_dim=4,
             resolution=256)
UNET_TINY = dict(model_channels=64, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                 num_head_channels=32, context_dim=64)
UNET_MID = dict(model_channels=128, attention_resolutions=[2, 4], num_res_blocks=1, channel_mult=[1, 2, 4],
                num_head_channels=64, context_dim=256)


def write_jpegs(root: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(root / f"{i:05d}.jpg", "JPEG", quality=90)
        (root / f"{i:05d}.txt").write_text(f"image number {i}")


def build(vae: dict, unet: dict, latent: int, image_size: int) -> LatentDiffusionModel:
    torch.manual_seed(0)
    text = LearnedTextEncoder(max_length=32, width=128, layers=2, heads=4, context_dim=unet["context_dim"])
    net = UNetModel(image_size=latent, in_channels=4, out_channels=4, use_spatial_transformer=True,
                    use_linear_in_transformer=True, transformer_depth=1, legacy=False, **unet)
    return build_latent_diffusion(unet=net, first_stage=AutoencoderKL(**vae), conditioning=text, scale_factor=0.2,
                                  schedule=NoiseSchedule.make("linear", 1000, 1e-4, 2e-2), image_size=image_size)


def step_times(model: LatentDiffusionModel, loaders: dict[str, iter], steps: int) -> dict[str, list[float]]:
    optimizer = build_optimizer(partial(torch.optim.AdamW, lr=1e-4), decay_groups(model))
    times: dict[str, list[float]] = {name: [] for name in loaders}
    model.train()
    for i in range(steps + 1):  # the first round warms up
        for name, batches in loaders.items():
            start = time.perf_counter()
            batch = next(batches)
            loss = model.losses(batch, p_uncond=0.1)[0].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - start)
    return times


def run(name: str, images_dm, vae: dict, unet: dict, latent: int, steps: int, tmp: Path) -> None:
    model = build(vae, unet, latent, images_dm.image_size)
    n = images_dm.batch_size * (steps + 1)
    start = time.perf_counter()
    manifest = encode_dataset(model.first_stage_model, images_dm, tmp / f"{name}-cache", splits=("train",),
                              shard_size=1000, progress=False)
    encode_rate = manifest["splits"]["train"]["samples"] / (time.perf_counter() - start)
    cache = LatentsDataModule(root=str(tmp / f"{name}-cache"), batch_size=images_dm.batch_size, num_workers=0,
                              shuffle_buffer=n)
    images_dm.setup()
    cache.setup()

    def forever(dm):
        while True:
            for batch in dm.train_dataloader():
                yield dm.on_before_batch_transfer(batch, 0)

    times = step_times(model, {"images": forever(images_dm), "cache": forever(cache)}, steps)
    t_img, t_cache = (statistics.median(times[k]) for k in ("images", "cache"))
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    bs = images_dm.batch_size
    print(f"| {name} | {images_dm.image_size} px, {latent}x{latent}x4 | {params:.1f} M | {bs} | "
          f"{bs / t_img:.2f} | {bs / t_cache:.2f} | **{t_img / t_cache:.2f}x** | {manifest['bytes_per_image']:.0f} "
          f"| {encode_rate:.1f} |")
    print(f"  ({name}: median step {t_img:.3f} s on the fly vs {t_cache:.3f} s from the cache over {steps} steps; "
          f"storage error {manifest['storage_error']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per source and size")
    parser.add_argument("--only", choices=["quickstart", "sd_like"], default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| size | images → latents | UNet params | batch | img/s on the fly | img/s from cache | ratio "
          "| cache bytes/image | encode img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.only in (None, "quickstart"):
            dm = ShapesDataModule(train_size=64 * (args.steps + 1), val_size=0, image_size=32, batch_size=64)
            run("quickstart", dm, KL_F4_TINY, UNET_TINY, 8, args.steps, tmp)
        if args.only in (None, "sd_like"):
            folder = tmp / "jpegs"
            folder.mkdir()
            write_jpegs(folder, 4 * (args.steps + 1), 256)
            dm = FolderDataModule(root=str(folder), val_fraction=0, image_size=256, batch_size=4, num_workers=0,
                                  crop="center")
            run("sd_like", dm, KL_F8, UNET_MID, 32, args.steps, tmp)


if __name__ == "__main__":
    main()
