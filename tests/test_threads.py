"""torch's thread count follows the CPUs granted to the process: affinity mask and cgroup quota."""

import os

import pytest
import torch

from sdlight import threads


@pytest.mark.parametrize("files, expected", [
    ({}, 8),                                              # no quota: the affinity mask
    ({"cpu.max": "max 100000\n"}, 8),                     # cgroup v2, unlimited
    ({"cpu.max": "250000 100000\n"}, 3),                  # cgroup v2, 2.5 CPUs → 3
    ({"cpu.max": "50000 100000\n"}, 1),                   # half a CPU → 1
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8),      # v1, unlimited
])
def test_available_cpus_reads_affinity_and_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.available_cpus(tmp_path) == expected


def test_set_torch_threads_caps_and_respects_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "available_cpus", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        torch.set_num_threads(2)
        assert threads.set_torch_threads() is None and torch.get_num_threads() == 2  # the user's choice wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.set_torch_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
