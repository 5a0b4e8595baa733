"""The GPU suites degrade to a message without (enough) GPUs, and their code runs end to end on a CPU at a tiny size; the
quickstart trade-off plot reads its committed points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--out", str(tmp_path / "r.md")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No CUDA device visible" in out.stdout
    assert not (tmp_path / "r.md").exists()


def test_gpu_suite_runs_its_measurements_on_a_cpu_at_a_tiny_size(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu

    out = tmp_path / "r.md"
    assert gpu.main(["--device", "cpu", "--configs", "tiny,mmdit_tiny", "--resolutions", "64", "--warmup", "1", "--iters", "1",
                     "--sample-steps", "2", "--sample-batch", "1", "--budget", "0", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| tiny (4 M) | 64² | eager | 2 |" in table
    assert "| tiny | 64² | 1 |" in table
    assert "| mmdit_tiny (" in table and "| mmdit_tiny | 64² | 1 |" in table  # a transformer backbone, its inputs
    # compiled runs come after the budget check: none fits in a budget of 0 s, and the table says so
    assert "| tiny | 64² | compiled | — | skipped: time budget" in table


def test_quickstart_tradeoff_plots_the_committed_points(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import quickstart_tradeoff as tradeoff

    points = tradeoff.read_points(ROOT / "benchmarks/quickstart_tradeoff.csv")
    assert sum(p["quickstart"] for p in points) == 1  # the stock configuration's point is marked once
    assert all(0 < p["minutes"] and 0 <= p["shape"] <= 100 and 0 <= p["all"] <= p["shape"] for p in points)
    image = tradeoff.plot(points)
    assert image.size == (800, 420) and len(image.getcolors(1 << 16)) > 3  # drawn, not blank
    empty = tmp_path / "empty.csv"
    empty.write_text("label,minutes,shape,all\n")
    with pytest.raises(ValueError, match="no points"):
        tradeoff.read_points(empty)


def test_the_op_profile_puts_each_sides_ops_in_its_column(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import torch

    from benchmarks.run import op_table

    a, w = torch.randn(768, 768), torch.randn(32, 16, 3, 3)  # a few ms each, so that 0.1 ms rounding shows them
    img = torch.randn(2, 16, 128, 128)
    table = op_table({"sdlight": lambda: a @ a, "diffusers": lambda: torch.nn.functional.conv2d(img, w)}, top=20)
    cells = [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]
    rows = {c[0].strip("`"): (float(c[1]), float(c[2])) for c in cells}
    assert rows["aten::mm"][0] > 0 and rows["aten::mm"][1] == 0
    conv = [k for k in rows if "conv" in k and rows[k][1] > 0]
    assert conv and all(rows[k][0] == 0 for k in conv)
    assert "all ops" in rows


def test_objectives_table_collects_runs_and_says_which_met_every_goal(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import objectives

    def run(name, **rates):
        folder = tmp_path / "runs" / name / "eval"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"scores": {f"adherence/{k}": v for k, v in rates.items()}}))

    good = dict(colour=1.0, shape=0.85, position=0.9, background=1.0, all=0.8)
    run("flow_b900_s1", **good)
    run("flow_b900_s2", **{**good, "shape": 0.79})  # one seed under the shape goal
    run("edm_b900_s1", **good)
    (tmp_path / "runs" / "not_a_run" / "eval").mkdir(parents=True)
    out = tmp_path / "objectives.csv"
    objectives.main(["--collect", str(tmp_path / "runs"), "--csv", str(out), "--out", str(tmp_path / "o.png")])
    rows = objectives.read_rows(out)
    assert [(r["objective"], r["batches"], r["seed"]) for r in rows] == [("edm", 900, 1), ("flow", 900, 1),
                                                                         ("flow", 900, 2)]
    entries = {e["objective"]: e for e in objectives.summary(rows)}
    assert entries["edm"]["all_goals_every_seed"] and not entries["flow"]["all_goals_every_seed"]
    assert entries["flow"]["shape"] == pytest.approx((82.0, 79.0, 85.0))
    assert "| flow | 900 | 2 | 100.0 | 82.0 (79.0-85.0) |" in objectives.markdown(objectives.summary(rows))
    image = objectives.plot(rows)
    assert image.size == (800, 420) and len(image.getcolors(1 << 16)) > 3
    assert (tmp_path / "o.png").is_file()
    for table in ("objectives.csv", "objectives_vae2.csv"):  # the measured runs of BENCHMARKS.md, one VAE each
        committed = objectives.read_rows(ROOT / "benchmarks" / table)
        assert all(0 <= r["all"] <= min(r["colour"], r["shape"], r["position"], r["background"]) for r in committed)


def test_objectives_table_of_digits_reads_the_judges_accuracy(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import objectives

    for name, accuracy in [("edm_b130_s1", 0.5), ("edm_b130_s2", 0.95), ("edm_b520_s1", 0.99), ("edm_b520_s2", 0.92)]:
        folder = tmp_path / "runs" / name / "eval"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"scores": {"digits/accuracy": accuracy,
                                                                    "digits/accuracy_3": 1.0}}))
    out = tmp_path / "digits.csv"
    objectives.main(["--kind", "digits", "--collect", str(tmp_path / "runs"), "--csv", str(out),
                     "--out", str(tmp_path / "d.png")])
    assert out.read_text().splitlines()[0] == "objective,batches,seed,accuracy"
    kind = objectives.KINDS["digits"]
    entries = objectives.summary(objectives.read_rows(out, kind), kind)
    assert [(e["batches"], e["all_goals_every_seed"]) for e in entries] == [(130, False), (520, True)]
    assert "| edm | 130 | 2 | 72.5 (50.0-95.0) | no |" in objectives.markdown(entries, kind)
    assert (tmp_path / "d.png").is_file()
    committed = objectives.read_rows(ROOT / "benchmarks/objectives_digits.csv", kind)  # BENCHMARKS.md's digits runs
    assert committed and all(0 <= r["accuracy"] <= 100 for r in committed)


def test_multi_gpu_suite_needs_two_devices_and_runs_ddp_and_fsdp_on_cpu_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    from benchmarks import gpu_parallel

    assert gpu_parallel.main(["--out", str(tmp_path / "none.md")]) == 0
    assert "needs 2 or more" in capsys.readouterr().out and not (tmp_path / "none.md").exists()
    out = tmp_path / "r.md"
    assert gpu_parallel.main(["--device", "cpu", "--world", "2", "--configs", "tiny", "--resolution", "64",
                              "--batch", "2", "--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| tiny | ddp | 64² | 2 |" in table and "| tiny | fsdp | 64² | 2 |" in table
