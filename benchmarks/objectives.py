"""Training objectives side by side: per objective, budget and seed, the quickstart's adherence or the digits'
accuracy; a table and a plot.

    python -m benchmarks.objectives --collect logs/obj   # add runs' metrics.json to benchmarks/objectives.csv
    python -m benchmarks.objectives                      # the Markdown summary and docs/objectives.png
    python -m benchmarks.objectives --kind digits --collect logs/dig   # digits: benchmarks/objectives_digits.csv

A run is ``<root>/<objective>_b<batches>_s<seed>/eval/metrics.json``, written by ``python -m sdlight.evaluate``
with ``'metrics=[adherence]'`` (quickstart) or ``'metrics=[digits]'`` (digits) on the checkpoint of a run of that
objective, budget and training seed (the commands and each objective's overrides: BENCHMARKS.md, "Objectives
side by side"). The summary gives each (objective, budget) its mean and range over seeds and whether every seed met
every goal. Drawn with PIL.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
RUN = re.compile(r"^(?P<objective>[a-z0-9]+)_b(?P<batches>\d+)_s(?P<seed>\d+)$")
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


@dataclass(frozen=True)
class Kind:
    """What one table measures: its rates (percent), their goals, the metrics.json prefix, the plotted rate."""

    rates: tuple[str, ...]
    goals: dict[str, float]
    prefix: str
    plotted: str
    title: str
    csv: Path
    png: Path


KINDS = {
    "quickstart": Kind(("colour", "shape", "position", "background", "all"),
                       {"colour": 95.0, "shape": 80.0, "position": 80.0, "background": 98.0, "all": 60.0},
                       "adherence/", "shape", "Quickstart '{rate}' adherence by objective and LDM budget (same VAE)",
                       HERE / "objectives.csv", Path("docs/objectives.png")),
    "digits": Kind(("accuracy",), {"accuracy": 90.0}, "digits/", "accuracy",
                   "Digits read as the asked digit by objective and LDM budget (same VAE)",
                   HERE / "objectives_digits.csv", Path("docs/objectives_digits.png")),
}
QUICKSTART = KINDS["quickstart"]


def read_rows(path: Path | None = None, kind: Kind = QUICKSTART) -> list[dict]:
    """The table's runs (``path`` or the kind's own CSV)."""
    path = path or kind.csv
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({"objective": row["objective"], "batches": int(row["batches"]), "seed": int(row["seed"]),
                         **{k: float(row[k]) for k in kind.rates}})
    if not rows:
        raise ValueError(f"{path} holds no runs")
    return rows


def collect(root: Path, kind: Kind = QUICKSTART) -> list[dict]:
    """The runs under ``root`` that were evaluated, rates in percent."""
    rows = []
    for metrics in sorted(root.glob("*/eval/metrics.json")):
        match = RUN.match(metrics.parent.parent.name)
        scores = json.loads(metrics.read_text()).get("scores")
        if match and scores:
            rows.append({"objective": match["objective"], "batches": int(match["batches"]),
                         "seed": int(match["seed"]),
                         **{k: round(100 * scores[f"{kind.prefix}{k}"], 1) for k in kind.rates}})
    return rows


def write_rows(rows: list[dict], path: Path | None = None, kind: Kind = QUICKSTART) -> None:
    with open(path or kind.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("objective", "batches", "seed", *kind.rates))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["objective"], r["batches"], r["seed"])))


def summary(rows: list[dict], kind: Kind = QUICKSTART) -> list[dict]:
    """Per (objective, batches): seeds, mean and range of each rate, and whether every seed met every goal."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["objective"], row["batches"])].append(row)
    out = []
    for (objective, batches), runs in sorted(groups.items()):
        entry = {"objective": objective, "batches": batches, "seeds": sorted(r["seed"] for r in runs),
                 "all_goals_every_seed": all(r[k] >= g for r in runs for k, g in kind.goals.items())}
        for k in kind.rates:
            values = [r[k] for r in runs]
            entry[k] = (sum(values) / len(values), min(values), max(values))
        out.append(entry)
    return out


def markdown(entries: list[dict], kind: Kind = QUICKSTART) -> str:
    names = [{"all": "all four"}.get(k, k) for k in kind.rates]
    lines = [f"| objective | batches | seeds | {' | '.join(names)} | every goal, every seed |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for e in entries:
        cells = [f"{m:.1f} ({lo:.1f}-{hi:.1f})" if lo != hi else f"{m:.1f}" for m, lo, hi in (e[k] for k in kind.rates)]
        lines.append(f"| {e['objective']} | {e['batches']:,} | {len(e['seeds'])} | " + " | ".join(cells)
                     + f" | {'yes' if e['all_goals_every_seed'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], rate: str = "all", size: tuple[int, int] = (800, 420), kind: Kind = QUICKSTART
         ) -> Image.Image:
    """``rate`` of every run against its budget, one colour per objective, the seeds' mean joined by a line."""
    w, h = size
    left, right, top, bottom = 56, 200, 30, 44
    budgets = sorted({r["batches"] for r in rows})
    pad = max(150, (max(budgets) - min(budgets)) // 6)
    x0, x1 = min(budgets) - pad, max(budgets) + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - y / 100 * (h - top - bottom)  # noqa: E731
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for b in budgets:
        d.line([px(b), h - bottom, px(b), h - bottom + 4], fill="black")
        d.text((px(b) - 12, h - bottom + 6), f"{b:,}", fill="black")
    for v in range(0, 101, 20):
        d.line([left - 4, py(v), left, py(v)], fill="black")
        d.text((left - 28, py(v) - 6), f"{v}%", fill="black")
    for i in range(0, 60, 2):  # the goal, dashed
        a, b = left + (w - right - left) * i / 60, left + (w - right - left) * (i + 1) / 60
        d.line([a, py(kind.goals[rate]), b, py(kind.goals[rate])], fill="gray")
    objectives = sorted({r["objective"] for r in rows})
    for j, objective in enumerate(objectives):
        colour = COLOURS[j % len(COLOURS)]
        offset = (j - (len(objectives) - 1) / 2) * 8  # side by side at each budget
        means = []
        for b in budgets:
            values = [r[rate] for r in rows if r["objective"] == objective and r["batches"] == b]
            for v in values:
                d.ellipse([px(b) + offset - 3, py(v) - 3, px(b) + offset + 3, py(v) + 3], fill=colour)
            if values:
                means.append((px(b) + offset, py(sum(values) / len(values))))
        for p, q in zip(means, means[1:]):
            d.line([*p, *q], fill=colour, width=2)
        d.ellipse([w - right + 12, top + 6 + 16 * j, w - right + 20, top + 14 + 16 * j], fill=colour)
        d.text((w - right + 26, top + 4 + 16 * j), objective, fill="black")
    d.text((w - right + 12, top + 12 + 16 * len(objectives)), f"dashed: goal ({kind.goals[rate]:.0f} %)", fill="gray")
    d.text((w - right + 12, top + 28 + 16 * len(objectives)), "dots: seeds; line: mean", fill="black")
    d.text((left, 8), kind.title.format(rate=rate), fill="black")
    d.text(((w - right + left) // 2 - 70, h - 18), "LDM batches of 64", fill="black")
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), default="quickstart",
                        help="quickstart: adherence ('metrics=[adherence]'); digits: 'metrics=[digits]'")
    parser.add_argument("--collect", type=Path, help="add (or update) the evaluated runs under this folder")
    parser.add_argument("--csv", type=Path, help="the table's runs (default: benchmarks/objectives[_digits].csv)")
    parser.add_argument("--out", type=Path, help="the plot (default: docs/objectives[_digits].png)")
    args = parser.parse_args(argv)
    kind = KINDS[args.kind]
    path, out = args.csv or kind.csv, args.out or kind.png
    if args.collect:
        rows = {(r["objective"], r["batches"], r["seed"]): r
                for r in (read_rows(path, kind) if path.is_file() else [])}
        rows.update({(r["objective"], r["batches"], r["seed"]): r for r in collect(args.collect, kind)})
        write_rows(list(rows.values()), path, kind)
    rows = read_rows(path, kind)
    print(markdown(summary(rows, kind), kind))
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, rate=kind.plotted, kind=kind).save(out)  # quickstart: shape, the goal that decides there
    print(f"{len(rows)} runs -> {out}")


if __name__ == "__main__":
    main()
