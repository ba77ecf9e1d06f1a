"""Unpaired labelled images (Diffusion-KTO): Pick-a-Pic read as unpaired, a plain table, the balanced sampler."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.data import BadRowError, PickapicDataset, PickapicSource, PreferenceRecord, SkippedRow
from diffalign.data.balanced import BalancedSampler, class_weights
from diffalign.data.loader import build_loader
from diffalign.data.unpaired import PickapicUnpaired, UnpairedSource, UnpairedTable


PICKAPIC_DIR = Path(__file__).resolve().parents[2] / "assets" / "pickapic_tiny"
BAD_ROW = 13  # its jpg_1 is truncated; label_0 == 0 exactly when index % 3 == 1, so 13 % 3 == 1: jpg_1 wins


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def test_pickapic_pairs_read_as_unpaired_winner_desirable_loser_not(hf_cache):
    pairs = PickapicDataset(PickapicSource(path=str(PICKAPIC_DIR), cache_dir=hf_cache))
    items = PickapicUnpaired(pairs)
    assert len(items) == 2 * len(pairs) == 84
    assert items.labels.tolist() == [True, False] * len(pairs)
    for j in (0, 1, 5):
        pair = pairs[j]
        win, lose = items[2 * j], items[2 * j + 1]
        row = pairs.source_index(j)
        assert win.scores == [1.0] and lose.scores == [0.0]
        assert (win.index, lose.index) == (2 * row, 2 * row + 1)  # distinct seeds for the two images
        assert win.prompt == lose.prompt == pair.prompt
        assert np.array_equal(_pixels(win.images[0]), _pixels(pair.images[0]))
        assert np.array_equal(_pixels(lose.images[0]), _pixels(pair.images[1]))


def test_bad_image_skips_only_that_image_or_raises(hf_cache):
    pairs = PickapicDataset(PickapicSource(path=str(PICKAPIC_DIR), cache_dir=hf_cache))
    j = [pairs.source_index(i) for i in range(len(pairs))].index(BAD_ROW)
    items = PickapicUnpaired(pairs)
    winner = items[2 * j]  # row 13 % 3 == 1: jpg_1 (the broken one) is the winner; the loser jpg_0 decodes
    assert isinstance(items[2 * j + 1], PreferenceRecord)
    skipped = winner
    assert isinstance(skipped, SkippedRow) and skipped.index == BAD_ROW and "jpg_1" in skipped.reason
    assert pairs.stats.bad_rows_skipped == 1
    strict = PickapicUnpaired(
        PickapicDataset(PickapicSource(path=str(PICKAPIC_DIR), on_bad_row="raise", cache_dir=hf_cache))
    )
    with pytest.raises(BadRowError, match=f"row {BAD_ROW}: column 'jpg_1'"):
        [strict[i] for i in (2 * j, 2 * j + 1)]


def test_kept_ties_are_both_desirable(hf_cache):
    pairs = PickapicDataset(PickapicSource(path=str(PICKAPIC_DIR), ties="keep", cache_dir=hf_cache))
    items = PickapicUnpaired(pairs)
    ties = [j for j in range(len(pairs)) if pairs.source_index(j) in (5, 17, 29, 35, 41)]  # the fixture's ties
    assert len(ties) == 5
    for j in ties:
        assert items.labels[2 * j] and items.labels[2 * j + 1]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _table(tmp_path: Path) -> Path:
    rows = {
        "image": [_png((255, 0, 0)), b"broken", _png((0, 0, 255)), _png((0, 255, 0)), _png((9, 9, 9))],
        "caption": ["red", "bad image", "blue", "green", "bad label"],
        "label": [1, 0, 1, 0, 2],
    }
    table = pa.table(
        {
            "image": pa.array(rows["image"], pa.binary()),
            "caption": rows["caption"],
            "label": pa.array(rows["label"], pa.int64()),
        }
    )
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    return path


def test_plain_table_labels_images_and_bad_rows(tmp_path, hf_cache):
    path = _table(tmp_path)
    ds = UnpairedTable(UnpairedSource(path=str(path), cache_dir=hf_cache))
    assert len(ds) == 4 and ds.labels.tolist() == [True, False, True, False]  # row 4's label 2 is a bad row
    assert ds.stats.bad_rows[0][0] == 4 and "label" in ds.stats.bad_rows[0][1]
    red = ds[0]
    assert red.prompt == "red" and red.scores == [1.0] and red.index == 0
    assert _pixels(red.images[0])[0, 0].tolist() == [255, 0, 0]
    broken = ds[1]
    assert isinstance(broken, SkippedRow) and broken.index == 1
    assert ds.stats.bad_rows_skipped == 2
    with pytest.raises(BadRowError, match="row 4: column 'label'"):
        UnpairedTable(UnpairedSource(path=str(path), on_bad_row="raise", cache_dir=hf_cache))


def test_plain_table_image_paths_resolve_next_to_the_parquet(tmp_path, hf_cache):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "imgs" / "blue.png")
    table = pa.table(
        {"image": ["imgs/blue.png", "imgs/missing.png"], "caption": ["blue", "x"], "label": [True, False]}
    )
    pq.write_table(table, tmp_path / "table.parquet")
    ds = UnpairedTable(UnpairedSource(path=str(tmp_path), cache_dir=hf_cache))  # the parquet's folder is tmp_path
    assert ds.labels.tolist() == [True, False]
    assert _pixels(ds[0].images[0])[0, 0].tolist() == [0, 0, 255]
    assert isinstance(ds[1], SkippedRow) and "not found" in ds[1].reason


def test_plain_table_image_paths_resolve_next_to_each_parquet_file_in_the_standard_layout(tmp_path, hf_cache):
    """``<dir>/data/train-*.parquet`` with images beside each file: ``data.path=<dir>`` (a folder) or a glob over
    files in two folders resolve every row's path against the folder of the file that holds the row."""
    colors = {"data": (0, 0, 255), "more/data": (255, 0, 0)}
    for folder, color in colors.items():
        (tmp_path / folder / "imgs").mkdir(parents=True)
        Image.new("RGB", (8, 8), color).save(tmp_path / folder / "imgs" / "a.png")
        table = pa.table({"image": ["imgs/a.png"] * 2, "caption": ["c", "d"], "label": [True, False]})
        pq.write_table(table, tmp_path / folder / "train-00000-of-00001.parquet")
    blue, red = [0, 0, 255], [255, 0, 0]
    for path, want in ((tmp_path, [blue] * 2), (tmp_path / "**" / "train-*.parquet", [blue] * 2 + [red] * 2)):
        ds = UnpairedTable(UnpairedSource(path=str(path), cache_dir=hf_cache))
        assert [_pixels(ds[i].images[0])[0, 0].tolist() for i in range(len(ds))] == want, path
        assert ds.stats.bad_rows_skipped == 0


def test_balanced_sampler_draws_the_positive_ratio_whatever_the_class_sizes():
    labels = [True] * 10 + [False] * 90
    w = class_weights(labels, 0.8)
    assert float(w[:10].sum()) == pytest.approx(0.8) and float(w[10:].sum()) == pytest.approx(0.2)
    sampler = BalancedSampler(labels, 0.8, 50, seed=3)
    drawn = torch.cat([sampler.permutation(e) for e in range(40)])
    frac = np.asarray(labels)[drawn.numpy()].mean()
    assert frac == pytest.approx(0.8, abs=0.02)
    assert torch.equal(sampler.permutation(5), BalancedSampler(labels, 0.8, 50, seed=3).permutation(5))
    with pytest.raises(ValueError, match="both classes"):
        BalancedSampler([True] * 4, 0.8, 2)


def test_balanced_sampler_splits_global_batches_across_ranks_and_resumes():
    labels = [i % 3 == 0 for i in range(30)]
    one = list(BalancedSampler(labels, 0.5, 4, seed=1))
    ranks = [list(BalancedSampler(labels, 0.5, 2, num_processes=2, rank=r, seed=1)) for r in range(2)]
    interleaved = [x for b in range(len(ranks[0]) // 2) for r in range(2) for x in ranks[r][2 * b : 2 * b + 2]]
    assert interleaved == one
    resumed = BalancedSampler(labels, 0.5, 4, seed=1)
    resumed.load_state_dict({"epoch": 0, "position": 3})
    assert list(resumed) == one[12:]


def _data_cfg(**kw):
    base = {
        "format": "pickapic",
        "path": str(PICKAPIC_DIR),
        "split": "train",
        "streaming": False,
        "resolution": 32,
        "crop": "center",
        "hflip_prob": 0.0,
        "ties": "drop",
        "on_bad_row": "skip",
        "max_bad_fraction": 0.1,
        "labelled_by": None,
        "max_rows": None,
        "proportion_empty_prompts": 0.0,
        "num_workers": 0,
        "latent_cache": None,
        "positive_ratio": 0.8,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_loader_gives_one_image_groups_with_labels_and_distinct_seeds():
    loader = build_loader(_data_cfg(), batch_size=6, seed=0, unpaired=True)
    batch, seeds = loader.next_batch()
    assert batch.pixels.shape[1:] == (1, 3, 32, 32) and batch.scores.shape == (len(batch), 1)
    assert set(batch.scores.flatten().tolist()) <= {0.0, 1.0}
    assert len(set(seeds)) == len(seeds)
    state = loader.state_dict()
    nxt, nxt_seeds = loader.next_batch()
    again = build_loader(_data_cfg(), batch_size=6, seed=0, unpaired=True)
    again.load_state_dict(state)
    b2, s2 = again.next_batch()
    assert s2 == nxt_seeds and torch.equal(b2.pixels, nxt.pixels)
