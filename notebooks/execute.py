"""Runs a notebook's code cells top to bottom in one namespace and stores their outputs in the file, as Jupyter
would: printed text as a stream, and a cell's last expression as a result (PNG for images, text otherwise).
No Jupyter needed (``jupyter nbconvert --execute --inplace`` does the same where it is installed).

    OMP_NUM_THREADS=1 python notebooks/execute.py notebooks/diffusion_basics.ipynb
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import sys
import time
from pathlib import Path


def _result(value) -> dict | None:
    if value is None:
        return None
    if hasattr(value, "_repr_png_"):  # PIL images (Jupyter shows them the same way)
        png = value._repr_png_()
        return {"image/png": base64.b64encode(png).decode(), "text/plain": [f"<{type(value).__name__}>"]}
    return {"text/plain": [repr(value)]}


def run_cell(source: str, namespace: dict, name: str) -> list[dict]:
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, name, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace) if last else None
    outputs = []
    if out.getvalue():
        outputs.append({"output_type": "stream", "name": "stdout", "text": out.getvalue().splitlines(True)})
    data = _result(value)
    if data is not None:
        outputs.append({"output_type": "execute_result", "execution_count": None, "data": data, "metadata": {}})
    return outputs


def execute(path: Path) -> None:
    nb = json.loads(path.read_text())
    namespace: dict = {"__name__": "__main__"}
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        start = time.perf_counter()
        cell["outputs"] = run_cell("".join(cell["source"]), namespace, f"{path.name}[{count}]")
        cell["execution_count"] = count
        for o in cell["outputs"]:
            if o["output_type"] == "execute_result":
                o["execution_count"] = count
        print(f"cell {count}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        execute(Path(arg))
