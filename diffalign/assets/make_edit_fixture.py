"""Write the tiny instruction-editing fixture ``assets/edit_tiny/`` (editing families: fluxkontext, qwenimageedit).

Run from anywhere: ``python assets/make_edit_fixture.py``. Deterministic (seeded ``random.Random``; PNG bytes depend
only on the Pillow build). Scenes are ``make_pickapic_fixture``'s procedural shapes at 32x32 px.

- ``train.jsonl`` (split ``train``, preference pairs for ``offline_pref``): 8 rows of
  ``{"prompt": "make the circle blue", "source_image": "images/s0.png", "images": [winner, loser], "scores": [1, 0]}``;
  the winner is the source with the asked change (shape colour), the loser changes the background instead.
- ``prompts.jsonl`` (online RL): the same 8 instructions, ``{"prompt": ..., "source_image": ...}`` per line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from diffalign.assets.make_pickapic_fixture import COLORS, render, scene


ROOT = Path(__file__).resolve().parent
EDIT_DIR = ROOT / "edit_tiny"
NUM_ROWS, SIZE = 8, (32, 32)


def main() -> None:
    rng = random.Random(24)
    images = EDIT_DIR / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs, prompts = [], []
    for i in range(NUM_ROWS):
        shape, fg, bg = scene(rng)
        new = rng.choice([c for c in sorted(COLORS) if c not in (fg, bg)])
        wrong_bg = rng.choice([c for c in sorted(COLORS) if c not in (fg, bg, new)])
        jitter = rng.getstate()
        for name, (f, b) in {"s": (fg, bg), "w": (new, bg), "l": (fg, wrong_bg)}.items():
            rng.setstate(jitter)  # the same placement in the source and both edits
            render(shape, f, b, SIZE, rng).save(images / f"{name}{i}.png", format="PNG")
        row = {"prompt": f"make the {shape} {new}", "source_image": f"images/s{i}.png"}
        prompts.append(row)
        pairs.append({**row, "images": [f"images/w{i}.png", f"images/l{i}.png"], "scores": [1.0, 0.0]})
    for name, rows in (("train.jsonl", pairs), ("prompts.jsonl", prompts)):
        (EDIT_DIR / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
