"""Side-by-side images of two evaluation runs: the same prompt and seed, reference next to candidate.

What every paper shows first, and what a user wants to look at first: for runs generated under the same protocol
(``diffalign eval generate`` with the same prompts, seeds and sampler), image ``k`` of a prompt in one run and
image ``k`` of that prompt in the other start from the same noise, so the pair shows what the LoRA changed. Pairs
are matched by ``(prompt, seed)`` when both runs recorded seeds, else by ``(prompt, k-th image of the prompt)``.

Views, per scorer: the biggest gains (candidate - reference, largest first), the biggest losses, and a random
sample (fixed seed, so the page is the same every time). The comparison report embeds them as HTML tables, and
``write_png`` draws the gains and losses as one PNG grid for a README or a paper.
"""

from __future__ import annotations

import random
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


Row = Mapping[str, Any]
Pair = tuple[Row, Row]  # (candidate row, reference row)
VIEWS = ("gains", "losses", "random")
TILE_PX = 128
RANDOM_SEED = 0


def _match_keys(rows: Sequence[Row], by_seed: bool) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        prompt = str(row["prompt"])
        if by_seed:
            keys.append((prompt, row["seed"]))
        else:
            keys.append((prompt, seen.get(prompt, 0)))
            seen[prompt] = seen.get(prompt, 0) + 1
    return keys


def pair_rows(candidate: Sequence[Row], reference: Sequence[Row]) -> list[Pair]:
    """Rows of the two runs that show the same prompt and seed, in the candidate run's order."""
    by_seed = all(r.get("seed") is not None for r in (*candidate, *reference))
    ref = dict(zip(_match_keys(reference, by_seed), reference, strict=True))
    keys = _match_keys(candidate, by_seed)
    return [(row, ref[key]) for key, row in zip(keys, candidate, strict=True) if key in ref]


def difference(pair: Pair, key: str) -> float:
    """Candidate score minus reference score."""
    return float(pair[0][key]) - float(pair[1][key])


def select(pairs: Sequence[Pair], key: str, view: str, k: int) -> list[Pair]:
    """``k`` pairs of a view: ``gains`` (largest difference first), ``losses`` (most negative first), ``random``."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choices: {', '.join(VIEWS)}")
    if view == "random":
        return random.Random(RANDOM_SEED).sample(list(pairs), min(k, len(pairs)))
    ordered = sorted(pairs, key=lambda p: difference(p, key), reverse=view == "gains")
    return ordered[:k]


def png_name(key: str) -> str:
    """File name of a scorer's PNG grid, e.g. ``side_by_side-toy_reward.png``."""
    return f"side_by_side-{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"


def _open_tile(path: Path) -> Any:
    from PIL import Image

    tile = Image.new("RGB", (TILE_PX, TILE_PX), (238, 238, 238))
    if path.is_file():
        with Image.open(path) as im:
            scale = TILE_PX / max(im.size)  # up (toy 32 px images) or down, keeping the aspect ratio
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            tile.paste(im, ((TILE_PX - im.width) // 2, (TILE_PX - im.height) // 2))
    return tile


def write_png(
    path: str | Path,
    pairs: Sequence[Pair],
    key: str,
    labels: tuple[str, str],
    roots: tuple[Path, Path],
    *,
    k: int = 6,
) -> Path:
    """A PNG grid: the ``k`` biggest gains, then the ``k`` biggest losses of ``key``; per row the prompt and seed,
    the reference image and the candidate image with their scores.

    ``labels``/``roots`` are (candidate, reference): the run labels and the folders their image paths are under.
    """
    from PIL import Image, ImageDraw

    text_w, gap, head_h, cap_h = 260, 8, 22, 16
    blocks = [("biggest gains", select(pairs, key, "gains", k)), ("biggest losses", select(pairs, key, "losses", k))]
    row_h = TILE_PX + cap_h + gap
    height = head_h + sum(head_h + len(rows) * row_h for _, rows in blocks) + gap
    width = text_w + 2 * (TILE_PX + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x_ref, x_cand = text_w + gap, text_w + 2 * gap + TILE_PX
    draw.text((gap, 4), f"{key}: {labels[1]} | {labels[0]} (same prompt and seed)", fill="black")
    y = head_h
    for title, rows in blocks:
        draw.text((gap, y + 4), title, fill="black")
        draw.text((x_ref, y + 4), labels[1], fill="black")
        draw.text((x_cand, y + 4), labels[0], fill="black")
        y += head_h
        for cand, ref in rows:
            prompt = str(cand["prompt"])
            lines = textwrap.wrap(prompt, 40, max_lines=5, placeholder=" ...")
            lines += [f"seed {cand.get('seed', '-')}", f"diff {difference((cand, ref), key):+.4f}"]
            draw.multiline_text((gap, y), "\n".join(lines), fill="black", spacing=2)
            for x, row, root in ((x_ref, ref, roots[1]), (x_cand, cand, roots[0])):
                canvas.paste(_open_tile(image_file(str(row["path"]), root)), (x, y))
                draw.text((x, y + TILE_PX + 2), f"{float(row[key]):.4f}", fill="black")
            y += row_h
    path = Path(path)
    canvas.save(path)
    return path


def image_file(path: str, root: Path) -> Path:
    """A row's image path: absolute as written, else under the run's image root (``summary["image_root"]``)."""
    file = Path(path)
    return file if file.is_absolute() else root / file
