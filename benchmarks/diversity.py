"""Diversity of a shapes model's samples: how much the samples of one caption vary in the shape's size and place
within its grid cell, against how much the data varies (the same scene rendered with other jitter draws).

    python -m benchmarks.diversity logs/quickstart/ldm/checkpoints/last.ckpt [more.ckpt ...] [--scenes 16]

For each checkpoint: the first ``--scenes`` val scenes' captions, ``--samples`` samples each (one seed, distinct
noise per sample; the model's own sampler, ``--steps``, guidance ``--guidance``), each read by the shapes oracle's
`geometry` (the largest coloured shape's linear size and centroid). Printed: the mean within-caption standard
deviation of size and of the centroid (px), the data's for the same scenes, and their ratio (1: as diverse as the
data; 0: copies).
"""

from __future__ import annotations

import argparse
import time

import torch

from sdlight.data.shapes import ShapesDataset, data_geometries, geometry, spread
from sdlight.pipeline import Pipeline


def measure(ckpt: str, scenes: list, samples: int, steps: int, guidance: float, seed: int) -> dict[str, float]:
    pipe = Pipeline.from_checkpoint(ckpt, device="cpu")
    groups = []
    for scene in scenes:
        images = pipe([scene.caption()], num_samples=samples, steps=steps, guidance_scale=guidance, seed=seed).images
        groups.append([geometry(image) for image in images])
    found = sum(g is not None for group in groups for g in group) / (len(scenes) * samples)
    return {**spread(groups), "found": found, "objective": pipe.model.objective.name,
            "size_px": pipe.model.image_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    val = ShapesDataset("val", length=args.scenes)
    scenes = [val.scene(i) for i in range(args.scenes)]
    print("| checkpoint | objective | size std (px) | offset std (px) | data size std | data offset std | "
          "size ratio | offset ratio | shape found |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ckpt in args.ckpts:
        start = time.perf_counter()
        got = measure(ckpt, scenes, args.samples, args.steps, args.guidance, args.seed)
        data = spread([data_geometries(scene, args.samples, got["size_px"], args.seed) for scene in scenes])
        print(f"| `{ckpt}` | {got['objective']} | {got['size']:.2f} | {got['offset']:.2f} | {data['size']:.2f} | "
              f"{data['offset']:.2f} | **{got['size'] / data['size']:.2f}** | **{got['offset'] / data['offset']:.2f}** "
              f"| {got['found']:.0%} |", flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
