"""Support for the entry points: the only place besides them that touches Hydra and OmegaConf."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("sdlight")

CONFIG_PATH = "pkg://sdlight.conf"


def register_resolvers() -> None:
    """``${slurm_suffix:}`` → ``_<job id>`` inside a SLURM job, else empty (run directory names)."""
    if not OmegaConf.has_resolver("slurm_suffix"):
        OmegaConf.register_new_resolver(
            "slurm_suffix", lambda: f"_{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "")


def _instantiate_dict(cfg: DictConfig | None, what: str) -> list[Any]:
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a dict of named `_target_` nodes, got {type(cfg).__name__}")
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info(f"Instantiating {what[:-1]} <{node._target_}> ({name})")
            objects.append(hydra.utils.instantiate(node))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    return _instantiate_dict(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Any]:
    return _instantiate_dict(cfg, "loggers")


def wandb_has_api_key() -> bool:
    """True when W&B could log in: an API key in the environment or in ~/.netrc (no network call)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb(cfg: DictConfig) -> None:
    """Goes offline when W&B has no API key (saying so once) and groups multirun jobs by their sweep."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node:
        return
    with open_dict(node):
        offline_mode = os.environ.get("WANDB_MODE", "") in ("offline", "dryrun", "disabled")
        if not node.get("offline") and (offline_mode or not wandb_has_api_key()):
            node.offline = True
            log.warning("W&B: no API key found, logging offline to %s (upload later with `wandb sync <that "
                        "run's wandb/offline-run-* dir>`)", node.get("save_dir"))
        if not node.get("group"):
            try:
                hc = hydra.core.hydra_config.HydraConfig.get()
                if hc.mode == hydra.types.RunMode.MULTIRUN:
                    node.group = Path(hc.sweep.dir).name
            except ValueError:  # composed without @hydra.main (tests, notebooks)
                pass


def finish_wandb() -> None:
    """Closes a W&B run, if one is open, so the next multirun job starts a fresh one."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            log.info("Closing W&B run")
            wandb.finish()


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None, resolve: bool = False) -> None:
    """Prints the composed config as a rich tree (main groups first) and saves it as config_tree.log."""
    import rich
    import rich.syntax
    import rich.tree

    order = ["data", "model", "callbacks", "logger", "trainer", "paths", "extras"]
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for field in fields:
        branch = tree.add(str(field), style="bold", guide_style="dim")
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=resolve) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_dir is not None:
        with open(Path(save_dir, "config_tree.log"), "w") as f:
            rich.print(tree, file=f)


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras")
    if not extras:
        return
    if extras.get("ignore_warnings"):
        log.info("Ignoring Python warnings (extras.ignore_warnings=True)")
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ValueError("extras.enforce_tags is set but no tags were given: add tags=[...]")
    if extras.get("print_config"):
        output_dir = cfg.get("paths", {}).get("output_dir")
        print_config_tree(cfg, save_dir=output_dir, resolve=True)


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Logs a failing task's exception to the run's log file and always closes W&B, so multirun jobs stay apart."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("Task failed")
            raise
        finally:
            output_dir = cfg.get("paths", {}).get("output_dir")
            log.info(f"Output dir: {output_dir}")
            finish_wandb()

    return wrapped


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value of ``name`` among the logged metrics, for sweepers; a clear error if it was never logged."""
    if not name:
        log.info("No optimized_metric set: returning nothing to the sweeper")
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    value = metrics[name]
    value = float(value.item() if hasattr(value, "item") else value)
    log.info(f"Retrieved metric value {name}={value}")
    return value
