import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.data.datamodules import ShapesDataModule
from sdlight.errors import UsageError
from sdlight.data.shapes import (BACKGROUNDS, COLOURS, NUM_CLASSES, POSITIONS, SHAPES, Scene, ShapesDataset,
                                 ShapeSpec, attribute_vocab_sizes, describe, make_sample, render, scene_attributes,
                                 scene_label)


@pytest.mark.parametrize("max_shapes,image_size", [(1, 32), (2, 32), (1, 64)])
def test_describe_recovers_ground_truth(max_shapes, image_size):
    n, correct = 400, 0
    for i in range(n):
        img, scene = make_sample(i, "train", seed=3, max_shapes=max_shapes, image_size=image_size)
        got = describe(img, max_shapes=max_shapes)
        correct += set(got.shapes) == set(scene.shapes) and got.background == scene.background
    assert correct / n >= 0.99


def test_describe_accepts_tensor_and_array_and_detects_every_attribute():
    for shape in SHAPES:
        for colour in COLOURS:
            for pos in ("top left", "middle center", "bottom right"):
                scene = Scene((ShapeSpec(shape, colour, pos),), "white")
                img = render(scene, 32)
                tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
                assert describe(tensor) == scene
                assert describe(np.asarray(img)) == scene


def test_describe_of_a_blank_image_finds_no_shape():
    blank = torch.ones(3, 32, 32)
    assert describe(blank) == Scene((), "white")
    with pytest.raises(ValueError, match="image"):
        describe(torch.zeros(32, 32))


def test_samples_are_deterministic_and_splits_disjoint():
    a = ShapesDataset("train", 50, seed=1)[7]
    b = ShapesDataset("train", 50, seed=1)[7]
    assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
    train = {ShapesDataset("train", 2000, seed=1)[i]["image"].numpy().tobytes() for i in range(2000)}
    val = {ShapesDataset("val", 300, seed=1)[i]["image"].numpy().tobytes() for i in range(300)}
    assert not train & val
    # another seed gives other data
    assert not torch.equal(ShapesDataset("train", 50, seed=2)[7]["image"], a["image"]) or \
        ShapesDataset("train", 50, seed=2)[7]["text"] != a["text"]


def test_item_fields_are_consistent():
    ds = ShapesDataset("val", 20, max_shapes=2, seed=0)
    sizes = attribute_vocab_sizes(2)
    for i in range(20):
        item = ds[i]
        scene = ds.scene(i)
        assert item["image"].shape == (3, 32, 32)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["text"] == scene.caption()
        assert item["label"] == scene_label(scene) < NUM_CLASSES
        assert item["attributes"].tolist() == scene_attributes(scene, 2)
        assert all(0 <= a < s for a, s in zip(item["attributes"].tolist(), sizes))
        assert item["text"].endswith(f"on a {scene.background} background")
    assert sizes == [len(SHAPES), len(COLOURS), len(POSITIONS), len(SHAPES) + 1, len(COLOURS) + 1,
                     len(POSITIONS) + 1, len(BACKGROUNDS)]


def test_caption_wording():
    scene = Scene((ShapeSpec("circle", "red", "top left"), ShapeSpec("square", "orange", "middle center")), "gray")
    assert scene.caption() == "a red circle at the top left and an orange square in the center on a gray background"


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesDataset("train", max_shapes=3)


def test_datamodule_batches():
    dm = ShapesDataModule(batch_size=8, train_size=64, val_size=16, image_size=48)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 48, 48)
    assert len(batch["text"]) == 8 and isinstance(batch["text"][0], str)
    assert batch["label"].dtype == torch.long and batch["attributes"].shape == (8, 4)
    assert len(dm.val_dataloader()) == 2


@pytest.mark.parametrize("option, value, says", [
    ("batch_size", 0, "data.batch_size=0: must be an integer >= 1"),
    ("batch_size", "abc", "data.batch_size=abc: must be an integer >= 1"),
    ("num_workers", -1, "data.num_workers=-1: must be an integer >= 0"),
    ("image_size", 0, "data.image_size=0: must be an integer >= 1"),
    ("train_size", 0, "data.train_size=0: must be an integer >= 1"),
    ("val_size", -1, "data.val_size=-1: must be an integer >= 0"),
])
def test_datamodule_options_out_of_range_are_usage_errors(option, value, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        ShapesDataModule(**{option: value})


def test_default_workers_are_no_more_than_the_cpus_granted(monkeypatch):
    """num_workers=null (data=folder, webdataset, latents): one loader process per CPU granted, at most 4."""
    import sdlight.data.base as base

    for cpus, workers in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(base, "available_cpus", lambda: cpus)
        assert ShapesDataModule(num_workers=None).num_workers == workers
    assert ShapesDataModule(num_workers=8).num_workers == 8  # asked for: kept
    conf = Path(__file__).resolve().parents[2] / "conf" / "data"
    for name in ("folder", "webdataset", "latents"):
        assert "\nnum_workers: null " in (conf / f"{name}.yaml").read_text()


def test_geometry_reads_the_size_and_centre_a_scene_was_drawn_with():
    from sdlight.data.shapes import Scene, ShapeSpec, geometry, render

    scene = Scene((ShapeSpec("square", "red", "middle center"),), "white")
    size, cx, cy = geometry(render(scene, 96))  # no jitter: the centre cell, 0.7-0.9 of it
    assert 0.7 * 32 - 1 <= size <= 0.9 * 32 + 1 and abs(cx - 47.5) < 2 and abs(cy - 47.5) < 2
    assert geometry(Image.new("RGB", (32, 32), (255, 255, 255))) is None


def test_spread_of_copies_is_zero_and_of_the_data_its_jitter():
    from sdlight.data.shapes import Scene, ShapeSpec, data_geometries, geometry, render, spread

    scenes = [Scene((ShapeSpec(s, c, p),), "black") for s, c, p in
              (("circle", "red", "top left"), ("square", "blue", "bottom right"), ("diamond", "green", "middle center"))]
    data = spread([data_geometries(scene, 16, 64) for scene in scenes])
    # render jitters the size uniformly in 0.7-0.9 of a 21.3 px cell: a side's std 1.23 px (area's root: a bit less
    # for the round shapes) and the centre within +-0.8 of the slack, std ~1.0 px
    assert 0.6 < data["size"] < 1.6 and 0.5 < data["offset"] < 1.6 and data["groups"] == 3
    copies = spread([[geometry(render(scene, 64))] * 8 for scene in scenes])
    assert copies["size"] == 0 and copies["offset"] == 0
    with pytest.raises(ValueError, match="no group has two images"):
        spread([[None, None], [geometry(render(scenes[0], 64))]])
