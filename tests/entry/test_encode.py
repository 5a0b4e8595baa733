"""sdlight.encode through the real CLI: a cache and its manifest, a one-line error for a missing checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import random_stage1_checkpoint  # noqa: E402


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SDLIGHT_ROOT=str(cwd), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sdlight.encode", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_a_cache_then_says_how_to_train_from_it(tmp_path):
    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    out = tmp_path / "cache"
    done = run([f"ckpt={vae}", "data=shapes", "data.train_size=6", "data.val_size=2", "data.image_size=16",
                f"out={out}", "shard_size=4", "progress=false", "dtype=bfloat16"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"data=latents data.root={out}" in done.stdout + done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["first_stage"]["ckpt"] == str(vae)
    assert manifest["data"]["_target_"].endswith("ShapesDataModule") and manifest["data"]["image_size"] == 16
    assert [manifest["splits"][s]["samples"] for s in ("train", "val")] == [6, 2]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]

    missing = run([f"ckpt={tmp_path / 'nope.ckpt'}", "data=shapes", f"out={out}"], tmp_path)
    assert missing.returncode == 2 and "nope.ckpt: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
