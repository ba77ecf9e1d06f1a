"""Per-image captions for a labelled pair dataset: DCPO's second caption, the one that describes the rejected image.

DCPO (Saeidi et al. 2025, arXiv 2502.06023) conditions each image of a pair on its own caption; its Pick-Double
Caption dataset adds ``caption_0`` / ``caption_1`` (one per image) to Pick-a-Pic (sahsaeedi/DCPO-T2I@62335bb
``src/dcpo_trainer.py`` L660-676 reads them as ``--caption_0`` / ``--caption_1``). ``add_image_captions`` writes
that dataset from a ``diffalign label`` pair folder and a caption writer ``describe(images, prompts) -> texts``
(for the duo world: ``diffalign.toy.duo_reward.describe``, what the detectors see):

* the preferred image (``label == 1``) keeps the prompt it was generated for (``caption``): it shows it;
* every other image (the rejected one, and both of a tie) gets ``describe``'s text: what it actually shows.

A loser that is in fact right gets its prompt back from the writer, so its pair trains like Diffusion-DPO. Output:
``<out>/data/*.parquet`` with the input's columns plus ``caption_0`` / ``caption_1`` (string), row for row, and the
input's ``provenance.json`` with ``image_captions`` added (so ``data.labelled_by`` checks still pass). The folder is
assembled aside and swapped in whole (``fileio.replace_dir``). Train with ``data.caption_columns: [caption_0,
caption_1]`` (``loss.name: dcpo``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffalign.data import provenance
from diffalign.fileio import replace_dir
from diffalign.label.config import LabelError


COLUMNS = ("caption_0", "caption_1")
Describe = Callable[[Sequence[Any], Sequence[str]], list[str]]


def _image(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def image_captions(rows: Sequence[dict[str, Any]], describe: Describe) -> list[tuple[str, str]]:
    """``(caption_0, caption_1)`` of each Pick-a-Pic row (the module docstring's rule); ``describe`` runs once."""
    jobs: list[tuple[int, int]] = []  # (row, image) pairs that need a description
    out = [[row["caption"], row["caption"]] for row in rows]
    for i, row in enumerate(rows):
        for j in (0, 1):
            if row[f"label_{j}"] != 1.0:
                jobs.append((i, j))
    texts = describe([_image(rows[i][f"jpg_{j}"]) for i, j in jobs], [rows[i]["caption"] for i, _ in jobs])
    if len(texts) != len(jobs):
        raise LabelError(f"the caption writer returned {len(texts)} captions for {len(jobs)} images")
    for (i, j), text in zip(jobs, texts, strict=True):
        out[i][j] = text
    return [(a, b) for a, b in out]


def add_image_captions(pairs_dir: str | Path, out_dir: str | Path, describe: Describe, *, name: str) -> Path:
    """Write ``out_dir`` = the pairs of ``pairs_dir`` (``diffalign label``'s ``pairs/``) + ``caption_0`` /
    ``caption_1``; ``name`` (e.g. ``"duo_reward.describe"``) is recorded in the provenance. Returns ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(pairs_dir)
    shards = sorted((src / "data").glob("*.parquet"))
    if not shards:
        raise LabelError(f"no pair shards in {src / 'data'} (expected a `diffalign label` pairs folder)")
    record = provenance.read(str(src))

    def write(tmp: Path) -> None:
        (tmp / "data").mkdir(parents=True)
        for shard in shards:
            table = pq.read_table(shard)
            if any(c in table.column_names for c in COLUMNS):
                raise LabelError(f"{shard} already has a {' / '.join(COLUMNS)} column")
            captions = image_captions(table.to_pylist(), describe)
            for k, column in enumerate(COLUMNS):
                table = table.append_column(pa.field(column, pa.string()), pa.array([c[k] for c in captions]))
            pq.write_table(table, tmp / "data" / shard.name)
        if record is not None:
            text = json.dumps(record | {"image_captions": {"columns": list(COLUMNS), "writer": name}}, indent=2)
            (tmp / provenance.FILE).write_text(text + "\n", encoding="utf-8")

    return replace_dir(out_dir, write)
