"""Ranked-list loading (RankDPO): JSONL and parquet, score-descending order, bad rows."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.data import BadRowError, PreferenceRecord, RankedDataset, RankedSource, SkippedRow


RANKED_DIR = Path(__file__).resolve().parents[2] / "assets" / "ranked_tiny"


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in (RANKED_DIR / "train.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def write_parquet(rows: list[dict], path: Path, base: Path = RANKED_DIR) -> None:
    table = pa.table(
        {
            "prompt": [r["prompt"] for r in rows],
            "images": pa.array([[(base / p).read_bytes() for p in r["images"]] for r in rows], pa.list_(pa.binary())),
            "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path)


def check_sorted_like_fixture(ds: RankedDataset) -> None:
    rows = fixture_rows()
    assert len(ds) == len(rows) == 8
    for i, row in enumerate(rows):
        record = ds[i]
        assert isinstance(record, PreferenceRecord) and record.index == i and record.prompt == row["prompt"]
        order = sorted(range(len(row["scores"])), key=lambda k: -row["scores"][k])  # stable: ties keep file order
        assert record.scores == pytest.approx([row["scores"][k] for k in order], abs=1e-6)
        assert record.scores == sorted(record.scores, reverse=True)
        for image, k in zip(record.images, order, strict=True):
            assert np.array_equal(np.asarray(image), pixels(RANKED_DIR / row["images"][k]))


def test_jsonl_records_are_sorted_best_first():
    ds = RankedDataset(RankedSource(path=str(RANKED_DIR)))
    check_sorted_like_fixture(ds)
    assert ds.stats.rows_read == 8 and ds.stats.bad_rows_skipped == 0
    assert any(r["scores"] != sorted(r["scores"], reverse=True) for r in fixture_rows())  # sorting was needed
    tied = ds[5].scores
    assert len(set(tied)) < len(tied)  # the fixture's tie row


def test_jsonl_file_path_and_parquet_give_the_same_records(tmp_path, hf_cache):
    check_sorted_like_fixture(RankedDataset(RankedSource(path=str(RANKED_DIR / "train.jsonl"))))
    write_parquet(fixture_rows(), tmp_path / "ranked.parquet")
    ds = RankedDataset(RankedSource(path=str(tmp_path / "ranked.parquet"), cache_dir=hf_cache))
    check_sorted_like_fixture(ds)


def test_jsonl_bad_rows_are_skipped_or_raised(tmp_path, caplog):
    shutil.copytree(RANKED_DIR / "images", tmp_path / "images")
    rows = fixture_rows()
    lines = [json.dumps(r) for r in rows[:3]]
    lines.append("{not json")  # row 3
    lines.append(json.dumps({**rows[3], "scores": rows[3]["scores"][:3]}))  # row 4: K mismatch
    lines.append(json.dumps({**rows[4], "images": ["images/missing.png", *rows[4]["images"][1:]]}))  # row 5
    lines.append(json.dumps({**rows[5], "scores": [1.0, float("nan"), 0.0, 0.5]}))  # row 6: not finite
    lines.append(json.dumps({"prompt": "one image", "images": rows[6]["images"][:1], "scores": [1.0]}))  # row 7
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        ds = RankedDataset(RankedSource(path=str(tmp_path)))
        assert [i for i, _ in ds.stats.bad_rows] == [3, 4, 6, 7]
        items = [ds[i] for i in range(len(ds))]
    assert [type(it) for it in items] == [PreferenceRecord] * 3 + [SkippedRow]
    assert items[3].index == 5 and "missing.png" in items[3].reason
    reasons = dict(ds.stats.bad_rows)
    assert "invalid JSON" in reasons[3] and "K mismatch" in reasons[4] and "at least 2" in reasons[7]
    assert any("row 5" in r.getMessage() and "missing.png" in r.getMessage() for r in caplog.records)

    with pytest.raises(BadRowError, match="row 3"):
        RankedDataset(RankedSource(path=str(tmp_path), on_bad_row="raise"))
    (tmp_path / "train.jsonl").write_text("\n".join([*lines[:3], lines[5]]) + "\n")
    strict = RankedDataset(RankedSource(path=str(tmp_path), on_bad_row="raise"))
    with pytest.raises(BadRowError, match=r"row 3: images\[0\] \(images/missing.png\)"):
        strict[3]


def test_parquet_k_mismatch_and_missing_column(tmp_path, hf_cache):
    rows = fixture_rows()[:4]
    rows[1] = {**rows[1], "scores": rows[1]["scores"][:2]}
    write_parquet(rows, tmp_path / "ranked.parquet")
    ds = RankedDataset(RankedSource(path=str(tmp_path / "ranked.parquet"), cache_dir=hf_cache))
    assert len(ds) == 3 and [i for i, _ in ds.stats.bad_rows] == [1]
    assert [ds[i].index for i in range(3)] == [0, 2, 3]

    pq.write_table(pq.read_table(tmp_path / "ranked.parquet").drop_columns(["scores"]), tmp_path / "noscores.parquet")
    with pytest.raises(ValueError, match=r"'scores'.*columns present: prompt, images"):
        RankedDataset(RankedSource(path=str(tmp_path / "noscores.parquet"), cache_dir=hf_cache))


def test_ranked_config_checks():
    with pytest.raises(ValueError, match="min_images"):
        RankedSource(path="x", min_images=1)
    with pytest.raises(ValueError, match="did you mean 'skip'"):
        RankedSource(path="x", on_bad_row="skp")


def test_jsonl_with_a_utf8_byte_order_mark_keeps_its_first_row(tmp_path):
    copy = tmp_path / "ranked"
    shutil.copytree(RANKED_DIR, copy)
    (copy / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (RANKED_DIR / "train.jsonl").read_bytes())
    ds = RankedDataset(RankedSource(path=str(copy / "train.jsonl")))
    assert ds.stats.bad_rows_skipped == 0 and ds[0].prompt == fixture_rows()[0]["prompt"]
