"""curves.png from metrics rows: points per series, NaN and missing values skipped, the panel grid's size."""

from __future__ import annotations

import math

from PIL import Image

from diffalign.training import curves


def test_series_skips_missing_and_non_finite_values_and_keeps_the_last_row_per_x():
    rows = [
        {"round": 1, "a": 1.0},
        {"round": 2, "a": math.nan},
        {"round": 3, "b": 5.0},
        {"round": 4, "a": 2.0},
        {"round": 4, "a": 3.0},
    ]
    assert curves.series(rows, "a", "round") == [(1.0, 1.0), (4.0, 3.0)]
    assert curves.series(rows, "b", "round") == [(3.0, 5.0)]
    assert curves.series(rows, "c", "round") == []


def test_write_draws_one_panel_per_key(tmp_path):
    rows = [{"round": r, "reward": r / 10, "kl": r**2} for r in range(5)]
    path = curves.write(rows, ["reward", "kl", "never_logged", "reward"], tmp_path / "curves.png", columns=3)
    with Image.open(path) as image:
        assert image.size == (3 * curves.PANEL_W, 2 * curves.PANEL_H)
        pixels = image.convert("RGB")
        # the reward line is drawn in the first colour somewhere inside the first panel, nothing of it in the third
        first = {pixels.getpixel((x, y)) for x in range(curves.PANEL_W) for y in range(curves.PANEL_H)}
        third = {pixels.getpixel((x, y)) for x in range(2 * curves.PANEL_W, 3 * curves.PANEL_W) for y in range(220)}
    assert curves.COLOURS[0] in first and curves.COLOURS[2] not in third
    assert not (tmp_path / ".curves.png.tmp").exists()
