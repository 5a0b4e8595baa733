"""Resume-path choice (ckpt_path=last, resume=auto|slurm), W&B id and requeue under SLURM, loss-spike rollback."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from sdlight.callbacks.preemption import PreemptionCheckpoint, slurm_job_id
from sdlight.callbacks.rollback import NonFiniteRollback
from sdlight.checkpoints import save_atomic
from sdlight.errors import UsageError
from sdlight.stages.guard import NonFiniteGuard
from sdlight.train import resume_path, wandb_id_from_slurm


def _cfg(run_dir, **kwargs):
    return OmegaConf.create({"paths": {"output_dir": str(run_dir)}, "task_name": "t", "ckpt_path": None,
                             "resume": "slurm", **kwargs})


def _ckpt(path, step):
    save_atomic({"global_step": step, "loops": {}, "state_dict": {}}, path)
    time.sleep(0.01)  # distinct modification times
    return path


def test_resume_path_last_auto_and_slurm(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "runs" / "2026-01-01_00-00-00_77"
    with pytest.raises(UsageError, match="no readable checkpoint"):
        resume_path(_cfg(run, ckpt_path="last"))
    assert resume_path(_cfg(run, resume="auto")) is None  # nothing yet: a new run
    _ckpt(run / "checkpoints" / "step_2.ckpt", 2)
    last = _ckpt(run / "checkpoints" / "last.ckpt", 4)
    assert resume_path(_cfg(run, ckpt_path="last")) == str(last)
    assert resume_path(_cfg(tmp_path / "elsewhere", ckpt_path=str(run))) == str(last)  # a run directory
    assert resume_path(_cfg(run)) is None  # resume=slurm outside SLURM: a fresh run
    assert resume_path(_cfg(run, resume="auto")) == str(last)

    # a requeued job: a new run directory (new time, same job id) finds its earlier one
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    again = tmp_path / "runs" / "2026-01-01_01-00-00_77"
    assert resume_path(_cfg(again)) == str(last)
    with pytest.raises(UsageError, match="resume=sometimes"):
        resume_path(_cfg(again, resume="sometimes"))


def test_wandb_run_id_from_the_slurm_job(monkeypatch):
    cfg = OmegaConf.create({"task_name": "quickstart_ldm", "logger": {"wandb": {"id": None}}})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    wandb_id_from_slurm(cfg)
    assert cfg.logger.wandb.id is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    wandb_id_from_slurm(cfg)
    assert cfg.logger.wandb.id == "quickstart_ldm-4242"


def test_requeue_calls_scontrol_with_the_array_task(monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "99_3"
    assert PreemptionCheckpoint._requeue(SimpleNamespace(is_global_zero=True))
    assert calls == [["scontrol", "requeue", "99_3"]]


class Spiky(L.LightningModule):
    """Linear regression whose loss is NaN on batches 5, 6 and 7 (skipped as the stages skip them)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.guard = NonFiniteGuard(max_in_a_row=10)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if not self.guard.check(self, loss * float("nan") if batch_idx in (5, 6, 7) else loss, where="test"):
            return None
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rollback_after_nonfinite_steps(tmp_path, caplog):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 2)), batch_size=4)
    rollback = NonFiniteRollback(after_nonfinite=2)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2,
                                                      save_top_k=-1)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[rollback, checkpoints], default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="sdlight"):
        trainer.fit(Spiky(), data)
    assert rollback.rollbacks == 1
    assert any("rolled back to" in r.message for r in caplog.records)


def test_a_slurm_job_has_one_run_directory_across_requeues(monkeypatch):
    from omegaconf import OmegaConf

    from sdlight.hydra_utils import register_resolvers

    register_resolvers()
    cfg = OmegaConf.create({"dir": "runs/${run_name:2026-01-01_00-00-00}"})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert cfg.dir == "runs/2026-01-01_00-00-00"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert cfg.dir == "runs/slurm_4242"  # the same after a requeue: same job id, no time in the name
