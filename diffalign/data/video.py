"""Video preference data (``data.format: video``): K videos and K scores per prompt, for the video families (wan).

A row is a ranked list whose items are videos, in the same JSONL (or parquet) layout as ``data.ranked``::

    {"prompt": "a red ball bouncing", "videos": ["clips/0_a", "clips/0_b.npy"], "scores": [1.0, 0.0]}

K = 2 rows are the pairs of the pair objectives (Diffusion-DPO and family), K > 2 the lists of list objectives. Each
video is, relative to the JSONL file:

- a **folder of frames** (``.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` / ``.bmp``), in file-name order
  (``frame_00.png``, ``frame_01.png``, ...);
- a **``.npy``** array (F, H, W, 3) uint8 (RGB), read without pickle;
- an animated **``.gif``** (Pillow);
- an ``.mp4`` / ``.webm`` / ``.mov`` / ``.mkv`` / ``.avi`` file through ``imageio`` with PyAV (``pip install av``).
  No such reader is installed in diffalign's default environment (imageio has no ffmpeg or PyAV plugin there), so
  video files are an error that says so; convert them to frame folders or ``.npy`` (e.g. ``ffmpeg -i a.mp4
  a/%04d.png``).

The first ``data.num_frames`` frames of each video are used (4k + 1 for Wan); a shorter video is a bad row. All frames
of all K videos of a group get ONE resize / flip / crop (``VideoTransform``: the group's joint transform of
``data.transforms`` applied to every frame), so the pixels of a group are (K, 3, F, H, W) in [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageSequence
from torch import Tensor

from diffalign.data.ranked import RankedDataset, RankedSource
from diffalign.data.transforms import JointParams, JointTransform
from diffalign.types import SampleInfo


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_FILE_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
VIDEOS_COLUMN = "videos"


@dataclass(frozen=True)
class Video:
    """The frames of one video (RGB PIL images); ``size`` / ``height`` / ``width`` are the first frame's, so record
    checks written for images (``records.quality_flags``) read a video as its first frame."""

    frames: tuple[Image.Image, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height


def read_video(path: str, num_frames: int | None = None) -> Video:
    """The first ``num_frames`` frames (all when None) of a frame folder, ``.npy``, ``.gif`` or video file.

    Raises ``ValueError`` with a one-line reason: missing path, unknown kind, too few frames, no video reader.
    """
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
        if num_frames is not None:
            names = names[:num_frames]
        frames = []
        for name in names:
            with Image.open(os.path.join(path, name)) as im:
                frames.append(im.convert("RGB"))
    elif not os.path.isfile(path):
        raise ValueError(f"video not found: {path} (a folder of frames, .npy, .gif or a video file)")
    elif path.lower().endswith(".npy"):
        frames = _npy_frames(path, num_frames)
    elif path.lower().endswith(".gif"):
        with Image.open(path) as im:
            frames = [
                f.convert("RGB") for _, f in zip(range(num_frames or 10**9), ImageSequence.Iterator(im), strict=False)
            ]
    elif path.lower().endswith(VIDEO_FILE_SUFFIXES):
        frames = _file_frames(path, num_frames)
    else:
        raise ValueError(f"{path}: not a video (a folder of frames, .npy, .gif, or {', '.join(VIDEO_FILE_SUFFIXES)})")
    if not frames or (num_frames is not None and len(frames) < num_frames):
        raise ValueError(f"{path}: {len(frames)} frames, fewer than data.num_frames={num_frames}")
    return Video(tuple(frames))


def _npy_frames(path: str, num_frames: int | None) -> list[Image.Image]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}: a .npy video is (F, H, W, 3) uint8 RGB; got {array.shape} {array.dtype}")
    return [Image.fromarray(np.ascontiguousarray(f)) for f in array[:num_frames]]


def _file_frames(path: str, num_frames: int | None) -> list[Image.Image]:
    try:
        import imageio.v3 as iio

        frames = []
        for frame in iio.imiter(path, plugin="pyav"):
            frames.append(Image.fromarray(frame).convert("RGB"))
            if num_frames is not None and len(frames) == num_frames:
                break
        return frames
    except ImportError as e:
        raise ValueError(
            f"{path}: no video reader is installed (pip install av); or give the video as a folder of frames or .npy"
        ) from e


class VideoDataset(RankedDataset):
    """Map-style video lists: ``dataset[i]`` is a ``PreferenceRecord`` whose ``images`` are ``Video``s (best first)."""

    def __init__(self, source: RankedSource, num_frames: int | None) -> None:
        self.num_frames = num_frames
        super().__init__(source)

    def decode(self, cell: Any, base_dir: str | None) -> Video:
        if isinstance(cell, dict):
            cell = cell.get("path")
        if not isinstance(cell, str) or not cell:
            raise ValueError(f"a video cell is a path (folder, .npy, .gif or video file); got {type(cell).__name__}")
        path = cell if base_dir is None or os.path.isabs(cell) else os.path.join(base_dir, cell)
        return read_video(path, self.num_frames)


def video_source(cfg: Any) -> VideoDataset:
    """The ``VideoDataset`` of a ``data`` config section (``format: video``)."""
    source = RankedSource(
        path=cfg.path,
        split=cfg.split,
        on_bad_row=cfg.on_bad_row,
        max_rows=cfg.max_rows,
        images_column=VIDEOS_COLUMN,
    )
    return VideoDataset(source, cfg.num_frames)


@dataclass(frozen=True, kw_only=True)
class VideoTransform(JointTransform):
    """``JointTransform`` over every frame of the K videos of a group: one resize, flip and crop for all of them.

    ``__call__(videos, generator)`` -> pixels (K, 3, F, res, res) in [-1, 1] and the group's ``SampleInfo``.
    """

    def apply(self, images: Sequence[Any], params: JointParams) -> tuple[Tensor, SampleInfo]:
        lengths = {len(v.frames) for v in images}
        if len(lengths) != 1:
            raise ValueError(f"the videos of a group have different frame counts {sorted(lengths)}")
        (f,) = lengths
        pixels, info = super().apply([frame for v in images for frame in v.frames], params)
        return pixels.view(len(images), f, 3, *pixels.shape[-2:]).transpose(1, 2).contiguous(), info
