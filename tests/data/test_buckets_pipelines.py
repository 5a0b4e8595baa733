"""Aspect-ratio buckets through the pipelines: streamed shards, the latent cache, stage 2 and DDP training."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from sdlight.data.buckets import auto_buckets, nearest_bucket
from sdlight.data.folder import FolderDataModule
from sdlight.errors import UsageError

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "data"), str(TESTS / "entry")]
from cli_helpers import assert_one_line, run_cli  # noqa: E402
from conftest import compose_train, random_stage1_checkpoint  # noqa: E402
from imagefiles import PHOTO_SIZES, image_bytes, make_photos  # noqa: E402


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos")


def test_shards_stream_and_validate_in_buckets(tmp_path):
    import webdataset as wds

    from sdlight.data.shards import WebDataModule

    sizes = PHOTO_SIZES
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "s-0000.tar")) as sink:
        for i in range(32):
            sink.write({"__key__": f"{i:04d}", "png": image_bytes("RGB", sizes[i % 4], "PNG", seed=i),
                        "txt": f"caption {i}"})
    dm = WebDataModule(urls=str(tmp_path / "shards" / "s-0000.tar"), val_size=8, image_size=64, batch_size=3,
                       buckets="auto", num_workers=0, shuffle_buffer=8)
    dm.setup("fit")
    # the first 8 samples, two of each size; 40x88, 88x40, 64x64, 56x72 at 64 px (see test_buckets.GEOMETRY)
    assert sorted(dm.val_set.bucket_of) == sorted([(3, 40, 88), (3, 88, 40), (3, 64, 64), (3, 56, 72)] * 2)
    train = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(train) == 8  # 24 training samples / 3 per batch
    for b in train:
        assert len(b["key"]) == 3 and (b["target_size"] == b["target_size"][0]).all()
        assert b["image"].shape[2:] == tuple(b["target_size"][0].tolist())
    val = list(dm.val_dataloader())
    assert sorted(k for b in val for k in b["key"]) == [f"{i:04d}" for i in range(8)]
    assert all((b["target_size"] == b["target_size"][0]).all() for b in val)


def test_latent_cache_holds_each_image_at_its_bucket(photos, tmp_path):
    from sdlight.data.latents import LatentsDataModule
    from sdlight.encode import encode_dataset

    spec = importlib.util.spec_from_file_location("stages_conftest", TESTS / "stages" / "conftest.py")
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)  # tiny_vae: an f=4 autoencoder
    images = FolderDataModule(root=str(photos), image_size=16, batch_size=2, val_fraction=0.3, buckets="auto",
                              num_workers=0)
    manifest = encode_dataset(stages.tiny_vae(0), images, tmp_path / "cache", dtype="float32", shard_size=5,
                              progress=False)
    assert manifest["format_version"] == 2 and manifest["buckets"]["name"] == "auto"
    assert manifest["buckets"]["sizes"] == [[8, 32], [8, 24], [16, 16], [24, 8], [32, 8]]
    cache = LatentsDataModule(root=str(tmp_path / "cache"), batch_size=2, num_workers=0, train_size=8)
    cache.setup("fit")
    shapes = {(4, 2, 6), (4, 6, 2), (4, 4, 4)}  # the buckets 8x24, 24x8, 16x16 of the photographs, over 4
    for b in cache.train_dataloader():
        assert tuple(b["latent_mean"].shape[1:]) in shapes and b["latent_mean"].shape[0] == 2
        assert (b["target_size"] // 4 == torch.tensor(b["latent_mean"].shape[2:])).all()
    val = list(cache.val_dataloader())
    assert sum(len(b["key"]) for b in val) == len(images.val_set) == manifest["splits"]["val"]["samples"]
    for b in val:  # the cached posterior is the image's at its bucket, with its micro-conditioning
        for j, key in enumerate(b["key"]):
            item = images.val_set[int(key)]
            posterior = stages.tiny_vae(0).encode(item["image"][None])
            torch.testing.assert_close(b["latent_mean"][j], posterior.mean[0], rtol=1e-5, atol=1e-5)
            for k in ("original_size", "crop_coords", "target_size"):
                assert b[k][j].tolist() == item[k].tolist()
    with pytest.raises(UsageError, match=r"^data.buckets=sdxl but .* was encoded with data.buckets=auto: "):
        LatentsDataModule(root=str(tmp_path / "cache"), buckets="sdxl")


def test_stage_two_trains_on_bucketed_folder_images(photos, tmp_path):
    from sdlight.train import train

    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    cfg = compose_train(["+experiment=quickstart_ldm", "data=folder", f"data.root={photos}", "data.image_size=32",
                         "data.buckets=auto", "data.bucket_step=16", "data.val_fraction=0.25", "data.num_workers=0",
                         "data.batch_size=2", f"model.first_stage.ckpt={vae}", "model.sample_every_n_steps=0",
                         "trainer.max_epochs=1", "logger=csv", "callbacks=none", "trainer.num_sanity_val_steps=0"],
                        tmp_path)
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished and torch.isfinite(metrics["train/loss"])
    assert {tuple(b) for b in objects["datamodule"].train_set.bucket_of} == {(16, 48), (48, 16), (32, 32)}


def test_ddp_ranks_train_on_disjoint_batches_of_one_bucket(photos, tmp_path):
    from sdlight.train import train

    cfg = compose_train(["+experiment=quickstart_vae", "data=folder", f"data.root={photos}", "data.image_size=32",
                         "data.buckets=auto", "data.val_fraction=0", "data.num_workers=0", "data.batch_size=2",
                         "trainer=ddp_sim", "trainer.sync_batchnorm=false", "+trainer.limit_val_batches=0",
                         "trainer.max_epochs=1", "logger=csv", "callbacks=none", "trainer.num_sanity_val_steps=0"],
                        tmp_path)
    with open_dict(cfg):
        cfg.callbacks = {"keys": {"_target_": "imagefiles.KeyRecorder", "out": str(tmp_path)}}
    train(cfg)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # at 32 px, 96x48 and 80x60 share 24x40: per bucket 8, 6, 4 images in steps of 2 x 2 ranks: 4 steps, 8 images
    # on each rank, none on both
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])

    def bucket(key: str) -> tuple:
        w, h = (48, 96) if key.startswith("rotated") else map(int, key.split("_")[0].split("x"))
        return nearest_bucket(h, w, auto_buckets(32))

    assert {bucket(k) for k in seen[0] + seen[1]} == {(24, 40), (40, 24), (32, 32)}
    for r in (0, 1):
        assert all(bucket(a) == bucket(b) for a, b in zip(seen[r][::2], seen[r][1::2]))


def test_an_invalid_buckets_value_is_one_line_on_the_command_line(photos, tmp_path):
    out = run_cli("train", ["data=folder", f"data.root={photos}", "data.buckets=square", "logger=none"], tmp_path)
    line = assert_one_line(out, "must be sdxl, auto or null")
    assert line == "Error: data.buckets=square: must be sdxl, auto or null"
