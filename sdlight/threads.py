"""How many CPU threads torch should use: the CPUs this process may really run on, not the machine's count.

A container or a SLURM allocation often grants fewer CPUs than the machine has (an affinity mask, a cgroup
quota). torch sizes its OpenMP pool from the machine, and threads beyond the granted CPUs spin against each
other: two trainings of two threads each on two cores ran ~17x slower each, not 2x. ``OMP_NUM_THREADS`` (or
``torch.set_num_threads``) set by the user always wins; on a machine shared with other heavy jobs set it to
the cores you mean this process to use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 (``cpu.max``) or v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) quota, rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota, period = float(fields[0]), float(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None and period and quota > 0:
        cpus = min(cpus, math.ceil(quota / period))
    return max(1, cpus)


def set_torch_threads(processes_per_machine: int = 1) -> int | None:
    """Caps torch's intra-op threads at the available CPUs shared by ``processes_per_machine`` processes, unless
    ``OMP_NUM_THREADS`` says otherwise; returns the number set (None when left alone)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    n = max(1, available_cpus() // max(1, processes_per_machine))
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
        return n
    return None
