"""Write ``assets/video_tiny/``: tiny video preference rows for ``data.format: video`` (the wan family's tests).

Run from anywhere: ``python assets/make_video_fixture.py``. Deterministic (seeded numpy; PNG/GIF bytes depend only on
the Pillow build).

Each video is 9 frames of 32 x 40 px (height x width) showing a coloured square on a coloured background. The
preferred video moves its square smoothly across, in the caption's colours; the other video has the wrong
square colour and jumps to random places (a flickering clip). Storage covers every reader of ``data.video``:

- ``train.jsonl`` (split ``train``): 4 pairs (K=2); the winner is a frame folder (``clips/r{i}_0/f00.png`` ...),
  the loser a ``.npy`` (F, H, W, 3) uint8 array, except row 3 whose loser is an animated ``.gif``.
- ``lists.jsonl`` (split ``lists``): 2 lists of K=3 (scores 1.0 / 0.5 / 0.0), for list objectives (RankDPO).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


OUT = Path(__file__).resolve().parent / "video_tiny"
FRAMES, HEIGHT, WIDTH, SIDE = 9, 32, 40, 12
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SCENES = [("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green")]


def clip(square: str, background: str, smooth: bool, rng: np.random.Generator) -> np.ndarray:
    """(F, H, W, 3) uint8: the square glides one pixel a frame (smooth) or jumps at random."""
    video = np.empty((FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    video[:] = COLOURS[background]
    for f in range(FRAMES):
        if smooth:
            top, left = (HEIGHT - SIDE) // 2, 2 + f
        else:
            top, left = int(rng.integers(0, HEIGHT - SIDE)), int(rng.integers(0, WIDTH - SIDE))
        video[f, top : top + SIDE, left : left + SIDE] = COLOURS[square]
    return video


def write_folder(video: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"f{f:02d}.png")


def write_gif(video: np.ndarray, path: Path) -> None:
    frames = [Image.fromarray(f) for f in video]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=62, loop=0)


def wrong(square: str, background: str) -> str:
    return next(c for c in COLOURS if c not in (square, background))


def main() -> None:
    rng = np.random.default_rng(0)
    clips = OUT / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (square, background) in enumerate(SCENES):
        write_folder(clip(square, background, True, rng), clips / f"r{i}_0")
        loser = clip(wrong(square, background), background, False, rng)
        if i == 3:
            write_gif(loser, clips / f"r{i}_1.gif")
            name = f"clips/r{i}_1.gif"
        else:
            np.save(clips / f"r{i}_1.npy", loser)
            name = f"clips/r{i}_1.npy"
        prompt = f"a {square} square gliding across a {background} background"
        rows.append({"prompt": prompt, "videos": [f"clips/r{i}_0", name], "scores": [1.0, 0.0]})
    (OUT / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lists = []
    for i, (square, background) in enumerate(SCENES[:2]):
        middle = clip(square, background, False, rng)  # right colours, flickering
        np.save(clips / f"l{i}_mid.npy", middle)
        videos = [f"clips/r{i}_1.npy", f"clips/r{i}_0", f"clips/l{i}_mid.npy"]
        prompt = f"a {square} square gliding across a {background} background"
        lists.append({"prompt": prompt, "videos": videos, "scores": [0.0, 1.0, 0.5]})
    (OUT / "lists.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lists), encoding="utf-8")
    print(OUT)


if __name__ == "__main__":
    main()
