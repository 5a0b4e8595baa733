"""Prompt adherence on the embedded shapes data: do generated samples show what they were asked for?

The pixel oracle :func:`sdlight.data.shapes.describe` reads colour, shape, position and background back from
each sample; the truth is the ``attributes`` of the val items the samples were conditioned on. No pretrained
network is involved, so this runs offline and in CI, and it separates "pretty" from "follows the prompt".
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from sdlight.callbacks.sampling import SampleEvaluationCallback, condition_keys
from sdlight.data.shapes import (BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, Scene, ShapeSpec,
                                 attribute_vocab_sizes, describe)

ATTRIBUTES = ("colour", "shape", "position", "background", "all")
_COUNTS = ("colour", "shape", "position", "shapes", "background", "all", "images")


def max_shapes_of(attributes: Tensor) -> int:
    """Shapes per scene encoded by ``(B, A)`` attribute ids: ``A = 3 · max_shapes + 1``."""
    width = attributes.shape[-1]
    if width < 4 or (width - 1) % 3:
        raise ValueError(f"attributes of width {width} are not shapes-scene attributes (3 per shape + background)")
    return (width - 1) // 3


def scene_from_attributes(ids: Sequence[int], max_shapes: int = 1) -> Scene:
    """Inverse of :func:`sdlight.data.shapes.scene_attributes` (slots holding the "absent" id are skipped)."""
    ids = [int(i) for i in ids]
    if len(ids) != 3 * max_shapes + 1:
        raise ValueError(f"expected {3 * max_shapes + 1} attribute ids, got {len(ids)}")
    for value, size in zip(ids, attribute_vocab_sizes(max_shapes)):
        if not 0 <= value < size:
            raise ValueError(f"attribute id {value} out of range [0, {size})")
    shapes = []
    for k in range(max_shapes):
        shape, colour, position = ids[3 * k: 3 * k + 3]
        if shape < len(SHAPES):
            shapes.append(ShapeSpec(SHAPES[shape], COLOUR_NAMES[colour], POSITIONS[position]))
    return Scene(tuple(shapes), BACKGROUND_NAMES[ids[-1]])


def _matches(truth: ShapeSpec, found: ShapeSpec | None) -> tuple[int, int, int]:
    if found is None:
        return 0, 0, 0
    return int(truth.colour == found.colour), int(truth.shape == found.shape), int(truth.position == found.position)


def score_scene(truth: Scene, found: Scene) -> dict[str, int]:
    """Correct-attribute counts of one sample: the found shapes are paired with the true ones so that the
    most attributes agree (order in a caption carries no meaning); a missing shape gets nothing right.
    ``all`` also needs exactly the true number of shapes."""
    n = len(truth.shapes)
    candidates: list[ShapeSpec | None] = list(found.shapes) + [None] * n
    best = (0, 0, 0)
    for pairing in itertools.permutations(candidates, n):
        hits = [_matches(t, f) for t, f in zip(truth.shapes, pairing)]
        totals = tuple(sum(h[i] for h in hits) for i in range(3))
        if sum(totals) > sum(best):
            best = totals
    background = int(truth.background == found.background)
    everything = int(background and len(found.shapes) == n and sum(best) == 3 * n)
    return {"colour": best[0], "shape": best[1], "position": best[2], "shapes": n, "background": background,
            "all": everything, "images": 1}


def chance_rates(truths: Sequence[Scene]) -> dict[str, float]:
    """What uniform guessing of every attribute scores on these scenes (``all``: every guess right)."""
    per_shape = 1 / (len(SHAPES) * len(COLOUR_NAMES) * len(POSITIONS))
    everything = sum(per_shape ** len(t.shapes) for t in truths) / (len(BACKGROUND_NAMES) * max(len(truths), 1))
    return {"colour": 1 / len(COLOUR_NAMES), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
            "background": 1 / len(BACKGROUND_NAMES), "all": everything}


class PromptAdherenceCallback(SampleEvaluationCallback):
    """Logs ``val/adherence/{colour,shape,position,background,all}``: the fraction of true shapes whose colour /
    shape / position the sample shows, of samples with the right background, and of samples entirely right.

    Samples are generated from the val items' ``condition_keys`` entries (text, label, attributes …); the truth
    is the same items' ``attributes``. The chance rates are logged once, as ``val/adherence/chance/*``.
    """

    def __init__(self, every_n_steps: int | None = 500, num_samples: int = 256, batch_size: int = 64,
                 steps: int | None = 50, guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                 at_train_end: bool = True, truth_key: str = "attributes") -> None:
        super().__init__(every_n_steps, num_samples, batch_size, steps, guidance_scale, seed, use_ema, at_train_end)
        self.truth_key = truth_key
        self.chance_logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "generate"):
            raise TypeError(f"PromptAdherenceCallback scores generated samples; {type(pl_module).__name__} "
                            "has no generate()")
        if not condition_keys(pl_module):
            raise ValueError("PromptAdherenceCallback needs a conditional module (it has no condition_keys)")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        conditions = self.conditions(trainer, list(dict.fromkeys([self.truth_key, *condition_keys(pl_module)])))
        counts = dict.fromkeys(_COUNTS, 0)
        chance_all = 0.0
        for chunk, images in self.generate(trainer, pl_module, conditions, "Adherence: sampling"):
            attributes = torch.as_tensor(chunk[self.truth_key])
            max_shapes = max_shapes_of(attributes)
            for image, ids in zip(images.cpu(), attributes.tolist()):
                truth = scene_from_attributes(ids, max_shapes)
                for name, value in score_scene(truth, describe(image, max_shapes=max_shapes)).items():
                    counts[name] += value
                chance_all += chance_rates([truth])["all"]
        totals = torch.tensor([*(float(counts[c]) for c in _COUNTS), chance_all], dtype=torch.float64,
                              device=pl_module.device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        summed = dict(zip((*_COUNTS, "chance_all"), totals.tolist()))
        shapes, images = max(summed["shapes"], 1), max(summed["images"], 1)
        out = {f"val/adherence/{name}": summed[name] / shapes for name in ("colour", "shape", "position")}
        out.update({"val/adherence/background": summed["background"] / images,
                    "val/adherence/all": summed["all"] / images})
        if not self.chance_logged:
            chance = chance_rates([])
            chance["all"] = summed["chance_all"] / images
            out.update({f"val/adherence/chance/{name}": value for name, value in chance.items()})
            self.chance_logged = True
        return out
