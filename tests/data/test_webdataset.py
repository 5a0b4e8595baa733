"""data=webdataset on shards written by webdataset's own ShardWriter: layout, epochs, broken input, training."""

import io
import json
import math
import re
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from omegaconf import open_dict

from sdlight.data.shards import SkipCounting, WebDataModule, count_samples, expand_urls
from sdlight.data.skips import BROKEN_SHARDS, SKIPPED, TooManySkipped
from sdlight.errors import UsageError

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from conftest import train_tiny_text_ldm  # noqa: E402
from imagefiles import cut_shard_set, image_bytes, under_trainer, write_shards  # noqa: E402


def pattern(shards: list[Path]) -> str:
    return f"{shards[0].parent}/{shards[0].name.split('-')[0]}-{{0000..{len(shards) - 1:04d}}}.tar"


def take(dm, loader) -> list[dict]:
    return [dm.on_before_batch_transfer(b, 0) for b in loader]


def test_urls_expand_from_braces_lists_and_double_colons(tmp_path):
    assert expand_urls("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_urls(["x.tar", "b-{1..2}.tar"]) == ["x.tar", "b-1.tar", "b-2.tar"]
    assert expand_urls("p.tar::q.tar") == ["p.tar", "q.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_urls([])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_and_a_known_epoch_length(tmp_path, num_workers):
    shards = write_shards(tmp_path, 40, maxcount=10)
    assert count_samples(expand_urls(pattern(shards))) == 40
    dm = WebDataModule(urls=pattern(shards), image_size=16, batch_size=4, val_size=8, num_workers=num_workers,
                       train_size=24, shuffle_buffer=16)
    dm.setup()
    loader = dm.train_dataloader()
    expected = math.ceil(6 / max(1, num_workers)) * max(1, num_workers)  # 24 samples / batch 4, per worker
    assert len(loader) == expected
    got = take(dm, loader)
    assert len(got) == expected  # what Lightning was told is what it gets
    assert len(take(dm, loader)) == expected  # and again next epoch
    val_keys = set()
    for b in take(dm, dm.val_dataloader()):
        val_keys |= set(b["key"])
    assert val_keys == {f"{i:06d}" for i in range(8)}  # the first val_size samples, in order
    for b in got:
        assert set(b) == {"image", "text", "label", "key", "original_size", "crop_coords"}
        assert b["image"].shape == (4, 3, 16, 16) and -1 <= b["image"].min() <= b["image"].max() <= 1
        # write_shards' images are 40x36 (w x h): short side 36 -> 16, width 18, a random crop 0-2 px from the left
        assert b["original_size"].tolist() == [[36, 40]] * 4
        assert all(top == 0 and 0 <= left <= 2 for top, left in b["crop_coords"].tolist())
        for key, text, label in zip(b["key"], b["text"], b["label"].tolist()):
            assert text == f"caption {int(key)}" and label == int(key) % 3
            assert key not in val_keys  # held-out validation samples never train


def test_train_size_defaults_to_the_samples_in_local_shards_and_val_urls_are_separate(tmp_path):
    train = write_shards(tmp_path / "train", 20, maxcount=10)
    val = write_shards(tmp_path / "val", 6, maxcount=10, start=100)
    dm = WebDataModule(urls=[str(p) for p in train], val_urls=str(val[0]), val_size=None, batch_size=5,
                       image_size=8)
    dm.setup()
    assert len(dm.train_dataloader()) == 4 and len(dm.val_set) == 6
    assert next(iter(dm.val_dataloader()))["key"][0] == "000100"
    with pytest.raises(ValueError, match="data.train_size"):
        WebDataModule(urls="https://example.invalid/s-{0..1}.tar", batch_size=2).batches_per_worker()


def test_a_validation_head_that_leaves_less_than_a_batch_is_refused(tmp_path):
    """Training would skip every sample it reads, forever (it hung): setup stops, naming what to change."""
    urls = pattern(write_shards(tmp_path / "s", 6, maxcount=4))
    dm = WebDataModule(urls=urls, val_size=6, batch_size=2, image_size=8)
    with pytest.raises(UsageError, match=re.escape(
            "data.val_size=6 holds out 6 of the 6 samples in data.urls (2 shards), leaving none for training: lower "
            "data.val_size to 5 or less, or give a separate validation set with data.val_urls")):
        dm.setup()
    # under a Trainer, one batch on every rank must be left
    dm = under_trainer(WebDataModule(urls=urls, val_size=3, batch_size=4, image_size=8))
    with pytest.raises(UsageError, match=re.escape(
            "holds out 3 of the 6 samples in data.urls (2 shards), leaving 3 for training, fewer than one batch "
            "(data.batch_size=4 x 1 rank): lower data.val_size to 2 or less")):
        dm.setup("fit")
    dm.setup("validate")  # evaluating needs no training samples
    dm = under_trainer(WebDataModule(urls=urls, val_size=2, batch_size=4, image_size=8))
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # train_size: the 6 samples less the 2 held out


def test_the_check_on_remote_shards_reads_one_batch_past_the_validation_samples(tmp_path):
    """Remote shards cannot be listed: the check reads on past the validation samples until one batch is found,
    never the whole set (here: never reaching the shard that does not open)."""
    shards = write_shards(tmp_path, 30, maxcount=10)
    urls = [f"pipe:cat {p}" for p in shards] + [f"pipe:cat {tmp_path / 'missing.tar'}"]
    dm = under_trainer(WebDataModule(urls=urls, val_size=4, train_size=8, batch_size=4, image_size=8))
    dm.setup("fit")
    assert dm._head == {"held": 4, "read": 8, "left": 4} and dm.skips.skipped == 0
    with pytest.raises(UsageError, match=re.escape("data.val_size=40 holds out 30 of the 30 samples in data.urls (4 "
                                                   "shards), leaving none for training")):
        WebDataModule(urls=urls, val_size=40, train_size=8, batch_size=4, image_size=8).setup()


def test_unresampled_shards_are_split_over_workers(tmp_path):
    shards = write_shards(tmp_path, 20, maxcount=5)
    dm = WebDataModule(urls=pattern(shards), resampled=False, val_urls=str(shards[0]), val_size=2,
                       train_size=20, batch_size=5, num_workers=2, image_size=8, shuffle_buffer=1)
    dm.setup()
    keys = [k for b in take(dm, dm.train_dataloader()) for k in b["key"]]
    assert len(keys) == 20 and len(set(keys)) == 20  # one pass over the 4 shards, each read by one worker


def broken_shards(tmp_path: Path) -> str:
    """A good shard, a shard of every broken sample, and a truncated shard; returns their pattern."""
    write_shards(tmp_path, 10, maxcount=10, prefix="b")  # b-0000.tar: good
    good = image_bytes("RGB", (40, 40), "JPEG")
    with wds.ShardWriter(str(tmp_path / "b-%04d.tar"), maxcount=100, start_shard=1, verbose=0) as sink:
        sink.write({"__key__": "nocaption", "jpg": good})
        sink.write({"__key__": "noimage", "txt": "a caption without an image", "json": {}})
        sink.write({"__key__": "zero", "png": b"", "txt": "empty file"})
        sink.write({"__key__": "notimage", "webp": b"just text", "txt": "not an image"})
        sink.write({"__key__": "cut", "jpg": good[: len(good) // 3], "txt": "truncated image"})
        for i in range(5):
            sink.write({"__key__": f"ok{i}", "png": image_bytes(seed=50 + i), "txt": f"fine {i}"})
    write_shards(tmp_path, 10, maxcount=10, prefix="c", start=200)
    full = (tmp_path / "c-0000.tar").read_bytes()
    (tmp_path / "b-0002.tar").write_bytes(full[: len(full) // 2 + 100])  # a truncated tar
    return str(tmp_path / "b-{0000..0002}.tar")


def test_broken_samples_and_tars_are_skipped_and_counted(tmp_path):
    dm = WebDataModule(urls=broken_shards(tmp_path), val_size=2, train_size=64, batch_size=4, image_size=16,
                       num_workers=2, max_skip_fraction=0.9)
    dm.setup()
    raw = list(dm.train_dataloader())
    assert len(raw) == 16 and all(b["image"].shape == (4, 3, 16, 16) for b in raw)
    skipped = sum(int(b[SKIPPED].sum()) for b in raw)
    assert skipped > 0
    for b in raw:
        dm.on_before_batch_transfer(b, 0)
    assert dm.skips.shards == 1  # the truncated b-0002, drawn by both workers, counts once in the epoch
    assert dm.skips.skipped == skipped + 1 and dm.skips.read == skipped + 64 + 1
    seen = " ".join(dm.skips.examples)
    assert any(k in seen for k in ("nocaption", "noimage", "zero", "notimage", "cut", "b-0002"))
    dm.skips.max_skip_fraction = 0.1
    dm.skips.check(10, 20)  # 50 % broken, but too few read yet to judge
    with pytest.raises(TooManySkipped, match=r"skipped 60 broken samples of 100 read \(60.0%\).*max_skip_fraction"):
        dm.skips.check(60, 100)


def test_a_truncated_shard_counts_once_per_epoch(tmp_path):
    """1 cut shard of 4, drawn again and again by 2 workers: one skipped input per epoch, named with the samples
    it gave before the cut; its partial last sample is part of it, not another broken sample."""
    dm = WebDataModule(urls=cut_shard_set(tmp_path), val_size=16, train_size=320, batch_size=8, image_size=8,
                       num_workers=2, shuffle_buffer=16)
    dm.setup()
    for epoch in (1, 2):
        dm.skips.new_epoch()  # SkipMonitor does this at each epoch's start
        raw = list(dm.train_dataloader())
        assert len(raw) == 40 and sum(int(b[SKIPPED].sum()) for b in raw) == 0
        reports = [url for b in raw for pairs in b[BROKEN_SHARDS] for url, _ in pairs]
        assert len(reports) >= 2 and set(reports) == {str(tmp_path / "s-0003.tar")}  # each worker says so
        for b in raw:
            dm.on_before_batch_transfer(b, 0)
        assert dm.skips.shards == dm.skips.skipped == epoch
    assert dm.skips.read == 2 * (320 + 1)
    assert re.fullmatch(r".*/s-0003\.tar: ReadError: .* \(after \d+ samples\)", dm.skips.examples[0])
    assert dm.skips.summary() == ("skipped 2 of 642 inputs read (0.3%): 0 broken samples and 2 truncated or "
                                  "unreadable tar shards (each counted once per epoch)")


def test_a_validation_set_of_broken_samples_leaves_them_out(tmp_path):
    urls = broken_shards(tmp_path)
    dm = WebDataModule(urls=urls, val_urls=str(tmp_path / "b-0001.tar"), val_size=None, train_size=8,
                       batch_size=4, image_size=8, max_skip_fraction=0.9)
    dm.setup()
    assert sorted(s["__key__"] for s in dm.val_set.samples) == [f"ok{i}" for i in range(5)]
    assert dm.skips.skipped == 5


def test_all_broken_data_stops_instead_of_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(SkipCounting, "max_in_a_row", 5)
    with wds.ShardWriter(str(tmp_path / "x-%04d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": b"broken", "txt": "x"})
    dm = WebDataModule(urls=str(tmp_path / "x-0000.tar"), val_urls=str(tmp_path / "x-0000.tar"), train_size=4,
                       batch_size=2, image_size=8)
    dm.setup()
    with pytest.raises(TooManySkipped, match="in a row"):
        next(iter(dm.train_dataloader()))


def test_make_shards_layout_is_the_img2dataset_one(tmp_path):
    """What sdlight.make_shards writes (tests/entry/test_make_shards.py) and img2dataset's layout agree."""
    shards = write_shards(tmp_path, 3)
    with tarfile.open(shards[0]) as tar:
        names = sorted(m.name for m in tar.getmembers())
        meta = json.load(io.TextIOWrapper(tar.extractfile("000001.json")))
    assert names[:5] == ["000000.cls", "000000.jpg", "000000.json", "000000.txt", "000001.cls"]
    assert meta == {"index": 1}


# ------------------------------------------------------------------------------- training from shards
TINY_TRAIN = ["data=webdataset", "data.num_workers=0", "data.batch_size=4", "data.val_size=4",
              "data.shuffle_buffer=8", "trainer.max_epochs=1", "logger=csv", "callbacks=none",
              "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1"]


def test_quickstart_vae_trains_from_shards(tmp_path, train_cfg):
    from sdlight.train import train

    urls = broken_shards(tmp_path)
    cfg = train_cfg(["+experiment=quickstart_vae", f'data.urls="{urls}"', "data.train_size=16",
                     "data.max_skip_fraction=0.9", *TINY_TRAIN])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished and objects["model"].batches == 4  # 16 samples / batch 4
    assert "data/skipped" in metrics and "val/psnr" in metrics


def test_a_cut_shard_set_trains_with_a_smaller_validation_head(tmp_path, train_cfg):
    """The shards that stop at setup with data.val_size=256 (tests/entry/test_cli_errors.py) train with 16; the
    cut shard, drawn again and again, is one skipped input per epoch."""
    from sdlight.train import train

    urls = cut_shard_set(tmp_path / "shards")
    cfg = train_cfg(["+experiment=quickstart_vae", f'data.urls="{urls}"', "data.train_size=240", *TINY_TRAIN,
                     "data.val_size=16", "data.batch_size=8", "trainer.max_epochs=2"])
    metrics, objects = train(cfg)
    skips = objects["datamodule"].skips
    assert objects["trainer"].state.finished and objects["model"].batches == 60
    assert skips.shards == skips.skipped == 2 and float(metrics["data/skipped"]) == 2
    assert skips.read == 2 * (240 + 1 + 16)  # per epoch: the training samples, the cut shard, the validation ones


def test_text_ldm_trains_from_shards(tmp_path):
    urls = pattern(write_shards(tmp_path / "shards", 30, maxcount=10))
    _, objects = train_tiny_text_ldm(tmp_path, ["data=webdataset", f'data.urls="{urls}"', "data.num_workers=0",
                                                "logger=none"])
    assert objects["trainer"].state.finished
    assert objects["trainer"].num_training_batches == 2  # TINY_TEXT_LDM: train_size 16, batch 8


@pytest.mark.parametrize("resampled", [True, False])
def test_ddp_ranks_see_different_shard_samples(tmp_path, train_cfg, resampled):
    from sdlight.train import train

    urls = pattern(write_shards(tmp_path / "shards", 40, maxcount=5))
    cfg = train_cfg(["+experiment=quickstart_vae", f'data.urls="{urls}"', "data.train_size=32",
                     f"data.resampled={resampled}", "trainer=ddp_sim", "trainer.sync_batchnorm=false",
                     "+trainer.limit_val_batches=0", *TINY_TRAIN])
    with open_dict(cfg):
        cfg.callbacks = {"keys": {"_target_": "imagefiles.KeyRecorder", "out": str(tmp_path)}}
    metrics, _ = train(cfg)
    assert float(metrics["data/skipped"]) == 0  # summed over ranks at the same batch on both: no rank waits
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 16  # 32 samples per epoch over 2 ranks
    assert set(seen[0]) != set(seen[1])
    if not resampled:  # split_by_node: each rank reads its own shards
        assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) > max(len(set(s)) for s in seen)
