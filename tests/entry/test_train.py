"""train() end to end on tiny settings: through the Python API and the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlight.train import train

TINY = ["+experiment=quickstart_vae", "data.train_size=64", "data.val_size=16", "data.batch_size=8"]


def _env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDLIGHT_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               SDLIGHT_ROOT=str(tmp_path))
    env.pop("WANDB_API_KEY", None)
    return env


def test_fast_dev_run(train_cfg):
    cfg = train_cfg(TINY + ["+debug=fdr"])
    metrics, objects = train(cfg)
    assert "train/rec_loss" in metrics
    assert objects["trainer"].state.finished


def test_train_saves_last_checkpoint_and_resumes(train_cfg, tmp_path):
    cfg = train_cfg(TINY + ["trainer.max_epochs=1", "logger=csv", "callbacks=default",
                            "~callbacks.rich_progress_bar", "~callbacks.model_summary"])
    metrics, objects = train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # hyperparameters stay primitive
    assert ckpt["sdlight"]["config"]["model"]["_target_"].endswith("AutoencoderModule")
    assert any(k.startswith("encoder.down.0.block.0") for k in ckpt["state_dict"])
    assert "val/psnr" in metrics
    batches = objects["model"].batches

    cfg2 = train_cfg(TINY + ["trainer.max_epochs=2", "logger=csv", f"ckpt_path={last}", "callbacks=none"])
    _, objects2 = train(cfg2)
    assert objects2["model"].batches == 2 * batches  # resumed, not restarted


def test_a_new_run_in_a_used_run_directory_moves_the_earlier_checkpoints_aside(train_cfg, tmp_path, caplog):
    """Run twice into one directory (as `make quickstart` does): checkpoints/last.ckpt is the second run's, never
    the first's beside a last-v1.ckpt, and the first run's checkpoints are kept under another name."""
    args = TINY + ["data.train_size=16", "trainer.max_epochs=1", "logger=none", "+trainer.limit_val_batches=0",
                   "~callbacks.rich_progress_bar", "~callbacks.model_summary"]
    train(train_cfg(args + ["seed=1"]))
    first = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    train(train_cfg(args + ["seed=2"]))
    earlier = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints_earlier_")]
    assert len(earlier) == 1 and (earlier[0] / "last.ckpt").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() != first
    assert any("checkpoint(s) of an earlier run: moved to" in r.getMessage() for r in caplog.records)
    # resuming is not a new run: nothing is moved
    train(train_cfg(args + ["seed=2", "resume=auto", "trainer.max_epochs=2"]))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("checkpoints_earlier_")]) == 1


def test_wandb_offline_writes_run_files(train_cfg, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the key check alone must switch to offline
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = train_cfg(TINY + ["logger=wandb", "trainer.max_epochs=1", "callbacks=none",
                            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"])
    with caplog.at_level("WARNING", logger="sdlight"):
        train(cfg)
    assert any("offline" in r.message and "wandb sync" in r.message for r in caplog.records)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(f.endswith(".wandb") for f in files)  # the event log that `wandb sync` uploads
    assert "config.yaml" in files or any(f.endswith(".wandb") for f in files)
    assert "anonymous" not in capfd.readouterr().err  # W&B's deprecation warning, which Lightning's logger triggers


def test_optimized_metric_is_returned(train_cfg):
    from sdlight.hydra_utils import metric_value

    cfg = train_cfg(TINY + ["+debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                            "trainer.limit_val_batches=1"])
    metrics, _ = train(cfg)
    assert isinstance(metric_value(metrics, "val/psnr"), float)
    # never logged (a run shorter than its first validation): nothing to return, and no failure for a single run
    assert metric_value(metrics, "val/nonexistent") is None


def test_cli_run_and_multirun(tmp_path):
    args = [sys.executable, "-m", "sdlight.train", *TINY, "+debug=fdr"]
    out = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert "Tip:" not in printed and "LeafSpec" not in printed  # Lightning's advertisements, a torch deprecation
    assert "Overrides: " in printed and "data:" not in printed  # the config in a few lines, not the whole tree
    runs = list((tmp_path / "logs" / "debug" / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / ".hydra" / "config.yaml").is_file() and (runs[0] / "config_tree.log").is_file()

    sweep = [sys.executable, "-m", "sdlight.train", "-m", *TINY, "+debug=fdr", "model.optimizer.lr=1e-4,2e-4"]
    out = subprocess.run(sweep, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "debug" / "multiruns").iterdir())
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert "lr: 0.0002" in (sweeps[0] / "1" / ".hydra" / "config.yaml").read_text()


def test_cli_wrong_option_fails_cleanly(tmp_path):
    args = [sys.executable, "-m", "sdlight.train", "trainer=tpu"]
    out = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Could not find 'trainer/tpu'" in out.stderr
    assert "Traceback" not in out.stderr  # Hydra's message, not a stack trace from inside a module


def test_wheel_install_runs_from_any_directory(tmp_path):
    """A plain (non-editable) install carries conf/ inside the package as sdlight.conf."""
    root = Path(__file__).resolve().parents[2]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(root)], check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("sdlight-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    assert (site / "sdlight" / "conf" / "train.yaml").is_file()
    assert (site / "sdlight" / "conf" / "experiment" / "quickstart_vae.yaml").is_file()
    packages = {p.parent.relative_to(root) for p in (root / "sdlight").rglob("__init__.py")}
    assert packages and all((site / p / "__init__.py").is_file() for p in packages), "a package left out of the wheel"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(elsewhere)
    env["PYTHONPATH"] = str(site)
    code = "import sdlight, sdlight.pipeline, sdlight.stages.diffusion; print(sdlight.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    out = subprocess.run([sys.executable, "-m", "sdlight.train", *TINY, "+debug=fdr"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (elsewhere / "logs" / "debug" / "runs").is_dir()


def test_resuming_needs_training_state_not_only_weights(tmp_path):
    from sdlight.checkpoints import CheckpointError
    from sdlight.train import check_resume

    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "weights.ckpt")
    with pytest.raises(CheckpointError, match="holds weights but no training state"):
        check_resume(str(tmp_path / "weights.ckpt"))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3, "loops": {}}, tmp_path / "run.ckpt")
    check_resume(str(tmp_path / "run.ckpt"))  # a Lightning checkpoint passes
