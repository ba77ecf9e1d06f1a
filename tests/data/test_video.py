"""Video preference rows (``data.format: video``): frame folders, .npy and .gif readers, bad rows, one joint transform
for every frame of a group, batches of (B, K, 3, F, H, W)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.data import BadRowError, SkippedRow
from diffalign.data.loader import build_loader
from diffalign.data.transforms import JointParams
from diffalign.data.video import Video, VideoTransform, read_video, video_source


VIDEO_DIR = Path(__file__).resolve().parents[2] / "assets" / "video_tiny"


DATA = {
    "format": "video", "path": str(VIDEO_DIR), "split": "train", "streaming": False, "on_bad_row": "raise",
    "max_rows": None, "num_frames": 5, "resolution": 16, "crop": "center", "hflip_prob": 0.0,
    "proportion_empty_prompts": 0.0, "labelled_by": None, "latent_cache": None, "num_workers": 0,
    "max_bad_fraction": 0.5, "curriculum": SimpleNamespace(chunks=0), "caption_columns": None, "positive_ratio": None,
}  # fmt: skip


def data_cfg(**kw):
    """A ``data`` section (the fields the loader reads) for ``format: video`` on the shipped fixture."""
    return SimpleNamespace(**{**DATA, **kw})


def test_every_reader_gives_the_same_frames_as_written():
    folder = read_video(str(VIDEO_DIR / "clips" / "r0_0"))
    npy = read_video(str(VIDEO_DIR / "clips" / "r0_1.npy"), 5)
    gif = read_video(str(VIDEO_DIR / "clips" / "r3_1.gif"), 9)
    assert len(folder.frames) == 9 and len(npy.frames) == 5 and len(gif.frames) == 9
    assert folder.size == (40, 32) and folder.height == 32  # PIL (width, height)
    array = np.load(VIDEO_DIR / "clips" / "r0_1.npy")
    assert np.array_equal(np.asarray(npy.frames[4]), array[4])
    with pytest.raises(ValueError, match=r"fewer than data\.num_frames=13"):
        read_video(str(VIDEO_DIR / "clips" / "r0_0"), 13)


def test_video_files_without_a_reader_say_what_to_do(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"\x00" * 16)
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"no video reader is installed \(pip install av\)"):
            read_video(str(path), 5)
    other = path.with_suffix(".txt")
    other.write_text("x")
    with pytest.raises(ValueError, match="not a video"):
        read_video(str(other), 5)


def test_records_are_best_first_and_lists_load():
    pairs = video_source(data_cfg())
    rec = pairs[0]
    assert len(pairs) == 4 and rec.scores == [1.0, 0.0]
    assert all(isinstance(v, Video) and len(v.frames) == 5 for v in rec.images)
    lists = video_source(data_cfg(split="lists"))
    rec = lists[1]
    assert rec.scores == [1.0, 0.5, 0.0] and len(rec.images) == 3


def test_a_short_video_is_a_bad_row(tmp_path):
    shutil.copytree(VIDEO_DIR / "clips", tmp_path / "clips")
    rows = [json.loads(line) for line in (VIDEO_DIR / "train.jsonl").read_text().splitlines()]
    np.save(tmp_path / "clips" / "short.npy", np.zeros((3, 32, 40, 3), np.uint8))
    rows[1]["videos"][1] = "clips/short.npy"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipping = video_source(data_cfg(path=str(tmp_path), on_bad_row="skip"))
    item = skipping[1]
    assert isinstance(item, SkippedRow) and "videos[1] (clips/short.npy)" in item.reason and "3 frames" in item.reason
    with pytest.raises(BadRowError, match=r"short\.npy"):
        video_source(data_cfg(path=str(tmp_path)))[1]


def test_one_flip_and_crop_for_every_frame_of_the_group():
    rec = video_source(data_cfg())[0]
    transform = VideoTransform(resolution=16, crop="random", hflip_prob=1.0)
    pixels, info = transform.apply(rec.images, JointParams(flip=True, top=0, left=3))
    assert pixels.shape == (2, 3, 5, 16, 16)
    frames = [f for v in rec.images for f in v.frames]
    flat, _ = super(VideoTransform, transform).apply(frames, JointParams(flip=True, top=0, left=3))
    assert torch.equal(pixels, flat.view(2, 5, 3, 16, 16).transpose(1, 2))
    assert info.original_size == (32, 40)


def test_loader_batches_videos():
    loader = build_loader(data_cfg(), batch_size=2, seed=0)
    batch, seeds = loader.next_batch()
    assert batch.pixels.shape == (2, 2, 3, 5, 16, 16) and len(seeds) == 2
    assert batch.scores.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert batch.pixels.min() >= -1.0 and batch.pixels.max() <= 1.0
