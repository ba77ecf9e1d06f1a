"""data.max_bad_fraction: a source whose rows are (nearly) all unusable stops with one line, in every format."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign import config as dconfig
from diffalign.config import DataConfig
from diffalign.data import TooManyBadRowsError
from diffalign.data.loader import build_loader
from diffalign.data.records import BadRowTally, too_many_bad
from tests.data.test_pickapic import raw_table


def test_too_many_bad_is_a_two_sigma_binomial_test():
    """f = 0.1: 1 bad row in a batch of 8 is chance; 4 of 12, 10 of 50, 29 of 200 are not."""
    assert not too_many_bad(1, 8, 0.1) and not too_many_bad(3, 12, 0.1) and too_many_bad(4, 12, 0.1)
    assert not too_many_bad(9, 50, 0.1) and too_many_bad(10, 50, 0.1)
    assert not too_many_bad(28, 200, 0.1) and too_many_bad(29, 200, 0.1)
    assert too_many_bad(1, 10_000, 0.0) and not too_many_bad(0, 10_000, 0.0)
    assert not too_many_bad(12, 12, 1.0)


def test_tally_merges_across_processes_to_the_same_most_common_reason():
    one, a, b = BadRowTally(), BadRowTally(), BadRowTally()
    rows = [(7, "column 'jpg_0': cannot identify image data (12 bytes; truncated)"), (3, "column 'caption' is null")]
    rows += [(2, "column 'jpg_0': cannot identify image data (99 bytes; truncated)")]
    for i, (index, reason) in enumerate(rows):
        one.add(index, reason)
        (a if i % 2 else b).add(index, reason)
    a.merge(b)
    assert a.most_common() == one.most_common()
    assert one.most_common()[1:] == (2, 2, "column 'jpg_0': cannot identify image data (99 bytes; truncated)")


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_pickapic_labels_mostly_broken_stop_when_the_loader_is_built(tmp_path):
    """The first 30 of 48 rows with labels that are not 1/0, 0/1 or 0.5/0.5: the same on every process (all read the labels)."""
    table = raw_table()
    labels = table.column("label_0").to_pylist()
    for row in range(30):
        labels[row] = 0.3
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels, pa.float64()))
    path = tmp_path / "labels.parquet"
    pq.write_table(table, path)
    cfg = DataConfig(path=str(path), resolution=32)
    with pytest.raises(TooManyBadRowsError) as err:
        build_loader(cfg, batch_size=2, seed=0)
    text = _one_line(err)
    bad = sum(table.column("has_label").to_pylist()[:30])  # an unlabeled row is dropped by policy, not bad
    assert f"data.path={path}: {bad} of {len(table)} rows whose labels were read are unusable (" in text
    assert (
        f"above data.max_bad_fraction=0.1); most common reason ({bad} rows), e.g. row 0: labels (label_0=0.3" in text
    )
    assert text.endswith("fix the data, or raise data.max_bad_fraction (1 never stops)")
    build_loader(DataConfig(path=str(path), resolution=32, max_bad_fraction=1.0), batch_size=2, seed=0)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 200, 20)).save(buf, format="PNG")
    return buf.getvalue()


def _draw(loader, batches: int) -> None:
    for _ in range(batches):
        loader.next_batch()


@pytest.mark.parametrize("fmt", ["unpaired", "pickapic", "ranked"])
def test_images_mostly_broken_are_counted_as_they_are_drawn(tmp_path, fmt):
    """Every format counts the rows it draws and the unusable ones; the check itself gets process sums from the
    training loop (``check_bad_rows``), here those of this one process."""
    good, broken = _png(), b"not an image"
    n = 24
    if fmt == "unpaired":
        images = [good if i % 6 == 0 else "imgs/missing.png" for i in range(n)]
        pq.write_table(
            pa.table({"image": images, "caption": ["c"] * n, "label": [i % 2 for i in range(n)]}),
            tmp_path / "t.parquet",
        )
        cfg = DataConfig(format="unpaired", path=str(tmp_path), resolution=32, positive_ratio=None)
    elif fmt == "pickapic":
        table = raw_table().slice(0, n)
        jpg = [good if i % 6 == 0 else broken for i in range(n)]
        table = table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg, pa.binary()))
        pq.write_table(table, tmp_path / "p.parquet")
        cfg = DataConfig(path=str(tmp_path / "p.parquet"), resolution=32, ties="keep")
    else:
        (tmp_path / "good.png").write_bytes(good)
        lines = [
            {"prompt": "p", "images": ["good.png", "good.png" if i % 6 == 0 else "gone.png"], "scores": [1, 0]}
            for i in range(n)
        ]
        (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        cfg = DataConfig(format="ranked", path=str(tmp_path), resolution=32)
    loader = build_loader(cfg, batch_size=4, seed=0, unpaired=fmt == "unpaired")
    _draw(loader, 3)
    counts = loader.row_counts()
    assert counts["seen"] == 12 and 8 <= counts["bad"] <= 12
    with pytest.raises(TooManyBadRowsError) as err:
        loader.check_bad_rows(counts["seen"], counts["bad"], [loader.bad_row_tally()])
    text = _one_line(err)
    assert "of 12 rows drawn so far are unusable" in text and "most common reason" in text, text


def test_max_bad_fraction_is_checked_in_the_config():
    for value in ("1.5", "-0.1"):
        with pytest.raises(dconfig.ConfigError, match=f"data.max_bad_fraction={value} must be in \\[0, 1\\]"):
            dconfig.load("toy/dpo", ["run.output_dir=x", f"data.max_bad_fraction={value}"])
    assert dconfig.load("toy/dpo", ["run.output_dir=x"]).data.max_bad_fraction == 0.1
