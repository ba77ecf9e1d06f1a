"""DCPO's second caption on labelled pairs: the duo world's caption writer on hand-made duo images, written as
``caption_0`` / ``caption_1`` and read back by DCPO's loader path (``data.caption_columns``)."""

from __future__ import annotations

import datetime
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.data.pickapic import PickapicDataset, PickapicSource, pickapic_schema
from diffalign.label.captions import add_image_captions
from diffalign.label.config import LabelError
from diffalign.toy import duo, world, worlds


def _jpeg(scene: duo.Scene) -> bytes:
    buf = io.BytesIO()
    world.to_pil(duo.render([scene]))[0].save(buf, format="JPEG", quality=100)
    return buf.getvalue()


ROWS = [  # (prompt, jpg_0's scene, jpg_1's scene, label_0)
    # the loser (jpg_1) mirrors the binding: red square on the right, blue circle on the left
    ("a red square to the left of a blue circle", duo.Scene("red", "square", "blue", "circle"),
     duo.Scene("blue", "circle", "red", "square"), 1.0),
    # the loser (jpg_0) draws a triangle where a circle was asked for; "right of" phrasing kept
    ("a green circle to the right of a yellow square", duo.Scene("yellow", "square", "green", "triangle"),
     duo.Scene("yellow", "square", "green", "circle"), 0.0),
    # the loser is right too (lost on a soft score): its caption is the prompt
    ("a purple triangle to the left of an orange circle", duo.Scene("purple", "triangle", "orange", "circle"),
     duo.Scene("purple", "triangle", "orange", "circle", left_r=4.6), 1.0),
]  # fmt: skip


def _pairs(folder):
    rows = []
    for i, (prompt, s0, s1, label_0) in enumerate(ROWS):
        rows.append({
            "are_different": True, "best_image_uid": "", "caption": prompt, "created_at": datetime.datetime(2026, 1, 1),
            "has_label": True, "image_0_uid": f"{i}a", "image_0_url": "", "image_1_uid": f"{i}b", "image_1_url": "",
            "jpg_0": _jpeg(s0), "jpg_1": _jpeg(s1), "label_0": label_0, "label_1": 1.0 - label_0, "model_0": "m",
            "model_1": "m", "ranking_id": i, "user_id": 0, "num_example_per_prompt": 1, "__index_level_0__": i,
        })  # fmt: skip
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pickapic_schema()), folder / "data" / "train-00000.parquet")
    (folder / "provenance.json").write_text(json.dumps({"scorers": {"duofaithfulness": {}}}))
    return folder


def test_duo_caption_writer_captions_the_rejected_images(tmp_path):
    pairs = _pairs(tmp_path / "pairs")
    duo_world = worlds.get("duo")
    out = add_image_captions(pairs, tmp_path / "pairs_dual", duo_world.caption_writer(), name="duo writer")
    table = pq.read_table(out / "data" / "train-00000.parquet")
    assert table.column_names == [*pickapic_schema().names, "caption_0", "caption_1"]
    assert list(zip(table["caption_0"].to_pylist(), table["caption_1"].to_pylist(), strict=True)) == [
        ("a red square to the left of a blue circle", "a blue circle to the left of a red square"),
        ("a green triangle to the right of a yellow square", "a green circle to the right of a yellow square"),
        ("a purple triangle to the left of an orange circle", "a purple triangle to the left of an orange circle"),
    ]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["scorers"] == {"duofaithfulness": {}}
    assert provenance["image_captions"] == {"columns": ["caption_0", "caption_1"], "writer": "duo writer"}

    # DCPO's loader path: winner first, each image with its own caption
    ds = PickapicDataset(PickapicSource(path=str(out), image_caption_columns=("caption_0", "caption_1")))
    assert [ds[i].image_prompts for i in range(len(ds))] == [
        ["a red square to the left of a blue circle", "a blue circle to the left of a red square"],
        ["a green circle to the right of a yellow square", "a green triangle to the right of a yellow square"],
        ["a purple triangle to the left of an orange circle"] * 2,
    ]

    with pytest.raises(LabelError, match="already has a caption_0 / caption_1 column"):
        add_image_captions(out, tmp_path / "twice", duo_world.caption_writer(), name="duo writer")
    with pytest.raises(ValueError, match="the shapes world has no caption writer"):
        worlds.get("shapes").caption_writer()
