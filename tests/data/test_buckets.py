"""Aspect-ratio buckets: the lists, the bucket of an image, cover-resize + crop geometry, one bucket per batch,
ranks in step, exact resume; on real image files written here."""

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.data.bucket_sampler import BucketBatches, BucketSampler
from sdlight.data.buckets import (auto_buckets, choose_buckets, cover_size, default_step, displayed_size,
                                  nearest_bucket, sdxl_buckets)
from sdlight.data.folder import FolderDataModule
from sdlight.data.transforms import ImageTransform
from sdlight.errors import UsageError

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from imagefiles import PHOTO_SIZES, make_photos, rotated_jpeg, write_image  # noqa: E402

AUTO_64 = [(32, 128), (32, 120), (32, 112), (32, 104), (40, 96), (40, 88), (48, 80), (56, 72), (64, 64), (72, 56),
           (80, 48), (88, 40), (96, 40), (104, 32), (112, 32), (120, 32), (128, 32)]
# file (width, height) -> (original_size (h, w) as displayed, bucket (h, w), crop_coords of the centre crop):
# cover-resize by max(bucket_h / h, bucket_w / w), sides rounded, then the centre of the bucket's size
GEOMETRY = {
    (96, 48): ((48, 96), (40, 88), (2, 0)),   # x 88/96: 44 x 88, 4 rows over
    (48, 96): ((96, 48), (88, 40), (0, 2)),   # x 88/96: 88 x 44, 4 columns over
    (64, 64): ((64, 64), (64, 64), (0, 0)),
    (80, 60): ((60, 80), (56, 72), (0, 1)),   # x 56/60: 56 x 74.67 -> 75, 3 columns over
}


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos")


def folder(root, world=1, rank=0, **options):
    options = {"image_size": 64, "batch_size": 2, "val_fraction": 0.0, "buckets": "auto", "num_workers": 0,
               **options}
    dm = FolderDataModule(root=str(root), **options)
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, callbacks=[])
    dm.setup("fit")
    return dm


def test_sdxl_list_is_the_published_one_scaled():
    assert list(GEOMETRY) == PHOTO_SIZES  # the hand-computed geometry covers every photograph the tests write
    b = sdxl_buckets(1024)
    assert len(b) == 41 and b[0] == (512, 2048) and b[-1] == (2048, 512) and b[20] == (1024, 1024)
    for known in [(576, 1792), (640, 1536), (768, 1344), (832, 1216), (896, 1152), (960, 1024), (1344, 768)]:
        assert known in b
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b) and all((w, h) in b for h, w in b)
    assert max(h * w for h, w in b) == 1024**2 and min(h * w for h, w in b) == 704 * 1344
    # halved, quartered, divided by eight: exactly
    for size, div in ((512, 2), (256, 4), (128, 8)):
        assert sdxl_buckets(size) == [(h // div, w // div) for h, w in b]
    assert [default_step(s) for s in (32, 128, 256, 512, 768, 1024, 2048)] == [8, 8, 16, 32, 48, 64, 128]
    coarse = sdxl_buckets(512, step=64)  # an SD 1.x UNet: sides multiples of 64
    assert (512, 512) in coarse and all(h % 64 == 0 and w % 64 == 0 for h, w in coarse)
    assert all(0.8 * 512**2 <= h * w <= 1.2 * 512**2 for h, w in coarse)


def test_auto_list_areas_multiples_and_ratios():
    assert auto_buckets(64) == AUTO_64
    b = auto_buckets(1024)
    assert (1024, 1024) in b and (512, 2048) in b and (2048, 512) in b and len(b) == 33
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) <= 4 * min(h, w) for h, w in b)
    # none can grow: each as tall as its width allows, or as wide as its height allows
    assert all((h + 64) * w > 1024**2 or h * (w + 64) > 1024**2 for h, w in b)
    # 128 x 512 and 160 x 384 are the largest for their short side, but longer than 2:1
    assert auto_buckets(256, step=32, max_ratio=2) == [(192, 320), (224, 288), (256, 256), (288, 224), (320, 192)]


def test_nearest_bucket_by_log_ratio():
    assert nearest_bucket(48, 96, AUTO_64) == (40, 88)   # 1:2 -> 1:2.2 (log distance .095; 1:2.4 is .182)
    assert nearest_bucket(96, 48, AUTO_64) == (88, 40)
    assert nearest_bucket(60, 80, AUTO_64) == (56, 72)
    assert nearest_bucket(1000, 1000, AUTO_64) == (64, 64)
    assert nearest_bucket(10, 1000, AUTO_64) == (32, 128)
    assert nearest_bucket(1080, 1920, sdxl_buckets(1024)) == (768, 1344)  # 16:9 video frame
    assert nearest_bucket(2, 2, [(8, 16), (16, 8), (8, 8), (16, 16)]) == (16, 16)  # a tie: the larger area
    assert cover_size(48, 96, (40, 88)) == (44, 88) and cover_size(60, 80, (56, 72)) == (56, 75)


def test_invalid_buckets_value_is_one_line(photos):
    for bad, option in (("square", "data.buckets=square"), ("SDXL", "data.buckets=SDXL")):
        with pytest.raises(UsageError) as err:
            FolderDataModule(root=str(photos), buckets=bad)
        assert str(err.value) == f"{option}: must be sdxl, auto or null"
    with pytest.raises(UsageError, match=r"^data.bucket_step=12: must be a multiple of 8") as err:
        choose_buckets("auto", 64, 12)
    assert "\n" not in str(err.value)
    assert choose_buckets(None, 64) is None and choose_buckets("auto", 64) == AUTO_64
    with pytest.raises(UsageError) as err:  # 4, 6, 4, 4 images per bucket: none fills a batch of 8
        folder(photos, batch_size=8).train_dataloader()
    assert str(err.value) == ("data.buckets: no bucket holds one batch (data.batch_size=8 x 1 rank(s)); images per "
                              "bucket: 88x40: 6, 40x88: 4, 56x72: 4, 64x64: 4. Lower data.batch_size, or set "
                              "data.buckets=null")


def test_exif_orientation_swaps_the_size(tmp_path):
    for orientation, shown in ((1, (48, 96)), (3, (48, 96)), (5, (96, 48)), (6, (96, 48)), (8, (96, 48))):
        path = rotated_jpeg(tmp_path / f"o{orientation}.jpg", orientation=orientation)
        assert displayed_size(path) == shown and displayed_size(path.read_bytes()) == shown


@pytest.mark.parametrize("size", list(GEOMETRY))
def test_cover_resize_and_crop_geometry(tmp_path, size):
    original, bucket, corner = GEOMETRY[size]
    path = write_image(tmp_path / "x.png", "RGB", size, seed=3)
    t = ImageTransform(64, buckets=AUTO_64)
    x, geometry = t.with_geometry(path)
    assert x.shape == (3, *bucket)
    assert {k: v.tolist() for k, v in geometry.items()} == {
        "original_size": list(original), "crop_coords": list(corner), "target_size": list(bucket)}
    # the pixels are the hand-made resize + crop
    nh, nw = cover_size(*original, bucket)
    top, left = corner
    ref = Image.open(path).convert("RGB").resize((nw, nh), Image.BICUBIC)
    ref = np.asarray(ref.crop((left, top, left + bucket[1], top + bucket[0])), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)
    # a random crop stays inside the resized image, on the right axis
    for seed in range(5):
        torch.manual_seed(seed)
        _, g = ImageTransform(64, crop="random", buckets=AUTO_64).with_geometry(path)
        assert 0 <= g["crop_coords"][0] <= nh - bucket[0] and 0 <= g["crop_coords"][1] <= nw - bucket[1]
    # buckets off: the square path, no target_size
    _, square = ImageTransform(64).with_geometry(path)
    assert set(square) == {"original_size", "crop_coords"} and square["original_size"].tolist() == list(original)


def test_rotated_jpeg_goes_to_its_displayed_bucket(tmp_path):
    path = rotated_jpeg(tmp_path / "r.jpg")  # stored 96 x 48, shown 48 wide x 96 tall
    x, g = ImageTransform(64, buckets=AUTO_64).with_geometry(path.read_bytes())
    assert x.shape == (3, 88, 40)
    assert (g["original_size"].tolist(), g["crop_coords"].tolist(), g["target_size"].tolist()) == \
        ([96, 48], [0, 2], [88, 40])


def test_folder_batches_hold_one_bucket_with_micro_conditioning(photos):
    dm = folder(photos)
    sizes = dict(enumerate(dm.train_set.sizes))
    assert sorted(dm.train_set.sizes) == sorted([(48, 96)] * 4 + [(96, 48)] * 6 + [(64, 64)] * 4 + [(60, 80)] * 4)
    loader = dm.train_dataloader()
    assert len(loader) == 2 + 3 + 2 + 2  # 4, 6, 4, 4 images per bucket, batches of 2
    seen = []
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)
        assert set(batch) == {"image", "text", "label", "key", "original_size", "crop_coords", "target_size",
                              "sample_index"}
        target = batch["target_size"][0].tolist()
        assert (batch["target_size"] == batch["target_size"][0]).all() and batch["target_size"].dtype == torch.long
        assert batch["image"].shape == (2, 3, *target)
        for i, hw, corner in zip(batch["sample_index"].tolist(), batch["original_size"], batch["crop_coords"]):
            original, bucket, _ = GEOMETRY[sizes[i][::-1]]
            assert hw.tolist() == list(original) and tuple(target) == bucket
            nh, nw = cover_size(*original, bucket)
            assert 0 <= corner[0] <= nh - bucket[0] and 0 <= corner[1] <= nw - bucket[1]
        seen += batch["sample_index"].tolist()
    assert sorted(seen) == list(range(18))  # every image once (no bucket has an odd count left over)
    val = folder(photos, val_fraction=0.3)  # validation buckets too, centre crops, every sample once
    got = [b for b in val.val_dataloader()]
    assert sum(len(b["key"]) for b in got) == len(val.val_set) > 0
    for b in got:
        assert (b["target_size"] == b["target_size"][0]).all()
        for hw, corner, target in zip(b["original_size"], b["crop_coords"], b["target_size"]):
            assert GEOMETRY[tuple(hw.tolist())[::-1]][1:] == (tuple(target.tolist()), tuple(corner.tolist()))


def test_broken_image_is_replaced_from_its_own_bucket(photos):
    (photos / "96x48_1.jpg").write_bytes((photos / "96x48_1.jpg").read_bytes()[:900])  # header reads, pixels not
    (photos / "junk.jpg").write_bytes(b"not an image")                                    # no header: left out
    (photos / "junk.txt").write_text("junk")
    dm = folder(photos)
    assert len(dm.train_set) == 18 and dm.skips.skipped == 1
    keys = []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert (batch["target_size"] == batch["target_size"][0]).all()
        keys += batch["key"]
    wide = [k for k in keys if k.startswith("96x48")]  # its bucket: 4 items, one of the 3 good ones twice
    assert "96x48_1.jpg" not in wide and len(wide) == 4 and len(set(wide)) == 3
    assert dm.skips.skipped == 1 + 1  # the cut JPEG, read once this epoch, counted too


def sampler_batches(buckets, batch_size, world, rank, epoch=0, seed=7):
    s = BucketSampler(list(range(len(buckets))), buckets, batch_size, num_replicas=world, rank=rank, seed=seed)
    s.set_epoch(epoch)
    return [[i for i, _ in batch] for batch in s]


def test_ranks_step_together_and_global_batches_do_not_depend_on_the_rank_count():
    rng = np.random.default_rng(0)
    buckets = [("a", "b", "c", "d")[k] for k in rng.integers(0, 4, 203)]
    one = sampler_batches(buckets, 12, 1, 0, epoch=3)
    assert len(one) == sum(buckets.count(b) // 12 for b in "abcd")
    for world, b in ((2, 6), (3, 4), (4, 3)):
        per_rank = [sampler_batches(buckets, b, world, r, epoch=3) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every rank the same number of batches
        flat = [i for p in per_rank for batch in p for i in batch]
        assert len(flat) == len(set(flat))           # disjoint
        for k, single in enumerate(one):             # global batch k: the 1-process batch k of W x B
            union = [i for p in per_rank for i in p[k]]
            assert sorted(union) == sorted(single) and len({buckets[i] for i in union}) == 1
    assert sampler_batches(buckets, 12, 1, 0, epoch=4) != one  # another epoch, another order
    assert sampler_batches(buckets, 12, 1, 0, epoch=3) == one  # seeded


def test_resume_mid_epoch_continues_exactly(photos):
    def run(interrupt: int | None):
        dm = folder(photos, crop="random")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        if interrupt is None:
            return [b for b in loader]
        head = [b for _, b in zip(range(interrupt), loader)]
        state = loader.state_dict()
        assert state["epoch"] == 1 and state["batches"] == interrupt
        again = folder(photos, crop="random").train_dataloader()  # a new process: new datamodule and loader
        again.load_state_dict(state)
        again.sampler.set_epoch(1)
        return head + [b for b in again]

    whole, resumed = run(None), run(3)
    assert [b["sample_index"].tolist() for b in resumed] == [b["sample_index"].tolist() for b in whole]
    for a, b in zip(whole, resumed):  # the same random crops: draws keyed by (seed, epoch, index)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["crop_coords"], b["crop_coords"])


def test_folder_ranks_get_the_same_number_of_disjoint_batches(photos):
    loaders = [folder(photos, world=2, rank=r).train_dataloader() for r in range(2)]
    got = [[b["sample_index"].tolist() for b in loader] for loader in loaders]
    assert len(got[0]) == len(got[1]) == 4  # per bucket 4, 6, 4, 4 images in steps of 2 x 2: one step each
    assert not set(sum(got[0], [])) & set(sum(got[1], []))
    single = [b["sample_index"].tolist() for b in folder(photos, batch_size=4).train_dataloader()]
    assert [sorted(a + b) for a, b in zip(*got)] == [sorted(s) for s in single]


def test_streamed_items_are_batched_by_shape():
    shapes = [(3, 8, 16), (3, 16, 8), (3, 8, 16), (3, 8, 8), (3, 16, 8), (3, 8, 16), (3, 16, 8)]
    items = [{"image": torch.zeros(s), "n": i} for i, s in enumerate(shapes)]
    batches = list(BucketBatches(2, lambda group: [it["n"] for it in group])(iter(items)))
    assert batches == [[0, 2], [1, 4]]  # full lists in the order they fill; the rest is pending at the end
    three = list(BucketBatches(3, lambda group: [it["n"] for it in group])(iter(items)))
    assert three == [[0, 2, 5], [1, 4, 6]]


def test_bytes_and_paths_give_the_same_item(tmp_path):
    path = write_image(tmp_path / "a.jpg", "RGB", (80, 60), seed=1)
    t = ImageTransform(64, buckets=AUTO_64)
    (x1, g1), (x2, g2) = t.with_geometry(path), t.with_geometry(io.BytesIO(path.read_bytes()).getvalue())
    assert torch.equal(x1, x2) and all(torch.equal(g1[k], g2[k]) for k in g1)

