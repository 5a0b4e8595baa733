"""Every notebook's code cells run top to bottom (in one namespace, as a kernel would); the notebooks with
pictures are committed with their outputs (run ``python notebooks/execute.py notebooks/NAME.ipynb`` to refresh)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# seconds to minutes of training and sampling: run with the slow tests
SLOW = {"diffusion_basics.ipynb", "train_and_sample.ipynb"}


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [])
                                  for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path):
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(code_cells(path)):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)


@pytest.mark.parametrize("name", sorted(SLOW))
def test_notebooks_with_pictures_are_committed_executed(name):
    cells = code_cells(next(p for p in NOTEBOOKS if p.name == name))
    assert all(c.get("execution_count") for c in cells), "every code cell has run"
    pictures = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) >= 4


def test_there_are_notebooks():
    assert NOTEBOOKS
