"""data=folder on real files written here: captions, labels, splits, broken inputs, training, DDP."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from sdlight.data.folder import FolderDataModule, scan_folder, split_of
from sdlight.data.skips import SKIPPED, TooManySkipped
from sdlight.errors import UsageError

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from conftest import TINY_TEXT_LDM, random_stage1_checkpoint, train_tiny_text_ldm  # noqa: E402
from imagefiles import (GOOD_IMAGES, image_bytes, make_image_folder, under_trainer, write_image,  # noqa: E402
                        write_shards)

SIZES = {name: size for name, _, size in GOOD_IMAGES}  # file name -> (width, height)


@pytest.fixture
def image_folder(tmp_path):
    """Factory: image_folder(classes, per_class[, root]) → a folder of good, captioned images (tmp_path/images)."""
    return lambda classes=("cat", "dog"), per_class=5, root=None: make_image_folder(
        root or tmp_path / "images", classes, per_class)


def batches(dm, split="train"):
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [dm.on_before_batch_transfer(b, 0) for b in loader]


def test_every_format_and_mode_gives_the_batch_shape(image_folder):
    root = image_folder(per_class=5)
    dm = FolderDataModule(root=str(root), image_size=16, batch_size=4, val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 10 and len(dm.val_set) == 0
    got = batches(dm)
    assert len(got) == 2  # 10 images, batch 4, drop_last for training
    for b in got:
        # the skip fields are taken out; the file's size and the crop's corner for SD-XL's micro-conditioning; the
        # item's index in the training set, which keys its training step's random draws
        assert set(b) == {"image", "text", "label", "key", "original_size", "crop_coords", "sample_index"}
        assert all(0 <= i < 10 for i in b["sample_index"].tolist())
        assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
        assert -1 <= b["image"].min() <= b["image"].max() <= 1
        assert b["label"].tolist() == [-1] * 4
        for key, text, hw, corner in zip(b["key"], b["text"], b["original_size"], b["crop_coords"]):
            assert text == f"a {key.split('/')[0]} number {key.split('/')[1].split('_')[0]}"
            w, h = SIZES[key.split("_", 1)[1]]  # the written file's size, even where a JPEG draft decoded less
            assert hw.tolist() == [h, w]
            scale = 16 / min(w, h)  # short side to 16, then the centre square
            assert corner.tolist() == [(max(16, round(h * scale)) - 16) // 2, (max(16, round(w * scale)) - 16) // 2]
    assert dm.skips.skipped == 0


def test_class_labels_from_the_first_sub_folder(image_folder):
    root = image_folder(classes=("zebra", "ant", "mole"), per_class=2)
    write_image(root / "ant" / "deeper" / "x.png").with_suffix(".txt").write_text("deep ant")
    dm = FolderDataModule(root=str(root), label_from="folder", val_fraction=0.0, batch_size=7, image_size=8)
    assert dm.num_classes == 3
    dm.setup()
    b = next(iter(dm.val_dataloader() if len(dm.val_set) else dm.train_dataloader()))
    classes = ["ant", "mole", "zebra"]  # sorted names → ids, as torchvision's ImageFolder
    for key, label in zip(b["key"], b["label"].tolist()):
        assert classes[label] == key.split("/")[0]
    assert "ant/deeper/x.png" in b["key"]


def test_captions_from_metadata_jsonl_and_captions_csv(tmp_path):
    for table in ("jsonl", "csv"):
        root = tmp_path / table
        for i in range(3):
            write_image(root / "sub" / f"{i}.png", seed=i)
        write_image(root / "sub" / "3.png").with_suffix(".txt").write_text("from the sidecar")  # sidecar wins
        rows = [("sub/0.png", "zero, with a comma"), ("sub/1.png", "one"), ("sub/3.png", "not this"),
                ("sub/9.png", "an orphan caption")]
        if table == "jsonl":
            (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f, "text": t}) for f, t in rows))
        else:
            (root / "captions.csv").write_text("file_name,text\n" + "".join(f'{f},"{t}"\n' for f, t in rows))
        scan = scan_folder(root)
        got = {r.rel: r.text if r.text_file is None else (root / r.text_file).read_text() for r in scan.records}
        assert got == {"sub/0.png": "zero, with a comma", "sub/1.png": "one", "sub/3.png": "from the sidecar"}
        assert sorted(scan.skipped) == ["sub/2.png: no caption (data.missing_caption=empty keeps it)",
                                        "sub/9.png: caption without an image"]
        assert {r.rel: r.text for r in scan_folder(root, missing_caption="empty").records}["sub/2.png"] == ""


def test_a_folder_without_any_caption_gives_empty_captions(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.jpg", seed=i)
    assert [r.text for r in scan_folder(tmp_path).records] == ["", "", ""]


def test_split_is_stable_by_path_hash_and_val_root_is_separate(image_folder, tmp_path):
    root = image_folder(per_class=10)
    dm = FolderDataModule(root=str(root), val_fraction=0.3, image_size=8)
    dm.setup()
    train = {r.rel for r in dm.train_set.dataset.records} if hasattr(dm.train_set, "dataset") else \
        {r.rel for r in dm.train_set.records}
    val = {r.rel for r in dm.val_set.records}
    assert train and val and not train & val and len(train | val) == 20
    assert all(split_of(rel, 0.3) == "val" for rel in val)
    write_image(root / "cat" / "new.png").with_suffix(".txt").write_text("new")  # adding files moves none
    dm2 = FolderDataModule(root=str(root), val_fraction=0.3, image_size=8)
    dm2.setup()
    assert val <= {r.rel for r in dm2.val_set.records}

    val_root = image_folder(classes=("dog",), per_class=3, root=tmp_path / "val")
    dm3 = FolderDataModule(root=str(root), val_root=str(val_root), label_from="folder", image_size=8)
    dm3.setup()
    assert len(dm3.train_set) == 21 and len(dm3.val_set) == 3
    assert next(iter(dm3.val_dataloader()))["label"].tolist() == [1, 1, 1]  # "dog" keeps the train id


def test_train_and_val_size_cap_the_splits(image_folder):
    dm = FolderDataModule(root=str(image_folder(per_class=10)), val_fraction=0.2, train_size=5, val_size=1)
    dm.setup()
    assert len(dm.train_set) == 5 and len(dm.val_set) == 1


def test_a_val_fraction_that_leaves_less_than_a_batch_is_refused(image_folder, tmp_path):
    root = image_folder(per_class=5)
    dm = under_trainer(FolderDataModule(root=str(root), val_fraction=0.5, batch_size=8, image_size=8))
    train = sum(split_of(r.rel, 0.5) == "train" for r in scan_folder(root).records)
    with pytest.raises(UsageError, match=re.escape(
            f"data.val_fraction=0.5 holds out {10 - train} of the 10 usable images under data.root={root}, leaving "
            f"{train} for training, fewer than one batch (data.batch_size=8 x 1 rank): lower data.val_fraction (0 "
            "trains on all), or give a separate validation folder with data.val_root")):
        dm.setup("fit")
    dm.setup("validate")  # evaluating needs no training images
    FolderDataModule(root=str(root), val_fraction=0.5, batch_size=train, image_size=8).setup()
    # a folder whose only image hashes into the validation share has none for training (was: "no usable images")
    one = tmp_path / "one"
    write_image(one / "a.png")
    assert split_of("a.png", 0.9) == "val"
    with pytest.raises(UsageError, match=r"holds out 1 of the 1 usable images .*, leaving none for training"):
        FolderDataModule(root=str(one), val_fraction=0.9, image_size=8).setup()


def write_broken(root: Path) -> list[str]:
    """Every kind of broken input next to good ones; returns what must be reported."""
    good = image_bytes("RGB", (64, 64), "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "cat" / "notes.png").write_text("this is text, not a PNG")
    (root / "dog" / "garbage.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 junk")
    for name in ("truncated", "zero", "notes"):
        (root / "cat" / f"{name}.txt").write_text("a caption")
    (root / "dog" / "garbage.txt").write_text("a caption")
    write_image(root / "dog" / "uncaptioned.png")
    (root / "dog" / "lonely.txt").write_text("a caption without an image")
    return ["truncated.jpg", "zero.png", "notes.png", "garbage.webp", "uncaptioned.png", "lonely.txt"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_files_are_replaced_and_counted(image_folder, num_workers, caplog):
    root = image_folder(per_class=8)
    names = write_broken(root)
    dm = FolderDataModule(root=str(root), val_fraction=0.0, batch_size=4, image_size=16, num_workers=num_workers,
                          max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="sdlight"):
        dm.setup()
    listing = "\n".join(r.message for r in caplog.records)
    assert "uncaptioned.png: no caption" in listing and "lonely.txt: caption without an image" in listing
    assert len(dm.train_set) == 20  # 16 good + 4 broken image files (found broken only when read)
    read_before = dm.skips.read
    raw = list(dm.train_dataloader())
    assert all(b["image"].shape == (4, 3, 16, 16) for b in raw)  # broken items replaced: full batches
    decoded = sum(int(b[SKIPPED].sum()) for b in raw)
    assert decoded >= 4  # all 20 indices are visited: each broken file was read (and replaced) at least once
    for b in raw:
        dm.on_before_batch_transfer(b, 0)
    assert dm.skips.skipped == 2 + decoded  # listing + decoding, counted across workers
    assert dm.skips.read > read_before
    assert all(any(n in e for n in names) for e in dm.skips.examples)


def test_too_many_broken_files_stop_with_a_clear_error(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    for i in range(5):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"nope")
    dm = FolderDataModule(root=str(tmp_path), val_fraction=0.0, batch_size=4, image_size=8, max_skip_fraction=0.2)
    dm.setup()
    for b in dm.train_dataloader():
        dm.on_before_batch_transfer(b, 0)
    with pytest.raises(TooManySkipped, match=r"skipped \d+ broken samples of \d+ read .*bad\d\.jpg"):
        dm.skips.check(dm.skips.skipped, dm.skips.read, final=True)
    # listing already shows it: more than the limit of the files lack captions
    for i in range(5):
        (tmp_path / f"c{i}.txt").write_text("x")
    with pytest.raises(TooManySkipped, match="max_skip_fraction"):
        FolderDataModule(root=str(tmp_path), max_skip_fraction=0.2).setup()
    with pytest.raises(ValueError, match="no such directory"):
        FolderDataModule(root=str(tmp_path / "missing")).setup()


# ------------------------------------------------------------------------------ training from a folder
TINY_TRAIN = ["data=folder", "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1", "logger=csv",
              "callbacks=none", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1"]


def test_quickstart_vae_trains_from_a_folder_and_logs_skips(image_folder, train_cfg, caplog):
    """Skips are logged as data/skipped; each broken file is named in one warning, not again in the next epoch
    that reads it (an image without a caption: by the listing alone)."""
    from sdlight.train import train

    root = image_folder(per_class=8)
    names = write_broken(root)
    cfg = train_cfg(["+experiment=quickstart_vae", f"data.root={root}", "data.image_size=32",
                     "data.max_skip_fraction=0.5", *TINY_TRAIN, "trainer.max_epochs=2"])
    with caplog.at_level(logging.WARNING, logger="sdlight"):
        metrics, objects = train(cfg)
    assert objects["trainer"].state.finished and objects["model"].batches >= 8
    assert float(metrics["data/skipped"]) > 2 + 4 and "val/psnr" in metrics  # broken images count at each read
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in names:
        assert sum(name in w for w in warnings) == 1, (name, warnings)


def test_class_ldm_trains_from_labelled_folders_and_refuses_unlabelled(image_folder, train_cfg, tmp_path):
    from sdlight.train import train

    root = image_folder(classes=("a", "b", "c"), per_class=4)
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    common = ["+experiment=digits_ldm", f"data.root={root}", f"model.first_stage.ckpt={vae}",
              "model.sample_every_n_steps=0", "model.conditioning.num_classes=3", *TINY_TRAIN]
    metrics, objects = train(train_cfg(common + ["data.label_from=folder"]))
    assert objects["trainer"].state.finished and "train/loss" in metrics
    with pytest.raises(ValueError, match="label_from=folder"):
        train(train_cfg(common))


def test_text_ldm_trains_from_a_folder(image_folder, train_cfg, tmp_path):
    assert "data.train_size=16" in TINY_TEXT_LDM  # the quickstart's sizes compose with data=folder
    root = image_folder(per_class=10)
    _, objects = train_tiny_text_ldm(tmp_path, ["data=folder", f"data.root={root}", "data.num_workers=0",
                                                "logger=none"])
    assert objects["trainer"].state.finished and len(objects["datamodule"].train_set) == 16


def test_ddp_ranks_see_disjoint_folder_samples(image_folder, train_cfg, tmp_path):
    from sdlight.train import train

    root = image_folder(per_class=8)
    cfg = train_cfg(["+experiment=quickstart_vae", f"data.root={root}", "data.val_fraction=0", "trainer=ddp_sim",
                     "trainer.sync_batchnorm=false", "+trainer.limit_val_batches=0", *TINY_TRAIN])
    with open_dict(cfg):
        cfg.callbacks = {"keys": {"_target_": "imagefiles.KeyRecorder", "out": str(tmp_path)}}
    train(cfg)
    seen = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8  # 16 images, 2 ranks, 2 batches of 4 each
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("data", ["folder", "webdataset"])
def test_every_experiment_composes_with_real_data(train_cfg, image_folder, tmp_path, experiment, data):
    import hydra

    source = f"data.root={image_folder(per_class=2)}" if data == "folder" else \
        f'data.urls="{write_shards(tmp_path / "shards", 4)[0]}"'
    cfg = train_cfg([f"+experiment={experiment}", f"data={data}", source])
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.image_size == cfg.model.get("image_size", dm.image_size)
    if "quickstart" in experiment or "digits" in experiment:
        assert dm.image_size == 32  # the CPU experiments stay CPU-sized on real data
