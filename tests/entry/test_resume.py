"""Fault tolerance through the real CLI: a run stopped mid-epoch (max_steps, SIGTERM) and resumed ends bit for bit
where the same run uninterrupted ends; a process killed while writing a checkpoint leaves the previous one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdlight.checkpoints import newest_checkpoint, read_checkpoint

HERE = Path(__file__).resolve().parent
QUIET = ["logger=none", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]
# stage 1: 8 batches an epoch, the discriminator from batch 4 on (2 optimizer steps a batch, then)
VAE = ["+experiment=quickstart_vae", "data.train_size=64", "data.val_size=8", "data.batch_size=8",
       "model.loss.disc_start=4", "model.loss.disc_warmup_steps=2", "model.image_log_every_n_steps=3", "seed=3"]


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDLIGHT_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("SLURM_JOB_ID", None)
    return env


def _command(run_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sdlight.train", f"hydra.run.dir={run_dir}", *QUIET, *args]


def _train(root: Path, run: str, args: list[str]) -> Path:
    out = subprocess.run(_command(root / run, args), cwd=root, env=_env(root), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (root / f"{run}.log").write_text(out.stdout + out.stderr)
    return root / run / "checkpoints" / "last.ckpt"


def _tensors(x, prefix=""):
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}.{i}")
    elif isinstance(x, (int, float, str)):
        yield prefix, x


def assert_same_end_state(a: Path, b: Path) -> None:
    """Weights (EMA and scale factor included), optimizer and scheduler states, step, epoch and every saved random
    state: equal, tensor by tensor."""
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"])
    parts = ["state_dict", "optimizer_states", "lr_schedulers"]
    ta = dict(_tensors({p: ca.get(p) for p in parts} | {"rng": ca["callbacks"]["ExactResume"]}))
    tb = dict(_tensors({p: cb.get(p) for p in parts} | {"rng": cb["callbacks"]["ExactResume"]}))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not (torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} differ, e.g. {differ[:5]}"


def _signal_at(run_dir: Path, args: list[str], line: str, signum: int) -> tuple[int, str]:
    """Trains with slow steps and sends ``signum`` once a progress line holds ``line``; (exit code, output)."""
    args = args + ["+callbacks.slow._target_=resume_helpers.SlowSteps"]
    proc = subprocess.Popen(_command(run_dir, args), cwd=run_dir.parent, env=_env(run_dir.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for printed in proc.stdout:  # plain progress lines: stdout is a pipe, not a terminal
            lines.append(printed)
            if line in printed:
                proc.send_signal(signum)
                break
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + rest


def test_autoencoder_resumes_exactly_and_survives_a_kill_during_a_checkpoint_write(tmp_path):
    full = _train(tmp_path, "full", VAE + ["trainer.max_steps=24"])  # 14 batches: into epoch 1, GAN on
    part = _train(tmp_path, "part", VAE + ["trainer.max_steps=10"])  # 7 batches: mid-epoch 0
    before = part.read_bytes()

    # a resumed run killed -9 while it writes its next checkpoint
    marker = tmp_path / "writing"
    args = VAE + ["trainer.max_steps=12", "ckpt_path=last", "+callbacks.hang._target_=resume_helpers.HangOnSave",
                  f"+callbacks.hang.marker={marker}"]
    proc = subprocess.Popen(_command(tmp_path / "part", args), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no write started"
    finally:
        proc.kill()
        proc.wait()
    assert part.read_bytes() == before
    assert list(part.parent.glob("*.ckpt.tmp"))  # the half-written file is the temporary one
    assert newest_checkpoint(part.parent)[0] is not None

    resumed = _train(tmp_path, "part", VAE + ["trainer.max_steps=24", "ckpt_path=last"])
    assert_same_end_state(full, resumed)


def _image_folder(root: Path, n: int = 40) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root.mkdir()
    for i in range(n):
        pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    sys.path.insert(0, str(HERE.parent))
    from conftest import random_stage1_checkpoint

    return random_stage1_checkpoint(tmp_path_factory.mktemp("stage1") / "vae.ckpt")


def test_diffusion_on_a_folder_resumes_exactly_after_sigterm(tmp_path, stage1):
    """Random crops and flips, two loader workers, an LR schedule and an EMA: all restored."""
    folder = _image_folder(tmp_path / "images")
    ldm = ["+experiment=quickstart_ldm", f"model.first_stage.ckpt={stage1}", "data=folder", f"data.root={folder}",
           "data.image_size=32", "data.batch_size=8", "data.num_workers=2", "data.flip=true",
           "data.missing_caption=empty", "model.sample_every_n_steps=0", "trainer.max_steps=12", "seed=5",
           "callbacks.progress_log.every_n_steps=1"]
    full = _train(tmp_path, "full", ldm)  # 4 batches an epoch: 3 epochs

    returncode, printed = _signal_at(tmp_path / "part", ldm, "step 3/12", signal.SIGTERM)
    assert returncode == 0, printed[-3000:]
    assert "Stopped on SIGTERM" in printed and "img/s" in printed and "ETA" in printed
    stopped = read_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert 3 <= stopped["global_step"] < 12

    resumed = _train(tmp_path, "part", ldm + ["ckpt_path=last"])
    assert_same_end_state(full, resumed)


# stage 2 on shapes: 8 batches an epoch, an LR schedule of a fixed length (so that runs of another max_steps share it)
LDM = ["+experiment=quickstart_ldm", "data.train_size=64", "data.val_size=8", "data.batch_size=8",
       "+model.lr_scheduler.total_steps=12", "model.lr_scheduler.warmup_steps=2", "+trainer.limit_val_batches=0",
       "model.sample_every_n_steps=0", "seed=3"]


@pytest.mark.parametrize("stop", [5, 8], ids=["mid_epoch", "epoch_end"])
def test_diffusion_resumes_exactly_after_max_steps(tmp_path, stage1, stop):
    """A finished run extended with a larger max_steps continues as if it had never stopped."""
    ldm = LDM + [f"model.first_stage.ckpt={stage1}"]
    full = _train(tmp_path, "full", ldm + ["trainer.max_steps=12"])
    _train(tmp_path, "part", ldm + [f"trainer.max_steps={stop}"])
    resumed = _train(tmp_path, "part", ldm + ["trainer.max_steps=12", "ckpt_path=last"])
    assert_same_end_state(full, resumed)


@pytest.mark.parametrize("objective", ["rectified_flow", "edm"])
def test_other_objectives_resume_exactly(tmp_path, stage1, objective):
    """Their noise levels and noise come from the same keyed draws: a stop mid-epoch resumes bit for bit."""
    ldm = LDM + [f"model.first_stage.ckpt={stage1}", f"model/objective={objective}"]
    full = _train(tmp_path, "full", ldm + ["trainer.max_steps=12"])
    _train(tmp_path, "part", ldm + ["trainer.max_steps=5"])
    resumed = _train(tmp_path, "part", ldm + ["trainer.max_steps=12", "ckpt_path=last"])
    assert_same_end_state(full, resumed)


def test_posthoc_ema_resumes_exactly(tmp_path, stage1):
    """The post-hoc EMA's running averages travel in the checkpoint: the resumed run's snapshots and EMAs are the
    uninterrupted run's, bit for bit (the stopped run adds its own last step's snapshot)."""
    ldm = LDM + [f"model.first_stage.ckpt={stage1}", "callbacks=[default,posthoc_ema]",
                 "callbacks.posthoc_ema.every_n_steps=4"]
    full = _train(tmp_path, "full", ldm + ["trainer.max_steps=12"])
    _train(tmp_path, "part", ldm + ["trainer.max_steps=5"])
    resumed = _train(tmp_path, "part", ldm + ["trainer.max_steps=12", "ckpt_path=last"])
    assert_same_end_state(full, resumed)
    a, b = (dict(_tensors(read_checkpoint(p)["callbacks"]["PostHocEMA"])) for p in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)
    from safetensors.torch import load_file

    kept = {p.name: p for p in (full.parent / "posthoc_ema").iterdir()}
    again = {p.name: p for p in (resumed.parent / "posthoc_ema").iterdir()}
    assert len(kept) == 6 and set(again) == set(kept) | {"sigma_rel_0.05_step_0000005.safetensors",
                                                          "sigma_rel_0.1_step_0000005.safetensors"}
    for name, path in kept.items():
        x, y = load_file(str(path)), load_file(str(again[name]))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


# the schedule's length left to the run (trainer.max_steps): counting it must not cost the loader its position
OTHER_STOPS = ["+experiment=quickstart_ldm", "data.train_size=64", "data.val_size=8", "data.batch_size=8",
               "model.lr_scheduler.warmup_steps=2", "+trainer.limit_val_batches=0", "model.sample_every_n_steps=0",
               "trainer.max_steps=12", "seed=4", "callbacks.progress_log.every_n_steps=1"]


@pytest.fixture(scope="module")
def full_ldm_run(tmp_path_factory, stage1) -> tuple[Path, list[str]]:
    args = OTHER_STOPS + [f"model.first_stage.ckpt={stage1}"]
    return _train(tmp_path_factory.mktemp("full"), "full", args), args


def test_diffusion_resumes_exactly_after_its_time_limit(tmp_path, full_ldm_run):
    full, args = full_ldm_run
    slow = ["+callbacks.slow._target_=resume_helpers.SlowSteps", "+callbacks.slow.seconds=0.5"]
    # min_epochs=0: Lightning would otherwise finish the first epoch before it honours the limit
    stopped = _train(tmp_path, "part", args + slow + ["+trainer.max_time=00:00:00:03", "trainer.min_epochs=0"])
    assert 0 < read_checkpoint(stopped)["global_step"] < 8  # cut short by the time limit, in the first epoch
    assert_same_end_state(full, _train(tmp_path, "part", args + ["ckpt_path=last"]))


def test_diffusion_resumes_exactly_after_a_keyboard_interrupt(tmp_path, full_ldm_run):
    """Ctrl-C ends the run without a new checkpoint (Lightning's graceful shutdown); the last one it saved, at the
    end of epoch 0, resumes exactly."""
    full, args = full_ldm_run
    # signalled 3 slow steps before the end: a busy machine may read the progress line a second late
    returncode, printed = _signal_at(tmp_path / "part", args + ["+callbacks.slow.seconds=0.6"], "step 9/12",
                                     signal.SIGINT)
    assert returncode != 0 and "KeyboardInterrupt" in printed, printed[-3000:]
    assert read_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert_same_end_state(full, _train(tmp_path, "part", args + ["ckpt_path=last"]))


def test_ckpt_path_last_passes_over_a_truncated_checkpoint(tmp_path):
    from sdlight.checkpoints import save_atomic

    folder = tmp_path / "checkpoints"
    save_atomic({"global_step": 3, "loops": {}, "state_dict": {"w": torch.ones(2)}}, folder / "step_3.ckpt")
    time.sleep(0.01)
    good = (folder / "step_3.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(good[: len(good) // 2])  # newer, but cut off
    found, passed = newest_checkpoint(folder)
    assert found == folder / "step_3.ckpt"
    assert passed and passed[0].startswith("last.ckpt")


def test_a_rollback_passes_over_checkpoints_saved_during_the_streak(tmp_path):
    """Skipped steps still count: a checkpoint saved among them may hold the weights that diverged, so the newest one
    from before the streak is taken (and the newer one is named as passed over)."""
    from sdlight.checkpoints import save_atomic

    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        save_atomic({"global_step": step, "loops": {}, "state_dict": {"w": torch.ones(2) * step}},
                    folder / f"step_{step}.ckpt")
        time.sleep(0.01)
    assert newest_checkpoint(folder)[0] == folder / "step_4.ckpt"
    found, passed = newest_checkpoint(folder, max_step=3)
    assert found == folder / "step_2.ckpt" and passed == ["step_4.ckpt: saved at step 4, after step 3"]
    assert newest_checkpoint(folder, max_step=1)[0] is None
