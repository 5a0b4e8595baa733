"""Support for the entry points: the only place besides them that touches Hydra and OmegaConf."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import MissingMandatoryValue

from sdlight.errors import UsageError
from sdlight.weights import WeightsNotFoundError

log = logging.getLogger("sdlight")

CONFIG_PATH = "pkg://sdlight.conf"


def register_resolvers() -> None:
    """Run directory names. ``${slurm_suffix:}`` → ``_<job id>`` inside a SLURM job, else empty (sweep
    directories); ``${run_name:STAMP}`` → ``slurm_<job id>`` inside a SLURM job, else STAMP, so that a requeued job
    (same job id) comes back to its own run directory, its checkpoints and its log."""
    if not OmegaConf.has_resolver("slurm_suffix"):
        OmegaConf.register_new_resolver(
            "slurm_suffix", lambda: f"_{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "")
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver(
            "run_name", lambda stamp: f"slurm_{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else stamp)


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


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None, resolve: bool = False,
                      full: bool = True) -> None:
    """The composed config as a rich tree (main groups first), saved as config_tree.log in ``save_dir``; printed
    whole with ``full``, else as a few lines: the config chosen in each group, the overrides, and where the
    tree is."""
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
    saved = None
    if save_dir is not None:
        saved = Path(save_dir, "config_tree.log")
        with open(saved, "w") as f:
            rich.print(tree, file=f)
    if full:
        rich.print(tree)
        return
    for line in config_summary(cfg, saved):
        log.info(line)


def config_summary(cfg: DictConfig, saved: Path | None) -> list[str]:
    """A few lines in place of the whole tree: each group's chosen config, the command-line overrides, and the
    files that hold the whole config."""
    lines = []
    try:
        hc = hydra.core.hydra_config.HydraConfig.get()
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
        lines.append("Config: " + " ".join(f"{k}={v}" for k, v in choices.items()))
        if hc.overrides.task:
            lines.append("Overrides: " + " ".join(hc.overrides.task))
    except ValueError:  # composed without @hydra.main
        lines.append(f"Config: data={cfg.data.get('_target_', '?')} model={cfg.model.get('_target_', '?')}")
    if saved is not None:
        lines.append(f"Whole config: {saved} (print it here with extras.print_config=full)")
    return lines


# Lightning's lines that say nothing about the run: advertisements, and a note that our own summary callback is used
_LIGHTNING_NOISE = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Drops Lightning's tips and a torch deprecation that Lightning triggers inside its own code (nothing a user
    can act on); every other Lightning message and warning stays."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras")
    if not extras:
        return
    if extras.get("ignore_warnings"):
        log.info("Ignoring Python warnings (extras.ignore_warnings=True)")
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise UsageError("extras.enforce_tags is set but no tags were given: add tags=[...]")
    mode = extras.get("print_config")
    if mode:
        output_dir = cfg.get("paths", {}).get("output_dir")
        print_config_tree(cfg, save_dir=output_dir, resolve=True, full=str(mode).lower() == "full")


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Logs a failing task's exception to the run's log file and always closes W&B, so multirun jobs stay apart."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            if _user_error(err) is None:
                log.exception("Task failed")
            raise  # a user's mistake is reported in one line by `user_errors` at the entry point
        finally:
            output_dir = cfg.get("paths", {}).get("output_dir")
            log.info(f"Output dir: {output_dir}")
            finish_wandb()

    return wrapped


# other names of config groups on the command line: the backbone group keeps its first name, model/unet, in configs
# (experiments' overrides, sweeper params) and checkpoints, whatever the backbone (UNet, MMDiT, DiT)
GROUP_ALIASES = {"model/backbone": "model/unet"}


def spelled_out(args: Sequence[str]) -> list[str]:
    """Command-line arguments with group aliases replaced by their group, whatever the override's prefix (+, ++,
    ~) or value (a sweep's list): ``model/backbone=mmdit_tiny`` is ``model/unet=mmdit_tiny``, exactly."""
    out = []
    for arg in args:
        prefix = re.match(r"^(\+\+|\+|~)?", arg).group(0)
        key, sep, value = arg[len(prefix):].partition("=")
        out.append(prefix + GROUP_ALIASES[key] + sep + value if key in GROUP_ALIASES else arg)
    return out


# Lightning's MisconfigurationException: trainer options this machine cannot honour (trainer=gpu without a GPU, ...)
USER_ERRORS = (UsageError, WeightsNotFoundError, MissingMandatoryValue, MisconfigurationException)


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of spaces folded into single spaces."""
    return re.sub(r"\s+", " ", message).strip()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """At an entry point: a user's mistake is logged as one line and the process exits with status 2.

    Bugs keep their traceback; so does a mistake when ``HYDRA_FULL_ERROR=1``.
    """
    try:
        yield
    except Exception as raised:
        err = _user_error(raised)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, MissingMandatoryValue):
            key = err.full_key or "a value"
            message = f"{key} is required and was not given: add {key}=... to the command line"
        else:
            message = str(err.args[0]) if err.args else str(err)
        if isinstance(err, MisconfigurationException):
            message = f"the trainer settings cannot run here: {message}"
        message = one_line(message)
        print(f"Error: {message}", file=sys.stderr)
        # the run's log file keeps it too (Hydra's console handler would print it a second time, on stdout)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        sys.exit(2)


def _user_error(err: BaseException | None) -> BaseException | None:
    """``err`` or the user error it wraps (``hydra.utils.instantiate`` re-raises with the original as cause)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, USER_ERRORS):
            return err
        err, seen = err.__cause__, seen + 1
    return None


def sweeping_with_optimizer() -> bool:
    """True when this job is one of a multirun whose sweeper needs each job's return value (Optuna, ...)."""
    try:
        hc = hydra.core.hydra_config.HydraConfig.get()
    except ValueError:  # composed without @hydra.main
        return False
    if hc.mode != hydra.types.RunMode.MULTIRUN:
        return False
    target = str((hc.get("sweeper") or {}).get("_target_", ""))
    return not target.endswith("BasicSweeper")


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value of ``name`` among the logged metrics, for sweepers.

    Never logged (a run shorter than its first validation, say): a warning and ``None`` — except for a sweeper that
    optimizes the value, which gets a one-line error.
    """
    if not name:
        log.info("No optimized_metric set: returning nothing to the sweeper")
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "nothing"
        message = (f"optimized_metric={name} was not logged by this run (it logged: {logged}); validation may not "
                   "have run: lower trainer.val_check_interval or set optimized_metric to one of those")
        if sweeping_with_optimizer():
            raise UsageError(message)
        log.warning(message)
        return None
    value = metrics[name]
    value = float(value.item() if hasattr(value, "item") else value)
    log.info(f"Retrieved metric value {name}={value}")
    return value


# command-line choices whose configs need a plugin of the [sweep] extra: (group, option) -> (modules, package)
_OPTUNA = (("hydra_plugins.hydra_optuna_sweeper", "optuna"), "hydra-optuna-sweeper")
_SUBMITIT = (("hydra_plugins.hydra_submitit_launcher", "submitit"), "hydra-submitit-launcher")
SWEEP_PLUGINS = {("hparams_search", "optuna"): _OPTUNA, ("hydra/sweeper", "optuna"): _OPTUNA,
                 ("launcher", "slurm"): _SUBMITIT, ("hydra/launcher", "submitit_slurm"): _SUBMITIT,
                 ("hydra/launcher", "submitit_local"): _SUBMITIT}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package (hydra_plugins)
        return False


def check_sweep_plugins(overrides: Sequence[str]) -> None:
    """Before Hydra composes: a choice that needs a plugin of the [sweep] extra, which is not installed, is a
    :class:`UsageError` naming the extra (Hydra itself would only say it "could not find 'hydra/sweeper/optuna'")."""
    for arg in overrides:
        group, _, option = arg.lstrip("+~").partition("=")
        modules, package = SWEEP_PLUGINS.get((group, option), ((), ""))
        if not all(_importable(m) for m in modules):
            raise UsageError(f"{arg} needs {package} (the [sweep] extra), which is not installed: "
                             'pip install -e ".[sweep]" in a checkout of sdlight, or pip install "sdlight[sweep]"')
