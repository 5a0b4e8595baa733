"""Post-hoc EMA through the tool: a run with 'callbacks=[default,posthoc_ema]' keeps snapshots of two
power-function EMAs; `python -m sdlight.posthoc_ema` rebuilds the EMA of another length (or exactly one it kept)
into a checkpoint that the Pipeline and `sdlight.sample` read; mistakes are one line."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlight.checkpoints import read_checkpoint
from sdlight.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import assert_one_line, run_cli  # noqa: E402
from conftest import train_tiny_text_ldm  # noqa: E402

POSTHOC = ["callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.every_n_steps=2", "trainer.max_epochs=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posthoc")
    train_tiny_text_ldm(root, ["logger=none", *POSTHOC])  # 2 steps an epoch: 6 steps
    return root


def _snapshot(root: Path, sigma_rel: float, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "posthoc_ema" / f"sigma_rel_{sigma_rel!r}_step_{step:07d}.safetensors"))


def test_the_run_keeps_snapshots_of_both_profiles(run):
    names = sorted(p.name for p in (run / "checkpoints" / "posthoc_ema").iterdir())
    assert names == [f"sigma_rel_{s}_step_{n:07d}.safetensors" for s in ("0.05", "0.1") for n in (2, 4, 6)]
    last = _snapshot(run, 0.1, 6)
    assert any(k.startswith("model.diffusion_model.") for k in last)
    assert any(k.startswith("cond_stage_model.") for k in last)  # the learned text encoder trains: averaged too
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]["PostHocEMA"]
    assert state["step"] == 6 and state["sigma_rels"] == [0.05, 0.1]
    for k, v in last.items():
        assert torch.equal(state["averages"][1][k], v)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(last[key], _snapshot(run, 0.05, 6)[key])  # two profiles, two averages


def test_the_cli_rebuilds_emas_that_sample_reads(run, tmp_path):
    out = run_cli("posthoc_ema", ["-m", f"run={run}", "sigma_rel=0.1,0.07"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    kept = run / "posthoc_ema" / "sigma_rel_0.1_step_0000006.ckpt"
    rebuilt = run / "posthoc_ema" / "sigma_rel_0.07_step_0000006.ckpt"
    assert kept.is_file() and rebuilt.is_file()
    ckpt = read_checkpoint(kept)
    assert "optimizer_states" not in ckpt and "loops" not in ckpt  # weights to sample, not a run to resume
    assert ckpt["posthoc_ema"]["profile_error"] < 1e-6  # a profile the run kept comes back exactly
    assert read_checkpoint(rebuilt)["posthoc_ema"]["profile_error"] < 0.05
    pipe = Pipeline.from_checkpoint(kept, device="cpu")
    snapshot = _snapshot(run, 0.1, 6)
    model_sd = pipe.model.state_dict()
    for k, v in snapshot.items():
        torch.testing.assert_close(model_sd[k], v, rtol=1e-6, atol=1e-7)
    raw = Pipeline.from_checkpoint(kept, device="cpu", use_ema=False).model.state_dict()
    assert not torch.equal(raw["model.diffusion_model.out.2.weight"], model_sd["model.diffusion_model.out.2.weight"])
    sample = run_cli("sample", [f"ckpt={rebuilt}", "prompt=a red circle", "num_samples=1", "steps=2",
                                f"hydra.run.dir={tmp_path / 'samples'}"], tmp_path)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "post-hoc EMA weights (sigma_rel 0.07 at step 6)" in sample.stdout + sample.stderr


@pytest.mark.parametrize("args, needle", [
    (["sigma_rel=0.1"], "no post-hoc EMA snapshots"),
    (["sigma_rel=0.5"], "sigma_rel must be in"),
    (["sigma_rel=0.1", "step=5"], "no snapshot at step 5"),
], ids=["no_snapshots", "sigma_rel_range", "step"])
def test_mistakes_are_one_line(run, tmp_path, args, needle):
    where = tmp_path if needle.startswith("no post-hoc") else run
    assert_one_line(run_cli("posthoc_ema", [f"run={where}", *args], tmp_path), needle)
