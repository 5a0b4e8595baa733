"""Two processes (``trainer=ddp_sim``) through the real CLI: a run stopped and resumed ends bit for bit where the
uninterrupted run ends; SIGTERM sent to one rank stops both at the same step with one checkpoint and exit 0; a rank
that raises stops every rank within a bounded time, a user error as one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlight.checkpoints import read_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_resume import _command, _env, _train, assert_same_end_state  # noqa: E402

# stage 2 on shapes, 2 processes x 4: 8 global batches an epoch, an LR schedule of a fixed length, an EMA
LDM = ["+experiment=quickstart_ldm", "trainer=ddp_sim", "data.train_size=64", "data.val_size=8", "data.batch_size=4",
       "model.unet.model_channels=32", "model.conditioning.width=32", "model.conditioning.heads=2",
       "model.conditioning.max_length=16", "model.scale_factor_batches=2", "+model.lr_scheduler.total_steps=12",
       "model.lr_scheduler.warmup_steps=2", "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
       "model.sample_every_n_steps=0", "callbacks.progress_log.every_n_steps=1", "seed=3"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    sys.path.insert(0, str(HERE.parent))
    from conftest import random_stage1_checkpoint

    return random_stage1_checkpoint(tmp_path_factory.mktemp("stage1") / "vae.ckpt")


def _ranks(pid: int) -> list[int]:
    """The training processes ddp_spawn started under ``pid`` (multiprocessing's resource tracker left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' processes through /proc")
def test_sigterm_to_one_rank_stops_both_and_the_resumed_run_ends_bit_for_bit(tmp_path, stage1):
    ldm = LDM + [f"model.first_stage.ckpt={stage1}", "trainer.max_steps=12"]
    full = _train(tmp_path, "full", ldm)  # 8 steps an epoch: into the second epoch

    run_dir = tmp_path / "part"
    args = ldm + ["+callbacks.slow._target_=resume_helpers.SlowSteps"]
    proc = subprocess.Popen(_command(run_dir, args), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, ranks = [], []
    try:
        for printed in proc.stdout:  # rank 0's progress lines
            lines.append(printed)
            if "step 3/12" in printed:
                ranks = _ranks(proc.pid)
                import os

                os.kill(ranks[-1], signal.SIGTERM)  # one rank only
                break
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    printed = "".join(lines) + rest
    assert len(ranks) == 2, printed[-3000:]
    assert proc.returncode == 0, printed[-3000:]
    assert "Stopped on" in printed and "Traceback" not in printed, printed[-3000:]
    checkpoints = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["last.ckpt"], checkpoints
    stopped = read_checkpoint(checkpoints[0])
    assert 3 <= stopped["global_step"] < 12

    resumed = _train(tmp_path, "part", ldm + ["ckpt_path=last"])
    assert_same_end_state(full, resumed)


@pytest.mark.parametrize("error", ["usage", "bug"])
def test_a_rank_that_raises_stops_every_rank(tmp_path, stage1, error):
    args = LDM + [f"model.first_stage.ckpt={stage1}", "trainer.max_steps=12",
                  "+callbacks.fail._target_=resume_helpers.RaiseOnRank", f"+callbacks.fail.error={error}"]
    start = time.monotonic()
    out = subprocess.run(_command(tmp_path / "run", args), cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=240)
    took = time.monotonic() - start
    message = "data: rank 1 read a broken sample at step 2"
    if error == "usage":
        assert out.returncode == 2, out.stderr[-3000:]
        assert f"Error: {message}" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    else:
        assert out.returncode not in (0, 2) and f"RuntimeError: {message}" in out.stderr, out.stderr[-3000:]
    assert took < 200, took  # the surviving rank does not wait in its all-reduce for a peer that is gone
