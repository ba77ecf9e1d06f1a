"""Side-by-side comparison: pairs share prompt and seed, views are ordered by the score difference, and the HTML
tables and the PNG grid show the right images under the right run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.eval import compare_runs, score_folder
from diffalign.eval import sidebyside as sbs
from diffalign.eval.runner import write_comparison
from tests.eval.conftest import MeanScorer, save_solid


def _rows(specs):
    return [{"prompt": p, "seed": s, "path": f"{p}-{s}.png", "x": v} for p, s, v in specs]


def test_pairs_match_prompt_and_seed_whatever_the_order():
    cand = _rows([("a", 1, 0.9), ("a", 2, 0.1), ("b", 1, 0.5), ("c", 7, 0.0)])
    ref = _rows([("b", 1, 0.2), ("a", 2, 0.3), ("a", 1, 0.4)])  # c has no partner
    pairs = sbs.pair_rows(cand, ref)
    assert [(c["prompt"], c["seed"], r["seed"]) for c, r in pairs] == [("a", 1, 1), ("a", 2, 2), ("b", 1, 1)]
    assert [round(sbs.difference(p, "x"), 6) for p in pairs] == [0.5, -0.2, 0.3]
    assert [p[0]["seed"] for p in sbs.select(pairs, "x", "gains", 2)] == [1, 1]  # a/1 (+0.5), then b/1 (+0.3)
    assert [p[0]["prompt"] for p in sbs.select(pairs, "x", "gains", 2)] == ["a", "b"]
    assert [sbs.difference(p, "x") for p in sbs.select(pairs, "x", "losses", 1)] == pytest.approx([-0.2])
    assert sbs.select(pairs, "x", "random", 2) == sbs.select(pairs, "x", "random", 2)  # fixed seed
    with pytest.raises(ValueError, match="choices: gains, losses, random"):
        sbs.select(pairs, "x", "best", 2)


def test_pairs_without_seeds_match_the_kth_image_of_each_prompt():
    cand = [{"prompt": "a", "seed": None, "x": 1.0}, {"prompt": "a", "seed": None, "x": 2.0}]
    ref = [{"prompt": "a", "seed": None, "x": 0.0}, {"prompt": "b", "seed": None, "x": 5.0}]
    pairs = sbs.pair_rows(cand, ref)
    assert [(c["x"], r["x"]) for c, r in pairs] == [(1.0, 0.0)]


# reference run colours -> candidate run colours for the same (prompt, k-th image)
REF = [
    ("cat_0.png", "a cat", (100, 100, 100)),
    ("cat_1.png", "a cat", (50, 50, 50)),
    ("dog_0.png", "a dog", (90, 90, 90)),
]
CAND = [
    ("cat_0.png", "a cat", (250, 250, 250)),
    ("cat_1.png", "a cat", (0, 0, 0)),
    ("dog_0.png", "a dog", (120, 120, 120)),
]


def _scored(tmp_path, name, spec):
    folder = tmp_path / f"{name}-images"
    for file, prompt, rgb in spec:
        save_solid(folder / file, rgb).with_suffix(".txt").write_text(prompt)
    score_folder(folder, [MeanScorer()], tmp_path / name, report=False, progress=False)
    return tmp_path / name


def test_compare_report_and_png_show_reference_next_to_candidate(tmp_path):
    cand, ref = _scored(tmp_path, "aligned", CAND), _scored(tmp_path, "base", REF)
    out = write_comparison(tmp_path / "cmp", compare_runs(cand, ref, labels=("aligned", "base")))
    text = (out / "report.html").read_text()
    gains = text[text.index('class="sbs gains"') : text.index('class="sbs losses"')]
    losses = text[text.index('class="sbs losses"') : text.index('class="sbs random"')]
    # biggest gain: cat_0 (100 -> 250 grey), then dog (90 -> 120); biggest loss: cat_1 (50 -> 0)
    assert gains.index("+0.5882") < gains.index("+0.1176") and "-0.1961" not in gains.split("+0.1176")[0]
    assert losses.index("-0.1961") < losses.index("+0.1176")
    assert "<th>base</th><th>aligned</th><th>aligned - base</th>" in text and "3 of 3 pairs" in text

    png = out / sbs.png_name("brightness")
    assert png.name == "side_by_side-brightness.png" and png.is_file()
    with Image.open(png) as im:
        grid = np.asarray(im.convert("RGB"))
    # first gains row: reference tile (grey 100) left of the candidate tile (grey 250), at the layout's offsets
    y0 = 22 + 22 + sbs.TILE_PX // 2
    x_ref, x_cand = 260 + 8 + sbs.TILE_PX // 2, 260 + 16 + sbs.TILE_PX + sbs.TILE_PX // 2
    assert grid[y0, x_ref].tolist() == [100, 100, 100] and grid[y0, x_cand].tolist() == [250, 250, 250]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed")
def test_side_by_side_renders_in_headless_chromium(tmp_path):
    cand, ref = _scored(tmp_path, "aligned", CAND), _scored(tmp_path, "base", REF)
    out = write_comparison(tmp_path / "cmp", compare_runs(cand, ref, labels=("aligned", "base")))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    shot = tmp_path / "shot.png"
    dom = ""
    for extra in (["--dump-dom"], [f"--screenshot={shot}", "--window-size=1200,1400"]):
        cmd = [str(CHROMIUM), *flags, *extra, (out / "report.html").as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={"HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = dom or proc.stdout
    assert dom.count('<table class="sbs">') == 3 and dom.count("<img ") == 3 * 2 * 3  # 3 views x 2 runs x 3 pairs
    with Image.open(shot) as im:  # the page rendered: the screenshot is not one flat colour
        assert im.size == (1200, 1400) and len(set(im.convert("L").getdata())) > 10
