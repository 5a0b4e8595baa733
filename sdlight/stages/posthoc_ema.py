"""Post-hoc EMA (EDM2, Karras et al. 2024, section 3 and appendix C): power-function EMAs kept during training,
their snapshots on disk, and the EMA of any other length rebuilt from them afterwards.

A power-function EMA with exponent gamma averages the weights of steps 1..t with weights growing as step^gamma
(its update: ``ema = beta ema + (1 - beta) w`` with ``beta = (1 - 1/t)^(gamma + 1)``); its length is given as
``sigma_rel``, the std of that profile relative to t. Snapshots of two such EMAs every N steps span a space of
profiles; the EMA of another ``sigma_rel`` at a time t is the least-squares combination of the snapshots whose
profiles best match its own (the inner products of power-function profiles are closed-form).

Plain torch and safetensors: the Lightning callback (`sdlight.callbacks.posthoc_ema`) and the entry point
(`python -m sdlight.posthoc_ema`) use these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SNAPSHOT_DIR = "posthoc_ema"  # inside the run's checkpoint folder
_NAME = re.compile(r"^sigma_rel_(?P<sigma>[0-9.e+-]+)_step_(?P<step>\d+)\.safetensors$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile whose relative std is ``sigma_rel`` (EDM2 eq. 3:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the largest real root)."""
    if not 0 < sigma_rel < 12 ** -0.5:  # gamma -> 0 (a plain running mean) at sigma_rel = 1 / sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    t = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(step: int, gamma: float) -> float:
    """The decay of the update after ``step`` optimizer steps (1 at the first: beta 0, a copy)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """Inner products of normalised power-function profiles ending at ``t_a`` and ``t_b`` (EDM2 Algorithm 3)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp / ((gamma_a + gamma_b + 1) * t_max)


def solve_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
                       ) -> tuple[np.ndarray, float]:
    """Coefficients of the snapshots (their ``steps`` and ``gammas``) whose sum best matches the profile
    (``step``, ``gamma``), and the relative L2 error of that match (0: the target is one of the snapshots)."""
    t_i = np.asarray(steps, dtype=np.float64).reshape(-1, 1)
    g_i = np.asarray(gammas, dtype=np.float64).reshape(-1, 1)
    t_r, g_r = np.float64(step).reshape(1, 1), np.float64(gamma).reshape(1, 1)
    a = profile_dot(t_i, g_i, t_i.T, g_i.T)
    b = profile_dot(t_i, g_i, t_r, g_r)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    target = profile_dot(t_r, g_r, t_r, g_r).item()
    residual = max(target - 2 * (x.T @ b).item() + (x.T @ a @ x).item(), 0.0)
    return x[:, 0], math.sqrt(residual / target)


class PowerEMA:
    """Power-function EMAs of some tensors, one per ``sigma_rel``: ``update(tensors, step)`` after each optimizer
    step (``step`` = steps done, from 1). Integer tensors are copied."""

    def __init__(self, sigma_rels: Sequence[float]):
        if len(set(sigma_rels)) < 2:
            raise ValueError(f"post-hoc EMA needs at least two different sigma_rel profiles, got {list(sigma_rels)}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages: list[dict[str, Tensor]] = []
        self.step = 0

    @torch.no_grad()
    def update(self, tensors: dict[str, Tensor], step: int) -> None:
        if not self.averages:
            self.averages = [{k: v.detach().clone() for k, v in tensors.items()} for _ in self.gammas]
        else:
            floats = [k for k, v in tensors.items() if v.is_floating_point()]
            others = [k for k, v in tensors.items() if not v.is_floating_point()]
            current = [tensors[k].detach() for k in floats]
            for average, gamma in zip(self.averages, self.gammas):  # one multi-tensor kernel per profile
                torch._foreach_lerp_([average[k] for k in floats], current, 1.0 - power_beta(step, gamma))
                for k in others:
                    average[k].copy_(tensors[k])
        self.step = step

    def state_dict(self) -> dict:
        return {"sigma_rels": self.sigma_rels, "step": self.step, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint's post-hoc EMA has sigma_rels {state['sigma_rels']}, this run "
                             f"{self.sigma_rels}: resume with the same callbacks.posthoc_ema.sigma_rels")
        self.step, self.averages = int(state["step"]), state["averages"]


# ------------------------------------------------------------------------------------------------ snapshots
@dataclass(frozen=True)
class Snapshot:
    path: Path
    sigma_rel: float
    step: int

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)


def snapshot_path(folder: str | Path, sigma_rel: float, step: int) -> Path:
    return Path(folder) / f"sigma_rel_{float(sigma_rel)!r}_step_{step:07d}.safetensors"


def save_snapshot(folder: str | Path, sigma_rel: float, step: int, tensors: dict[str, Tensor],
                  dtype: torch.dtype | None = None) -> Path:
    from sdlight.checkpoints import save_safetensors

    path = snapshot_path(folder, sigma_rel, step)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in tensors.items()}
    save_safetensors(cast, path)
    return path


def find_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in ``folder``, by step then sigma_rel."""
    found = []
    for path in Path(folder).glob("sigma_rel_*_step_*.safetensors"):
        match = _NAME.match(path.name)
        if match:
            found.append(Snapshot(path, float(match["sigma"]), int(match["step"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


@dataclass
class Synthesis:
    tensors: dict[str, Tensor]
    coefficients: list[tuple[Snapshot, float]]
    error: float  # relative L2 distance of the matched profile from the asked one


def synthesize(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None) -> Synthesis:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's), from the snapshots up to it,
    summed in float64 and returned in the snapshots' dtype."""
    from safetensors.torch import load_file

    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots")
    step = max(s.step for s in snapshots) if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used or max(s.step for s in used) < step:
        raise ValueError(f"no snapshot at step {step} (they are at steps {sorted({s.step for s in snapshots})}): "
                         "an EMA can be rebuilt only up to the last snapshot taken")
    x, error = solve_coefficients([s.step for s in used], [s.gamma for s in used], step, sigma_rel_to_gamma(sigma_rel))
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for snapshot, c in zip(used, x):
        for k, v in load_file(str(snapshot.path)).items():
            dtypes.setdefault(k, v.dtype)
            if not v.is_floating_point():
                total[k] = v  # integer buffers: the latest value
            elif k in total:
                total[k] += float(c) * v.double()
            else:
                total[k] = float(c) * v.double()
    tensors = {k: v.to(dtypes[k]) for k, v in total.items()}
    return Synthesis(tensors, list(zip(used, x.tolist())), error)
