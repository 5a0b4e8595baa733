"""Training entry point: ``python -m sdlight.train +experiment=NAME [overrides]`` (``-m`` for sweeps)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from sdlight.callbacks.preemption import Preempted
from sdlight.callbacks.resume import AtomicCheckpointIO, ExactResume, set_aside_earlier_checkpoints
from sdlight.callbacks.run_config import RunConfigInCheckpoint
from sdlight.callbacks.spawned_logging import SpawnedLogging
from sdlight.errors import UsageError
from sdlight.hydra_utils import (CONFIG_PATH, USER_ERRORS, apply_extras, check_sweep_plugins, instantiate_callbacks,
                                 instantiate_loggers, metric_value, prepare_wandb, quiet_lightning, register_resolvers,
                                 spelled_out, task_wrapper, user_errors)
from sdlight.threads import set_torch_threads

log = logging.getLogger("sdlight")
register_resolvers()


def _strategy(trainer_cfg: DictConfig, model: L.LightningModule) -> dict[str, Any]:
    """Stages whose steps leave some parameters without gradients (the GAN's alternating G/D steps) need DDP's
    find_unused_parameters; set it here so `trainer=ddp` works with every model."""
    strategy = trainer_cfg.get("strategy")
    if getattr(model, "ddp_find_unused_parameters", False) and isinstance(strategy, str) \
            and strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        from lightning.pytorch.strategies import DDPStrategy

        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}[strategy]
        return {"strategy": DDPStrategy(find_unused_parameters=True, start_method=start)}
    return {}


# where the exceptions a spawned process may hand back are defined: a preemption, or a user error (one line)
_SPAWNED_MODULES = ("sdlight.", "omegaconf.", "lightning.")


def spawned_error(err: BaseException) -> BaseException | None:
    """What a ``ddp_spawn`` process raised, rebuilt in the process that launched it, when it is a ``Preempted`` or
    a user error (sdlight.errors); else None, and the error keeps its traceback.

    torch re-raises a spawned process's exception as ``ProcessRaisedException`` holding only its traceback text, so
    a signal that stopped every rank cleanly would end the run with status 1 and a rank's one-line error (too many
    broken images) with a traceback. The exception's class is found by its name on the traceback's last line.
    """
    from torch.multiprocessing import ProcessRaisedException

    if not isinstance(err, ProcessRaisedException):
        return None
    last = str(err).rsplit("Traceback (most recent call last):", 1)[-1].splitlines()
    start = next((i for i, line in enumerate(last) if line and not line[0].isspace()), None)
    if start is None:
        return None
    name, _, message = "\n".join(last[start:]).partition(": ")
    module, _, class_name = name.rpartition(".")
    if not module.startswith(_SPAWNED_MODULES):
        return None
    try:
        cls = getattr(importlib.import_module(module), class_name)
        if not (isinstance(cls, type) and issubclass(cls, (Preempted, *USER_ERRORS))):
            return None
        return cls(message.strip())
    except Exception:  # a class that cannot be found or built from its message: the traceback stays
        return None


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume: ``ckpt_path`` as given; ``ckpt_path=last`` (or a run directory) for the newest
    readable checkpoint of this run directory (of that one); with ``resume=auto`` (``resume=slurm``, the default:
    inside a SLURM job, so a requeued job continues) the newest of this run directory if there is one."""
    from pathlib import Path

    from sdlight.checkpoints import newest_checkpoint
    from sdlight.errors import UsageError

    ckpt, resume = cfg.get("ckpt_path"), str(cfg.get("resume") or "never")
    if resume not in ("never", "auto", "slurm"):
        raise UsageError(f"resume={resume}: must be never, auto or slurm")
    run_dir = Path(cfg.paths.output_dir)
    if ckpt is not None and ckpt != "last" and not Path(ckpt).is_dir():
        return str(ckpt)
    if ckpt is None and not (resume == "auto" or (resume == "slurm" and "SLURM_JOB_ID" in os.environ)):
        return None
    folder = run_dir / "checkpoints" if ckpt in (None, "last") else Path(ckpt)
    folder = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    folders = [folder]
    job = os.environ.get("SLURM_JOB_ID")
    if ckpt is None and job:  # a requeued job keeps its id and its run directory; older runs named *_<job id>
        folders += [d / "checkpoints" for d in run_dir.parent.glob(f"*_{job}") if d != run_dir]
    found, passed = newest_checkpoint(*folders)
    for reason in passed:
        log.warning(f"Resume: passing over {reason}")
    if found is None:
        if ckpt is not None:
            raise UsageError(f"ckpt_path={ckpt}: no readable checkpoint in {folder} (to continue an earlier run, run "
                             "in its directory: hydra.run.dir=<that run's directory> ckpt_path=last)")
        log.info(f"resume={resume}: no checkpoint in {folder} yet, starting a new run")
        return None
    log.info(f"Resuming from {found}")
    return str(found)


def wandb_id_from_slurm(cfg: DictConfig) -> None:
    """Inside a SLURM job, the W&B run id is ``<task>-<job id>``: a requeued job logs on in its own W&B run."""
    node, job = (cfg.get("logger") or {}).get("wandb"), os.environ.get("SLURM_JOB_ID")
    if node and job and not node.get("id"):
        with open_dict(node):
            node.id = f"{cfg.task_name}-{job}"


def fit_global_batch(datamodule: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer) -> None:
    """``data.global_batch_size``: the per-process batch and the gradient accumulation for this many processes,
    the accumulation set where the model does it (stage 1's manual optimization) or else on the trainer."""
    fit = getattr(datamodule, "fit_global_batch", None)
    if fit is None or getattr(datamodule, "global_batch_size", None) is None:
        return
    accumulate = fit(trainer.world_size)
    owner, name = (model, "model.accumulate_grad_batches") if hasattr(model, "accumulate_grad_batches") else \
        (trainer, "trainer.accumulate_grad_batches")
    if owner.accumulate_grad_batches not in (1, accumulate):
        raise UsageError(f"{name}={owner.accumulate_grad_batches} and data.global_batch_size="
                         f"{datamodule.global_batch_size} both set the accumulation: give one of them")
    owner.accumulate_grad_batches = accumulate
    log.info(f"data.global_batch_size={datamodule.global_batch_size}: {datamodule.batch_size} per process x "
             f"{trainer.world_size} process(es) x {accumulate} accumulated batch(es)")


def check_resume(ckpt_path: str | None) -> None:
    """``ckpt_path`` must be a readable checkpoint before anything is built (a typo should not cost a model load)."""
    if ckpt_path is None:
        return
    from sdlight.checkpoints import CheckpointError, has_training_state, read_checkpoint

    try:
        ckpt = read_checkpoint(ckpt_path, mmap=True)  # mapped: fit() reads the tensors, this only looks
    except CheckpointError as err:
        raise CheckpointError(f"ckpt_path={ckpt_path}: {err}") from None
    if not has_training_state(ckpt):
        raise CheckpointError(f"ckpt_path={ckpt_path} holds weights but no training state, so it cannot be resumed; "
                              "use it as initialisation instead (model.init_from= for autoencoders)")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Composes the run from ``cfg``, fits (resuming from ``ckpt_path``), optionally tests.

    Returns (metrics, objects); the metric named by ``optimized_metric`` is what sweepers optimize.
    """
    ckpt_path = resume_path(cfg)
    check_resume(ckpt_path)
    quiet_lightning()
    set_torch_threads()  # the CPUs granted to this process (affinity, cgroup quota), unless OMP_NUM_THREADS is set
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks += [RunConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)), ExactResume(),
                  SpawnedLogging(prepare=quiet_lightning)]
    wandb_id_from_slurm(cfg)
    prepare_wandb(cfg)
    loggers = instantiate_loggers(cfg.get("logger"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger: `logger=none` must still run
        from lightning.pytorch.callbacks import LearningRateMonitor

        if any(isinstance(c, LearningRateMonitor) for c in callbacks):
            log.info("No logger: dropping the LearningRateMonitor callback")
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]

    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    # checkpoints written through a temporary file and a rename: a kill mid-write keeps the previous one
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **_strategy(cfg.trainer, model), **plugins)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    fit_global_batch(datamodule, model, trainer)

    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks,
               "loggers": loggers, "trainer": trainer}
    if cfg.get("train", True):
        if ckpt_path is None:  # a new run: an earlier run's last.ckpt in this directory must not pass for ours
            set_aside_earlier_checkpoints(callbacks)
        log.info("Starting training")
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        except Exception as raised:
            stop = raised if isinstance(raised, Preempted) else spawned_error(raised)
            if stop is None:
                raise
            if not isinstance(stop, Preempted):
                raise stop from None
            log.warning(str(stop))  # saved at a step boundary; exit 0 (a requeued SLURM job resumes from it)
            return dict(trainer.callback_metrics), objects
    metrics = dict(trainer.callback_metrics)

    if cfg.get("test"):
        log.info("Starting testing")
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(trainer.callback_metrics)
    return metrics, objects


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def run(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics, _ = train(cfg)
        if not (cfg.get("train", True) or cfg.get("test")):
            return None  # nothing ran, nothing to optimize
        return metric_value(metrics, cfg.get("optimized_metric"))


def main() -> None:
    """``python -m sdlight.train`` and ``sdlight-train``: group aliases spelled out (``model/backbone=`` is
    ``model/unet=``) and a missing sweep plugin named before Hydra composes (Hydra fails on it before any of
    ``run`` could)."""
    sys.argv[1:] = spelled_out(sys.argv[1:])
    with user_errors():
        check_sweep_plugins(sys.argv[1:])
    run()


if __name__ == "__main__":
    main()
