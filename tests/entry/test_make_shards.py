"""sdlight.make_shards: a folder round-trips through shards that data=webdataset reads back identically."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from sdlight.data.folder import FolderDataModule
from sdlight.data.shards import WebDataModule
from sdlight.make_shards import make_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from imagefiles import make_image_folder  # noqa: E402


def items(dataset) -> dict:
    return {it["text"]: (it["image"], it["label"]) for it in (dataset[i] for i in range(len(dataset)))}


def test_folder_round_trips_through_shards(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=("cat", "dog"), per_class=6)
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "cat" / "broken.txt").write_text("broken")
    summary = make_shards(src, tmp_path / "out", maxcount=5, label_from="folder", progress=False)
    assert summary.written == 12 and summary.skipped == 1 and "broken.jpg" in summary.skipped_examples[0]
    assert summary.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["classes"] == ["cat", "dog"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert {"txt", "json", "cls"} <= exts and exts - {"txt", "json", "cls"} <= {"jpg", "png", "webp"}

    folder = FolderDataModule(root=str(src), label_from="folder", val_fraction=0, image_size=16, crop="center",
                              max_skip_fraction=0.5)
    folder.setup()
    shards = WebDataModule(urls=str(tmp_path / "out" / "shard-{000000..000002}.tar"), val_size=None,
                           val_urls=str(tmp_path / "out" / "shard-{000000..000002}.tar"), image_size=16)
    shards.setup()
    want, got = items(folder.train_set), items(shards.val_set)
    assert set(got) == set(want) and len(got) == 12  # every caption, and the broken file left out
    for text, (image, label) in want.items():
        assert got[text][1] == label
        assert torch.allclose(got[text][0], image, atol=1e-6)  # bytes kept, or re-encoded losslessly


def test_cli_writes_shards_and_a_summary(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3)
    env = dict(os.environ, SDLIGHT_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "sdlight.make_shards", f"src={src}", f"out={tmp_path / 'out'}", "maxcount=4",
            "image_size=16", "progress=false"]
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Wrote 6 samples to 2 shards" in out.stdout + out.stderr
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        assert sorted(m.name.split(".", 1)[1] for m in tar.getmembers()) == ["jpg", "jpg", "json", "json", "txt",
                                                                             "txt"]  # image_size: all JPEG
    missing = subprocess.run([sys.executable, "-m", "sdlight.make_shards", "out=x"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "src" in missing.stderr
