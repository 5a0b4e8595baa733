"""What a shapes autoencoder lets through: the adherence oracle on its reconstructions of the val images.

    python benchmarks/vae_adherence.py logs/quickstart/vae/checkpoints/last.ckpt [--num 192]

A latent diffusion model cannot show a shape better than its decoder draws it, so these figures cap the prompt
adherence of every LDM trained on that autoencoder's latents. ``describe()`` (the pixel oracle of the shapes data)
reads colour, shape, position and background from the true val images, from their reconstructions (the
posterior mode, decoded) and, for scale, from the true images blurred by 2x (bilinear down, then up); it prints
the rates and the shape confusion of the reconstructions.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F

from sdlight.callbacks.adherence import score_scene
from sdlight.checkpoints import load_autoencoder
from sdlight.data.shapes import Scene, ShapesDataset, describe

ATTRIBUTES = ("colour", "shape", "position", "background")


def rates(dataset: ShapesDataset, found: list[Scene]) -> dict[str, float]:
    """Attribute rates of the scenes read from images ``0..n`` of ``dataset``."""
    counts = Counter()
    for i, scene in enumerate(found):
        counts.update(score_scene(dataset.scene(i), scene))
    return {name: counts[name] / counts["shapes" if name != "background" else "images"] for name in ATTRIBUTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a stage-1 checkpoint trained on data=shapes (one shape per image)")
    parser.add_argument("--num", type=int, default=192, help="val images (default: 192, the adherence set)")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()

    vae = load_autoencoder(args.ckpt).eval()
    dataset = ShapesDataset("val", length=args.num, image_size=args.image_size)
    real = torch.stack([dataset[i]["image"] for i in range(args.num)])
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(chunk).mode()) for chunk in real.split(64)]).clamp(-1, 1)
    blurred = F.interpolate(F.interpolate(real, scale_factor=0.5, mode="bilinear", antialias=True),
                            scale_factor=2, mode="bilinear")
    print(f"{args.ckpt}: {args.num} val images, latents {tuple(vae.encode(real[:1]).mode().shape[1:])}")
    print(f"{'images':<16}" + "".join(f"{a:>12}" for a in ATTRIBUTES))
    read = {name: [describe(image) for image in images]
            for name, images in (("true", real), ("reconstructed", recon), ("blurred 2x", blurred))}
    for name, found in read.items():
        print(f"{name:<16}" + "".join(f"{r:>11.0%} " for r in rates(dataset, found).values()))
    confusion = Counter((dataset.scene(i).shapes[0].shape, scene.shapes[0].shape if scene.shapes else "none")
                        for i, scene in enumerate(read["reconstructed"]))
    print("reconstructed shapes (true -> read):",
          ", ".join(f"{t}->{f} {n}" for (t, f), n in sorted(confusion.items())))


if __name__ == "__main__":
    main()
