"""Post-hoc EMA: the EMA of any length rebuilt after training from a run's snapshots (EDM2), one checkpoint each.

    python -m sdlight.train ... 'callbacks=[default,posthoc_ema]'        # the run keeps the snapshots
    python -m sdlight.posthoc_ema run=RUN_DIR sigma_rel=0.1
    python -m sdlight.posthoc_ema -m run=RUN_DIR sigma_rel=0.03,0.05,0.1,0.15,0.2   # a sweep, one file each

Writes ``<run>/posthoc_ema/sigma_rel_<s>_step_<n>.ckpt``: the run's last checkpoint (config, VAE, scale factor)
with the rebuilt weights as its EMA weights, which `sdlight.sample`, `sdlight.evaluate`, `sdlight.export` and
``model.init_from`` read by default (``use_ema=false``: the run's raw weights). It holds no training state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from sdlight.checkpoints import CheckpointError, ema_slot, latent_diffusion_config, read_checkpoint, save_atomic
from sdlight.errors import UsageError
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors
from sdlight.stages.posthoc_ema import SNAPSHOT_DIR, Snapshot, Synthesis, find_snapshots, synthesize

log = logging.getLogger("sdlight")
register_resolvers()
TRAINING_STATE = ("loops", "optimizer_states", "lr_schedulers", "callbacks", "global_step", "epoch")


def snapshot_folder(run: Path) -> tuple[Path, list[Snapshot]]:
    """The snapshot folder and its snapshots; ``run`` may be the run directory, its checkpoint folder, or the
    snapshot folder itself."""
    for folder in (run / "checkpoints" / SNAPSHOT_DIR, run / SNAPSHOT_DIR, run):
        snapshots = find_snapshots(folder)
        if snapshots:
            return folder, snapshots
    raise UsageError(f"run={run}: no post-hoc EMA snapshots there (checkpoints/{SNAPSHOT_DIR}/sigma_rel_*_step_*"
                     ".safetensors); train with 'callbacks=[default,posthoc_ema]' to keep them")


def with_weights(ckpt: dict[str, Any], synthesis: Synthesis) -> dict[str, Any]:
    """A copy of ``ckpt`` whose EMA slots (its live weights if it keeps no EMA) hold ``synthesis``'s tensors."""
    sd = dict(ckpt["state_dict"])
    has_ema = any(k.startswith("model_ema.module.") for k in sd)
    slots = {k for k in sd if k.startswith("model_ema.module.")} if has_ema else None
    for name, value in synthesis.tensors.items():
        key = (ema_slot(name) or name) if has_ema else name
        if key not in sd or sd[key].shape != value.shape:
            raise CheckpointError(f"the snapshots' {name} has no counterpart of its shape in the checkpoint: "
                                  "they come from another model")
        sd[key] = value.to(sd[key].dtype)
        if slots is not None:
            slots.discard(key)
    if slots:
        raise CheckpointError(f"the snapshots lack {len(slots)} of the checkpoint's EMA tensors (e.g. "
                              f"{sorted(slots)[0]}): they come from another model")
    if has_ema:
        sd["model_ema.n_averaged"] = torch.clamp(sd["model_ema.n_averaged"], min=1)
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    out["state_dict"] = sd
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="posthoc_ema")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run = Path(str(cfg.run))
        folder, snapshots = snapshot_folder(run)
        base = Path(str(cfg.ckpt)) if cfg.ckpt else folder.parent / "last.ckpt"
        ckpt = read_checkpoint(base)
        latent_diffusion_config(ckpt, base)
        values = list(cfg.sigma_rel) if isinstance(cfg.sigma_rel, ListConfig) else [cfg.sigma_rel]
        out_dir = Path(str(cfg.out)) if cfg.out else folder.parent.parent / SNAPSHOT_DIR
        for sigma_rel in map(float, values):
            try:
                synthesis = synthesize(snapshots, sigma_rel, cfg.step)
            except ValueError as e:
                raise UsageError(f"sigma_rel={sigma_rel}, step={cfg.step}: {e}") from None
            step = max(s.step for s, _ in synthesis.coefficients)
            result = with_weights(ckpt, synthesis)
            result["posthoc_ema"] = {"sigma_rel": sigma_rel, "step": step, "profile_error": synthesis.error,
                                     "snapshots": [[s.path.name, c] for s, c in synthesis.coefficients],
                                     "from": str(base)}
            path = out_dir / f"sigma_rel_{sigma_rel!r}_step_{step:07d}.ckpt"
            save_atomic(result, path)
            log.info(f"sigma_rel {sigma_rel} at step {step}: {len(synthesis.coefficients)} snapshots, profile "
                     f"matched to {synthesis.error:.1e} (relative L2) -> {path}")


if __name__ == "__main__":
    main()
