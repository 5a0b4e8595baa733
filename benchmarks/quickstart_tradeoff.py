"""The quickstart's prompt adherence against its training time: measured points, one plot.

    python benchmarks/quickstart_tradeoff.py [--csv CSV] [--out PNG]   # defaults: the CSV beside it, docs/*.png

Each row of the CSV is one measured run of both quickstart stages (the VAE's and the LDM's settings in words, the
wall time of their two trainings on 2 idle CPU cores, and the adherence oracle's rates on the 192 val captions,
25 DDIM steps, guidance 3; commands in BENCHMARKS.md). The plot puts shape and all-four-right against minutes,
with the goals (shape 80 %, all four 60 %, 10 minutes) as dashed lines, and circles the point the stock
``make quickstart`` takes. Drawn with PIL: no plotting library needed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = {"shape": "#d62728", "all": "#1f77b4"}  # column -> colour
GOALS = {"shape": 80.0, "all": 60.0}


def read_points(path: Path) -> list[dict]:
    """Rows with float ``minutes`` and rates; ``quickstart`` marks the stock configuration's point."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("minutes", *SERIES):
                row[key] = float(row[key])
            row["quickstart"] = row.get("quickstart", "").strip().lower() in ("1", "yes", "true")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no points")
    return rows


def plot(points: list[dict], size: tuple[int, int] = (800, 420)) -> Image.Image:
    """Scatter of every point's shape and all-four rates against minutes, numbered as in the CSV."""
    w, h = size
    left, right, top, bottom = 56, 220, 30, 44
    x0, x1 = 0.0, max(12.0, max(p["minutes"] for p in points) * 1.08)
    y0, y1 = 0.0, 100.0
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(0, int(x1) + 1, 2):
        d.line([px(k), h - bottom, px(k), h - bottom + 4], fill="black")
        d.text((px(k) - 4, h - bottom + 6), str(k), fill="black")
    for v in range(0, 101, 20):
        d.line([left - 4, py(v), left, py(v)], fill="black")
        d.text((left - 28, py(v) - 6), f"{v}%", fill="black")

    def dashed(p, q, colour):
        n = 40
        for i in range(0, n, 2):
            a = [p[j] + (q[j] - p[j]) * i / n for j in (0, 1)]
            b = [p[j] + (q[j] - p[j]) * (i + 1) / n for j in (0, 1)]
            d.line([*a, *b], fill=colour)

    dashed((px(10), top), (px(10), h - bottom), "gray")
    d.text((px(10) + 3, top + 3), "10 min", fill="gray")
    for name, colour in SERIES.items():
        dashed((left, py(GOALS[name])), (w - right, py(GOALS[name])), colour)
    for i, p in enumerate(points, start=1):
        x = px(p["minutes"])
        for (name, colour), r in zip(SERIES.items(), (6, 3)):  # shape drawn larger: equal rates stay visible
            y = py(p[name])
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            d.text((x + 6, y - 6), str(i), fill=colour)
        if p["quickstart"]:
            y = py(p["shape"])
            d.ellipse([x - 9, y - 9, x + 9, y + 9], outline="black", width=2)
    lx = w - right + 12
    for j, (name, colour) in enumerate(SERIES.items()):
        d.ellipse([lx, top + 6 + 16 * j, lx + 8, top + 14 + 16 * j], fill=colour)
        d.text((lx + 14, top + 4 + 16 * j), "shape" if name == "shape" else "all four right", fill="black")
    d.text((lx, top + 40), "dashed: goals", fill="gray")
    d.text((lx, top + 56), "circled: make quickstart", fill="black")
    for i, p in enumerate(points, start=1):
        d.text((lx, top + 84 + 14 * i), f"{i}: {p['label']}"[:36], fill="black")
    d.text((left, 8), "Quickstart prompt adherence vs training time (2 idle CPU cores)", fill="black")
    d.text(((w - right + left) // 2 - 60, h - 18), "minutes, both stages", fill="black")
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path(__file__).with_name("quickstart_tradeoff.csv"))
    parser.add_argument("--out", type=Path, default=Path("docs/quickstart_tradeoff.png"))
    args = parser.parse_args()
    points = read_points(args.csv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points).save(args.out)
    print(f"{len(points)} points -> {args.out}")


if __name__ == "__main__":
    main()
