"""``curves.png``: learning curves of a run drawn from its ``metrics.jsonl`` rows, with Pillow only.

One panel per series (a metric key), its values against the x key (``round`` for online RL), in a grid of
panels; each panel names its key and its first, last, min and max values. Rows that lack a key are skipped for that
panel, so training rows (logged every ``run.log_every`` steps) and held-out rows (every ``validation.every``) share
one figure. A series with no finite value is drawn as an empty panel that says so: nothing is left out silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw


PANEL_W, PANEL_H, MARGIN = 360, 220, 36
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def read_rows(path: str | Path) -> list[dict]:
    """The JSON rows of ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: Sequence[dict], key: str, x_key: str) -> list[tuple[float, float]]:
    """(x, value) points of ``key`` in row order, finite values only; a later row for the same x replaces it."""
    points: dict[float, float] = {}
    for row in rows:
        x, y = row.get(x_key), row.get(key)
        if isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(y):
            points[float(x)] = float(y)
    return sorted(points.items())


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, key: str, pts: list[tuple[float, float]], colour) -> None:
    x0, y0, x1, y1 = left + MARGIN, top + 24, left + PANEL_W - 12, top + PANEL_H - MARGIN
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    draw.text((left + 8, top + 6), key, fill=(0, 0, 0))
    if not pts:
        draw.text((x0 + 8, (y0 + y1) // 2), "no finite values logged", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo, hi = min(ys), max(ys)
    span_y, span_x = (hi - lo) or 1.0, (max(xs) - min(xs)) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - min(xs)) / span_x * (x1 - x0), y1 - (y - lo) / span_y * (y1 - y0)

    coords = [at(x, y) for x, y in pts]
    if len(coords) > 1:
        draw.line(coords, fill=colour, width=2)
    for cx, cy in coords:
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
    draw.text((left + 2, y0), _fmt(hi), fill=(90, 90, 90))
    draw.text((left + 2, y1 - 10), _fmt(lo), fill=(90, 90, 90))
    draw.text((x0, y1 + 4), _fmt(min(xs)), fill=(90, 90, 90))
    draw.text((x1 - 40, y1 + 4), _fmt(max(xs)), fill=(90, 90, 90))
    draw.text((x0, y1 + 18), f"first {_fmt(ys[0])}  last {_fmt(ys[-1])}  ({len(pts)} points)", fill=(60, 60, 60))


def write(
    rows: Sequence[dict], keys: Sequence[str], path: str | Path, *, x_key: str = "round", columns: int = 3
) -> Path:
    """Draw one panel per key of ``keys`` against ``x_key`` and write the PNG atomically (temp file, rename)."""
    if not keys:
        raise ValueError("curves.write needs at least one metric key")
    path = Path(path)
    rows_n = math.ceil(len(keys) / columns)
    image = Image.new("RGB", (columns * PANEL_W, rows_n * PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, key in enumerate(keys):
        left, top = (i % columns) * PANEL_W, (i // columns) * PANEL_H
        _panel(draw, left, top, key, series(rows, key, x_key), COLOURS[i % len(COLOURS)])
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
