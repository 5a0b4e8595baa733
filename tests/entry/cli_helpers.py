"""Running a CLI as a user would, offline, and checking that a mistake is answered in one line (the tests import
this module from this folder)."""

from __future__ import annotations

import os
import subprocess
import sys


def cli_env(tmp_path, **extra) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDLIGHT_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               SDLIGHT_ROOT=str(tmp_path), SDLIGHT_WEIGHTS=str(tmp_path / "no-weights"), **extra)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(tool, args, tmp_path, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"sdlight.{tool}", *args], cwd=tmp_path,
                          env=cli_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout)


def assert_one_line(out, *needles) -> str:
    """Exit 2, no traceback, and exactly one output line carries the message (with every needle in it)."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, text[-3000:]
    assert lines[0] in out.stderr and lines[0].startswith("Error: ")
    assert "\\n" not in lines[0]
    return lines[0]


def assert_samples_one_image(ckpt, tmp_path, prompt: str = "a red circle", size: tuple[int, int] = (32, 32)):
    """``sdlight.sample`` draws one image of ``prompt`` from ``ckpt`` (2 steps, CPU), its metadata naming the prompt."""
    import json

    from PIL import Image

    out = tmp_path / "samples"
    run = run_cli("sample", [f"ckpt={ckpt}", f"prompt={prompt}", "num_samples=1", "steps=2", f"out={out}",
                             "device=cpu"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    image = Image.open(out / "00000.png")
    assert json.loads(image.text["sdlight"])["condition"] == prompt and image.size == size
