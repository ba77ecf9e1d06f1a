"""Write the tiny preference fixtures: ``assets/pickapic_tiny/`` and ``assets/ranked_tiny/``.

Run from anywhere: ``python assets/make_pickapic_fixture.py``. Deterministic (seeded ``random.Random``;
JPEG/PNG bytes depend only on the Pillow build).

pickapic_tiny: the real Pick-a-Pic v1/v2 parquet schema and dtypes (``jpg_*`` binary, ``label_*`` float64,
``created_at`` timestamp[ns], ``has_label``/``are_different`` bool, ``ranking_id``/``user_id``/
``num_example_per_prompt``/``__index_level_0__`` int64, the rest string), in the Hub layout
``data/{split}-00000-of-00001.parquet``. Each row is a procedural scene such as "a red circle on a blue
background"; the preferred image matches the caption and the other has a wrong shape, shape colour or
background colour. Image 0 is one of 48x64, 64x48, 64x64, 48x80 (height x width); in rows where
``index % 7 == 3`` image 1 has a different size than image 0.

train (48 rows):
- ties (label 0.5/0.5, both images match): rows 5, 17, 29, 41, and row 35, whose two images are identical
  (``are_different`` False);
- row 22 has ``has_label`` False (labels 0.5/0.5, empty ``best_image_uid``);
- row 13 is the one corrupt row: its ``jpg_1`` holds only the first 20 bytes of a JPEG (truncated);
- every other row is decided: ``label_0 == 0`` (jpg_1 preferred) exactly when ``index % 3 == 1``.
  With the default policy (drop ties and unlabeled rows) 42 rows pass the label filter; 41 decode.
validation (8 rows): row 3 is a tie, no corrupt or unlabeled rows; same ``label_0`` rule.

ranked_tiny: ``train.jsonl`` with 8 prompts x 4 PNG images (32x32) under ``images/``; the score of an
image is the fraction of the caption's three attributes (shape, colour, background) it gets right, so
1.0, 0.6667, 0.3333, 0.0, listed in shuffled order. Row 5 has two images tied at 0.6667.
pickapic_tiny_dual: the train split of pickapic_tiny plus DCPO's two caption columns: ``caption_0`` /
``caption_1`` caption ``jpg_0`` / ``jpg_1``; the preferred image keeps the caption, the other gets it with shape
colour and background colour swapped (a perturbed caption; ties and undecided rows keep the caption for both).

``pairs.jsonl`` (split ``pairs``): the same images as 16 scored pairs (K=2; per row, best vs worst and second
vs third) with scores in PickScore units, ``18 + 6 * fraction`` (SmPO's toy data).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from diffalign.data.pickapic import pickapic_schema


ROOT = Path(__file__).resolve().parent
PICKAPIC_DIR = ROOT / "pickapic_tiny"
RANKED_DIR = ROOT / "ranked_tiny"
DUAL_DIR = ROOT / "pickapic_tiny_dual"

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((48, 64), (64, 48), (64, 64), (48, 80))  # (height, width)
MODELS = ("SD2.1", "SDXL-alpha", "SDXL-beta", "dreamlike-photoreal-2.0")

NUM_TRAIN, NUM_VALIDATION = 48, 8
TIE_ROWS = {"train": (5, 17, 29, 41), "validation": (3,)}
NOT_DIFFERENT_ROW = 35  # train; identical images, tie labels
UNLABELED_ROW = 22  # train
CORRUPT_ROW, CORRUPT_COLUMN, CORRUPT_BYTES = 13, "jpg_1", 20  # train

SCHEMA = pickapic_schema()  # the real dataset card's columns and dtypes


def render(shape: str, fg: str, bg: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A ``fg`` shape roughly centred (jitter +-3 px) on a ``bg`` background; the centre pixel is ``fg``."""
    h, w = size
    image = Image.new("RGB", (w, h), COLORS[bg])
    draw = ImageDraw.Draw(image)
    cx, cy = w // 2 + rng.randint(-3, 3), h // 2 + rng.randint(-3, 3)
    r = int(0.3 * min(h, w))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
    else:
        draw.polygon([(cx, cy - r - 4), (cx - r - 4, cy + r), (cx + r + 4, cy + r)], fill=COLORS[fg])
    return image


def scene(rng: random.Random) -> tuple[str, str, str]:
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(sorted(COLORS), 2)
    return shape, fg, bg


def corrupt(scene_: tuple[str, str, str], rng: random.Random, kinds: tuple[str, ...]) -> tuple[str, str, str]:
    """The scene with each attribute named in ``kinds`` replaced by a different valid value."""
    shape, fg, bg = scene_
    for kind in kinds:
        if kind == "shape":
            shape = rng.choice([s for s in SHAPES if s != shape])
        elif kind == "fg":
            fg = rng.choice([c for c in sorted(COLORS) if c not in (fg, bg)])
        else:
            bg = rng.choice([c for c in sorted(COLORS) if c not in (fg, bg)])
    return shape, fg, bg


def caption(fg: str, shape: str, bg: str) -> str:
    article = "an" if fg[0] in "aeiou" else "a"
    return f"{article} {fg} {shape} on a {bg} background"


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pickapic_row(split: str, index: int, rng: random.Random) -> dict:
    target = scene(rng)
    shape, fg, bg = target
    size0 = SIZES[index % len(SIZES)]
    size1 = SIZES[(index + 1) % len(SIZES)] if index % 7 == 3 else size0
    is_train = split == "train"
    tie = index in TIE_ROWS[split] or (is_train and index in (NOT_DIFFERENT_ROW, UNLABELED_ROW))
    good = render(shape, fg, bg, size0, rng)
    if is_train and index == NOT_DIFFERENT_ROW:
        images = (good, good.copy())
    elif tie:
        images = (good, render(shape, fg, bg, size1, rng))
    else:
        wrong = render(*corrupt(target, rng, (rng.choice(("shape", "fg", "bg")),)), size1, rng)
        images = (wrong, good) if index % 3 == 1 else (good, wrong)
    label_0 = 0.5 if tie else (0.0 if index % 3 == 1 else 1.0)
    uids = [f"{rng.getrandbits(64):016x}-{split[0]}{index:03d}-{k}" for k in range(2)]
    data = [jpeg(images[0]), jpeg(images[1])]
    if is_train and index == CORRUPT_ROW:
        data[1] = data[1][:CORRUPT_BYTES]
    best = "" if tie else uids[0 if label_0 == 1.0 else 1]
    created = dt.datetime(2023, 4, 1) + dt.timedelta(minutes=17 * index + (0 if is_train else 100_000))
    return {
        "are_different": not (is_train and index == NOT_DIFFERENT_ROW),
        "best_image_uid": best,
        "caption": caption(fg, shape, bg),
        "created_at": created,
        "has_label": not (is_train and index == UNLABELED_ROW),
        "image_0_uid": uids[0],
        "image_0_url": f"https://example.invalid/images/{uids[0]}.png",
        "image_1_uid": uids[1],
        "image_1_url": f"https://example.invalid/images/{uids[1]}.png",
        "jpg_0": data[0],
        "jpg_1": data[1],
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": MODELS[index % len(MODELS)],
        "model_1": MODELS[(index + 2) % len(MODELS)],
        "ranking_id": 100_000 + 2 * index + (0 if is_train else 1),
        "user_id": 5_000 + index % 6,
        "num_example_per_prompt": 1,
        "__index_level_0__": index,
    }


def write_pickapic() -> None:
    for split, count, seed in (("train", NUM_TRAIN, 0), ("validation", NUM_VALIDATION, 1)):
        rng = random.Random(seed)
        rows = [pickapic_row(split, i, rng) for i in range(count)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        out = PICKAPIC_DIR / "data" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        print(f"wrote {out} ({count} rows, {out.stat().st_size} bytes)")


def write_ranked() -> None:
    rng = random.Random(2)
    (RANKED_DIR / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for row in range(8):
        target = scene(rng)
        shape, fg, bg = target
        wrong_kinds = [(), ("shape",), ("fg", "bg"), ("shape", "fg", "bg")]
        if row == 5:
            wrong_kinds[2] = ("bg",)  # two images tied at 2/3
        candidates = []
        for kinds in wrong_kinds:
            image = render(*corrupt(target, rng, kinds), (32, 32), rng)
            candidates.append((image, round((3 - len(kinds)) / 3, 4)))
        rng.shuffle(candidates)
        paths, scores = [], []
        for k, (image, score) in enumerate(candidates):
            rel = f"images/p{row}_{k}.png"
            (RANKED_DIR / rel).write_bytes(png(image))
            paths.append(rel)
            scores.append(score)
        lines.append(json.dumps({"prompt": caption(fg, shape, bg), "images": paths, "scores": scores}))
    (RANKED_DIR / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RANKED_DIR / 'train.jsonl'} (8 rows x 4 images)")


def write_scored_pairs() -> None:
    """``ranked_tiny/pairs.jsonl`` from ``train.jsonl``: two K=2 pairs per row, scores 18 + 6 * fraction."""
    lines = []
    for line in (RANKED_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        order = sorted(range(len(row["scores"])), key=lambda k: -row["scores"][k])
        for a, b in ((order[0], order[-1]), (order[1], order[2])):
            scores = [round(18 + 6 * row["scores"][k], 4) for k in (a, b)]
            images = [row["images"][k] for k in (a, b)]
            lines.append(json.dumps({"prompt": row["prompt"], "images": images, "scores": scores}))
    (RANKED_DIR / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RANKED_DIR / 'pairs.jsonl'} ({len(lines)} scored pairs)")


def swap_colours(text: str) -> str:
    """ "a red circle on a blue background" -> "a blue circle on a red background" (article fixed)."""
    words = text.split()
    fg, bg = words[1], words[-2]
    return caption(bg, words[2], fg)


def write_dual_caption() -> None:
    """``pickapic_tiny_dual``: pickapic_tiny's train split + ``caption_0`` / ``caption_1`` (DCPO)."""
    table = pq.read_table(PICKAPIC_DIR / "data" / "train-00000-of-00001.parquet")
    rows = table.to_pylist()
    for row in rows:
        captions = [row["caption"], row["caption"]]
        if row["has_label"] and row["label_0"] in (0.0, 1.0):
            loser = 1 if row["label_0"] == 1.0 else 0
            captions[loser] = swap_colours(row["caption"])
        row["caption_0"], row["caption_1"] = captions
    schema = SCHEMA.append(pa.field("caption_0", pa.string())).append(pa.field("caption_1", pa.string()))
    out = DUAL_DIR / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    print(f"wrote {out} ({len(rows)} rows)")


def write_readme() -> None:
    text = "# Tiny preference fixtures\n\nGenerated by `assets/make_pickapic_fixture.py`; do not edit by hand.\n\n"
    (PICKAPIC_DIR / "README.md").write_text(text + __doc__.strip() + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_pickapic()
    write_ranked()
    write_scored_pairs()
    write_dual_caption()
    write_readme()
