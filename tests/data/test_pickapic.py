"""Pick-a-Pic loading on the tiny fixture: row policy, winner-first order, bad rows, streaming, sources."""

from __future__ import annotations

import importlib.util
import io
import logging
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.data import (
    BadRowError,
    DataSourceError,
    GroupSampler,
    JointTransform,
    LoadStats,
    PickapicDataset,
    PickapicIterable,
    PickapicSource,
    PreferenceRecord,
    SkippedRow,
    TransformedDataset,
    TransformedIterable,
    collate_groups,
    load_pickapic,
)


ASSETS = Path(__file__).resolve().parents[2] / "assets"
PICKAPIC_DIR = ASSETS / "pickapic_tiny"
_spec = importlib.util.spec_from_file_location("make_pickapic_fixture", ASSETS / "make_pickapic_fixture.py")
FIXTURE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FIXTURE)

TRAIN_FILE = PICKAPIC_DIR / "data" / "train-00000-of-00001.parquet"
TIES = {*FIXTURE.TIE_ROWS["train"], FIXTURE.NOT_DIFFERENT_ROW}


def raw_table() -> pa.Table:
    return pq.read_table(TRAIN_FILE)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def source(hf_cache: str, **kw) -> PickapicSource:
    return PickapicSource(path=kw.pop("path", str(PICKAPIC_DIR)), cache_dir=hf_cache, **kw)


def all_items(ds: PickapicDataset) -> list[PreferenceRecord | SkippedRow]:
    return [ds[i] for i in range(len(ds))]


def matches_caption(image: Image.Image, caption: str) -> bool:
    """Centre pixel has the caption's shape colour and a corner pixel its background colour (JPEG slack)."""
    words = caption.split()
    fg, bg = FIXTURE.COLORS[words[1]], FIXTURE.COLORS[words[-2]]
    px = np.asarray(image).astype(int)
    h, w = px.shape[:2]
    return bool(np.abs(px[h // 2, w // 2] - fg).max() < 40 and np.abs(px[2, 2] - bg).max() < 40)


def test_default_policy_drops_ties_and_unlabeled(hf_cache):
    ds = PickapicDataset(source(hf_cache))
    assert ds.stats.rows_read == 48
    assert ds.stats.ties_dropped == len(TIES) == 5
    assert ds.stats.unlabeled_dropped == 1
    assert ds.stats.bad_rows_skipped == 0  # images are not decoded at construction
    assert len(ds) == 42
    kept = {ds.source_index(i) for i in range(len(ds))}
    assert kept.isdisjoint(TIES | {FIXTURE.UNLABELED_ROW})
    assert FIXTURE.CORRUPT_ROW in kept


def test_corrupt_row_is_reported_by_index_skipped_and_counted(hf_cache, caplog):
    ds = PickapicDataset(source(hf_cache))
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        items = all_items(ds)
    skipped = [it for it in items if isinstance(it, SkippedRow)]
    assert [s.index for s in skipped] == [FIXTURE.CORRUPT_ROW]
    assert FIXTURE.CORRUPT_COLUMN in skipped[0].reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"row {FIXTURE.CORRUPT_ROW}" in warnings[0] and FIXTURE.CORRUPT_COLUMN in warnings[0]
    assert ds.stats.bad_rows_skipped == 1
    assert ds.stats.bad_rows[0][0] == FIXTURE.CORRUPT_ROW
    assert "bad rows skipped 1" in ds.stats.summary() and f"row {FIXTURE.CORRUPT_ROW}" in ds.stats.summary()
    assert sum(isinstance(it, PreferenceRecord) for it in items) == 41
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        again = all_items(ds)  # a known bad row is neither logged nor counted twice
    assert not caplog.records and ds.stats.bad_rows_skipped == 1
    assert sum(isinstance(it, SkippedRow) for it in again) == 1


def test_raise_policy_names_row_and_column(hf_cache):
    ds = PickapicDataset(source(hf_cache, on_bad_row="raise"))
    position = [ds.source_index(i) for i in range(len(ds))].index(FIXTURE.CORRUPT_ROW)
    with pytest.raises(BadRowError, match=rf"row {FIXTURE.CORRUPT_ROW}: column '{FIXTURE.CORRUPT_COLUMN}'"):
        ds[position]
    with pytest.raises(BadRowError, match=f"row {FIXTURE.CORRUPT_ROW}"):
        ds.validate()


def test_winner_first_swap_by_pixel_content(hf_cache):
    table = raw_table()
    ds = PickapicDataset(source(hf_cache))
    records = [it for it in all_items(ds) if isinstance(it, PreferenceRecord)]
    by_row = {r.index: r for r in records}
    label_0 = table.column("label_0").to_pylist()
    swapped = [i for i in by_row if label_0[i] == 0.0]
    kept = [i for i in by_row if label_0[i] == 1.0]
    assert swapped and kept
    for i in swapped + kept:
        jpg_0, jpg_1 = (decode(table.column(c)[i].as_py()) for c in ("jpg_0", "jpg_1"))
        winner, loser = (jpg_1, jpg_0) if label_0[i] == 0.0 else (jpg_0, jpg_1)
        assert np.array_equal(np.asarray(by_row[i].images[0]), winner)
        assert np.array_equal(np.asarray(by_row[i].images[1]), loser)
        assert by_row[i].scores == [1.0, 0.0]
        assert by_row[i].prompt == table.column("caption")[i].as_py()
    # The fixture's preferred image is the one that matches the caption: the winner always does.
    assert all(matches_caption(r.images[0], r.prompt) for r in records)
    assert sum(not matches_caption(r.images[1], r.prompt) for r in records) >= 10


def test_ties_keep_preserves_order_and_scores(hf_cache):
    ds = PickapicDataset(source(hf_cache, ties="keep"))
    assert len(ds) == 47 and ds.stats.ties_dropped == 0
    table = raw_table()
    ties = [it for it in all_items(ds) if isinstance(it, PreferenceRecord) and it.index in TIES]
    assert {t.index for t in ties} == TIES
    for record in ties:
        assert record.scores == [0.5, 0.5]
        assert np.array_equal(np.asarray(record.images[0]), decode(table.column("jpg_0")[record.index].as_py()))

    different = PickapicDataset(source(hf_cache, ties="keep", require_different=True))
    assert different.stats.not_different_dropped == 1 and len(different) == 46
    assert FIXTURE.NOT_DIFFERENT_ROW not in {different.source_index(i) for i in range(len(different))}

    unlabeled = PickapicDataset(source(hf_cache, ties="keep", require_label=False))
    assert len(unlabeled) == 48 and unlabeled.stats.unlabeled_dropped == 0


def test_streaming_gives_the_same_records_as_map_style(hf_cache):
    for ties in ("drop", "keep"):
        mapped = PickapicDataset(source(hf_cache, ties=ties))
        map_records = [it for it in all_items(mapped) if isinstance(it, PreferenceRecord)]
        streamed = PickapicIterable(source(hf_cache, ties=ties, streaming=True))
        stream_records = list(streamed)
        assert [r.index for r in stream_records] == [r.index for r in map_records]
        for a, b in zip(stream_records, map_records, strict=True):
            assert (a.prompt, a.scores) == (b.prompt, b.scores)
            for x, y in zip(a.images, b.images, strict=True):
                assert np.array_equal(np.asarray(x), np.asarray(y))
        assert streamed.stats == mapped.stats


def test_streaming_and_map_groups_get_the_same_augmentation(hf_cache):
    transform = JointTransform(resolution=32, crop="random", hflip_prob=0.5)
    mapped = TransformedDataset(PickapicDataset(source(hf_cache)), transform, seed=5)
    streamed = TransformedIterable(PickapicIterable(source(hf_cache, streaming=True)), transform, seed=5)
    for epoch in (0, 1):
        mapped.set_epoch(epoch)
        streamed.set_epoch(epoch)
        map_groups = [g for g in (mapped[i] for i in range(len(mapped))) if not isinstance(g, SkippedRow)]
        stream_groups = list(streamed)
        assert len(stream_groups) == len(map_groups) == 41
        for a, b in zip(stream_groups, map_groups, strict=True):
            assert a.index == b.index and a.info == b.info and torch.equal(a.pixels, b.pixels)
    assert len({g.info.crop_top_left for g in map_groups}) > 1


def test_streaming_shards_partition_the_rows(hf_cache):
    src = source(hf_cache, streaming=True)
    shards = [list(load_pickapic(src, rank=r, world_size=2)) for r in range(2)]
    indices = [[rec.index for rec in shard] for shard in shards]
    assert all(i % 2 == 0 for i in indices[0]) and all(i % 2 == 1 for i in indices[1])
    full = [rec.index for rec in PickapicIterable(src)]
    assert sorted(indices[0] + indices[1]) == full
    # DataLoader workers split a rank's rows further; the rank's rows and their indices stay the same
    loader = DataLoader(PickapicIterable(src, rank=1, world_size=2), batch_size=None, num_workers=2)
    assert sorted(rec.index for rec in loader) == indices[1]


def test_missing_column_error_names_column_and_source(hf_cache, tmp_path):
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(raw_table().drop_columns(["label_1"]), path)
    with pytest.raises(ValueError, match="'label_1'") as info:
        PickapicDataset(source(hf_cache, path=str(tmp_path)))
    assert str(path) in str(info.value) and "caption" in str(info.value)
    with pytest.raises(ValueError, match="'label_1'"):
        PickapicIterable(source(hf_cache, path=str(tmp_path), streaming=True))


def test_overridden_column_names(hf_cache, tmp_path):
    table = raw_table().rename_columns(["prompt" if c == "caption" else c for c in raw_table().column_names])
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="'caption'"):
        PickapicDataset(source(hf_cache, path=str(path)))
    ds = PickapicDataset(source(hf_cache, path=str(path), caption_column="prompt"))
    assert len(ds) == 42 and ds[0].prompt == table.column("prompt")[0].as_py()


def test_bad_labels_and_empty_images_are_bad_rows(hf_cache, tmp_path, caplog):
    table = raw_table().slice(0, 8)
    label_0 = table.column("label_0").to_pylist()
    label_1 = table.column("label_1").to_pylist()
    label_0[2], label_1[2] = 0.7, 0.3  # not in {0, 0.5, 1}
    label_0[3], label_1[3] = 1.0, 1.0  # does not sum to 1
    jpg_0 = table.column("jpg_0").to_pylist()
    jpg_0[4], jpg_0[6] = b"", None  # empty bytes, null cell
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(label_0, pa.float64()))
    table = table.set_column(table.schema.get_field_index("label_1"), "label_1", pa.array(label_1, pa.float64()))
    table = table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg_0, pa.binary()))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)

    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        ds = PickapicDataset(source(hf_cache, path=str(path)))
        assert [i for i, _ in ds.stats.bad_rows] == [2, 3]
        ds.validate()
    assert [i for i, _ in ds.stats.bad_rows] == [2, 3, 4, 6]
    reasons = dict(ds.stats.bad_rows)
    assert "label" in reasons[2] and "empty" in reasons[4] and "None" in reasons[6]
    assert any("row 3" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadRowError, match="row 2: labels"):
        PickapicDataset(source(hf_cache, path=str(path), on_bad_row="raise"))


def test_dataloader_with_workers_reports_skipped_rows(hf_cache):
    groups = TransformedDataset(PickapicDataset(source(hf_cache)), JointTransform(resolution=32, crop="random"))
    sampler = GroupSampler(len(groups), per_device_batch_size=6, seed=3, with_epoch=True)
    loader = DataLoader(groups, batch_size=6, sampler=sampler, collate_fn=collate_groups, num_workers=2)
    stats, seen = LoadStats(), 0
    for batch in loader:
        stats.add_skipped(batch.skipped)
        seen += len(batch)
        assert batch.pixels.shape[1:] == (2, 3, 32, 32)
    assert seen == 41
    assert [i for i, _ in stats.bad_rows] == [FIXTURE.CORRUPT_ROW]


def test_source_resolution_and_splits(hf_cache, tmp_path):
    assert len(PickapicDataset(source(hf_cache, split="validation"))) == 7
    assert len(PickapicDataset(source(hf_cache, path=str(TRAIN_FILE)))) == 42
    assert len(PickapicDataset(source(hf_cache, path=str(PICKAPIC_DIR / "data" / "train-*.parquet")))) == 42
    assert PickapicDataset(source(hf_cache, max_rows=10)).stats.rows_read == 10
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        PickapicDataset(source(hf_cache, split="test"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickapicDataset(source(hf_cache, path=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        PickapicDataset(source(hf_cache, path=str(tmp_path / "*.parquet")))


def test_unknown_hub_id_fails_fast_offline(hf_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataSourceError, match="nobody-here/no_such_pickapic") as info:
        PickapicDataset(source(hf_cache, path="nobody-here/no_such_pickapic"))
    assert time.monotonic() - start < 10
    assert "Offline mode is on" in str(info.value) and "local directory" in str(info.value)


def test_config_choices_are_checked():
    with pytest.raises(ValueError, match="did you mean 'drop'"):
        PickapicSource(path="x", ties="dorp")
    with pytest.raises(ValueError, match="choices: skip, raise"):
        PickapicSource(path="x", on_bad_row="ignore")
    with pytest.raises(ValueError, match="max_rows"):
        PickapicSource(path="x", max_rows=-1)


def test_fixture_is_small_and_has_real_dtypes():
    schema = pq.read_schema(TRAIN_FILE)
    assert schema.field("jpg_0").type == pa.binary() and schema.field("label_0").type == pa.float64()
    assert schema.field("created_at").type == pa.timestamp("ns") and schema.field("has_label").type == pa.bool_()
    assert schema.field("ranking_id").type == pa.int64()
    total = sum(p.stat().st_size for d in ("pickapic_tiny", "ranked_tiny") for p in Path(ASSETS, d).rglob("*"))
    assert total < 500_000


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_with_zero_rows_is_a_clear_error(hf_cache, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(raw_table().slice(0, 0), empty)
    for streaming in (False, True):
        with pytest.raises(DataSourceError, match="0 rows for split 'train'") as info:
            load_pickapic(source(hf_cache, path=str(empty), streaming=streaming))
        assert str(empty) in str(info.value)
    both = tmp_path / "both"
    both.mkdir()
    pq.write_table(raw_table().slice(0, 0), both / "a.parquet")
    pq.write_table(raw_table(), both / "b.parquet")
    assert len(PickapicDataset(source(hf_cache, path=str(both)))) == 42  # an empty shard among others is ignored
    (both / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataSourceError, match=r"c\.parquet: not a readable parquet file"):
        PickapicDataset(source(hf_cache, path=str(both)))


def test_empty_captions_and_degenerate_images_are_counted_in_the_data_summary(hf_cache, tmp_path):
    """They are used as they are, but the summary the run prints at the end names how many and which rows."""
    from diffalign.config import DataConfig
    from diffalign.data.loader import build_loader

    table = raw_table().slice(0, 8)  # row 5 is a tie (dropped): 7 groups
    columns = {name: table.column(name).to_pylist() for name in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    columns["caption"][0], columns["caption"][2] = "", "   "
    columns["jpg_1"][1], columns["jpg_0"][3] = _png(4000, 1), _png(1, 1)
    for row in (1, 3):
        columns["label_0"][row], columns["label_1"][row] = 1.0, 0.0
    for name, values in columns.items():
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type)
        )
    path = tmp_path / "odd.parquet"
    pq.write_table(table, path)

    cfg = DataConfig(path=str(path), resolution=32, hflip_prob=0.0)
    loader = build_loader(cfg, batch_size=7, seed=0)
    batch, _ = loader.next_batch()
    assert len(batch) == 7
    summary = loader.stats_summary()
    assert "empty captions 2 [row 0: empty caption; row 2: empty caption]" in summary
    assert "degenerate images" in summary and "row 1: image 1 is 4000x1 px; row 3: image 0 is 1x1 px]" in summary
    loader.next_batch()  # the next epoch sees the same rows again: each is counted once
    assert loader.stats_summary() == summary


def test_spatial_captions_under_horizontal_flips_are_named_in_the_data_summary(hf_cache, tmp_path):
    """A flipped "a cat left of a dog" image shows the dog on the left: with hflip_prob > 0 the summary counts the
    captions that say left/right and says how to turn flipping off; with hflip_prob 0 it says nothing."""
    from diffalign.config import DataConfig
    from diffalign.data.loader import build_loader

    table = raw_table().slice(0, 4)
    captions = table.column("caption").to_pylist()
    captions[1], captions[3] = "a red circle to the left of a blue square", "a cat, Right side up"
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
    path = tmp_path / "spatial.parquet"
    pq.write_table(table, path)
    for hflip, expected in ((0.5, True), (0.0, False)):
        loader = build_loader(DataConfig(path=str(path), resolution=32, hflip_prob=hflip), batch_size=4, seed=0)
        loader.next_batch()
        summary = loader.stats_summary()
        assert ("captions naming left/right with hflip_prob > 0 2" in summary) is expected, summary
        if expected:
            assert "row 1: caption says 'left'; row 3: caption says 'right'" in summary
            assert "set data.hflip_prob=0" in summary
