"""PromptAdherenceCallback on the shapes data: true renderings score 1, wrong colours score 0 on colour, chance
rates are the closed-form ones, and the scoring pairs shapes regardless of their order."""

import lightning as L
import numpy as np
import pytest
import torch

from sdlight.callbacks.adherence import PromptAdherenceCallback, scene_from_attributes, score_scene
from sdlight.data.datamodules import ShapesDataModule
from sdlight.data.shapes import COLOUR_NAMES, SHAPES, Scene, ShapeSpec, make_sample, render, scene_attributes


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


class SceneRenderingTestModule(L.LightningModule):
    """Test double of a stage-2 module: draws the scene its condition asks for, optionally with the wrong colour.

    Conditioned on ``attributes`` it draws the whole scene; on ``label`` (shape x colour) it can only draw that
    shape in that colour, in the centre of a white image.
    """

    def __init__(self, condition_key="attributes", colour_shift=0, max_shapes=1):
        super().__init__()
        self.condition_key, self.condition_keys = condition_key, [condition_key]
        self.colour_shift, self.max_shapes = colour_shift, max_shapes
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 2)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def scene(self, condition):
        if self.condition_key == "label":
            label = int(condition)
            return Scene((ShapeSpec(SHAPES[label // len(COLOUR_NAMES)], COLOUR_NAMES[label % len(COLOUR_NAMES)],
                                    "middle center"),), "white")
        return scene_from_attributes(condition.tolist(), self.max_shapes)

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        images = []
        for condition in conditions[self.condition_key]:
            scene = self.scene(condition)
            shifted = tuple(ShapeSpec(s.shape, COLOUR_NAMES[(COLOUR_NAMES.index(s.colour) + self.colour_shift) % 6],
                                      s.position) for s in scene.shapes)
            images.append(to_tensor(render(Scene(shifted, scene.background), 32)))
        return torch.stack(images)


def evaluate(module, max_shapes=1, num_samples=24):
    data = ShapesDataModule(train_size=16, val_size=num_samples, max_shapes=max_shapes, batch_size=8, image_size=32)
    callback = PromptAdherenceCallback(every_n_steps=None, num_samples=num_samples, batch_size=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    prefix = "val/adherence/"
    return {k[len(prefix):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def test_true_renderings_score_one_and_chance_rates_are_logged():
    got = evaluate(SceneRenderingTestModule())
    for name in ("colour", "shape", "position", "background", "all"):
        assert got[name] == 1.0, name
    assert got["chance/colour"] == pytest.approx(1 / 6) and got["chance/shape"] == pytest.approx(1 / 4)
    assert got["chance/position"] == pytest.approx(1 / 9) and got["chance/background"] == pytest.approx(1 / 3)
    assert got["chance/all"] == pytest.approx(1 / (6 * 4 * 9 * 3))


def test_wrong_colours_score_zero_on_colour_only():
    got = evaluate(SceneRenderingTestModule(colour_shift=1))
    assert got["colour"] == 0.0 and got["all"] == 0.0
    assert got["shape"] == 1.0 and got["position"] == 1.0 and got["background"] == 1.0


def test_truth_comes_from_the_attributes_not_the_condition():
    # conditioned on the class label alone: colour and shape are right, position and background mostly not
    got = evaluate(SceneRenderingTestModule(condition_key="label"), num_samples=32)
    assert got["colour"] == 1.0 and got["shape"] == 1.0
    assert got["position"] < 0.4 and got["background"] < 0.6 and got["all"] < 0.2


def test_two_shape_scenes():
    got = evaluate(SceneRenderingTestModule(max_shapes=2), max_shapes=2, num_samples=16)
    assert all(got[name] == 1.0 for name in ("colour", "shape", "position", "background", "all"))
    expected_all = np.mean([(1 / 3) * (1 / 216) ** len(make_sample(i, "val", 0, 2, 32)[1].shapes) for i in range(16)])
    assert got["chance/all"] == pytest.approx(expected_all)


def test_attributes_round_trip_to_scenes():
    for max_shapes in (1, 2):
        for i in range(30):
            _, scene = make_sample(i, "train", seed=4, max_shapes=max_shapes)
            assert scene_from_attributes(scene_attributes(scene, max_shapes), max_shapes) == scene
    with pytest.raises(ValueError, match="out of range"):
        scene_from_attributes([4, 0, 0, 0], 1)
    with pytest.raises(ValueError, match="expected 4"):
        scene_from_attributes([0, 0, 0], 1)


def test_scoring_pairs_shapes_in_any_order():
    a, b = ShapeSpec("circle", "red", "top left"), ShapeSpec("square", "blue", "bottom right")
    truth = Scene((a, b), "white")
    assert score_scene(truth, Scene((b, a), "white")) == {"colour": 2, "shape": 2, "position": 2, "shapes": 2,
                                                          "background": 1, "all": 1, "images": 1}
    missing = score_scene(truth, Scene((b,), "black"))
    assert (missing["colour"], missing["shape"], missing["position"], missing["background"], missing["all"]) == \
        (1, 1, 1, 0, 0)
    # an extra shape: every asked-for attribute is there, but the scene is not the one asked for
    extra = score_scene(Scene((a,), "white"), Scene((a, b), "white"))
    assert extra["colour"] == extra["shape"] == extra["position"] == 1 and extra["all"] == 0
    wrong_shape = score_scene(Scene((a,), "white"), Scene((ShapeSpec("triangle", "red", "top left"),), "white"))
    assert (wrong_shape["colour"], wrong_shape["shape"], wrong_shape["all"]) == (1, 0, 0)

