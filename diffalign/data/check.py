"""Cheap checks of a ``data`` config section before anything heavy loads: the source exists, its labels are the ones
the config was written for (``data.labelled_by``, ``data.provenance``), and a local parquet source has the columns
its format reads (from the parquet schema only: no rows are read, no image decoded).

``problems(cfg.data)`` returns one-line messages naming ``data.path``, the file and the fix; ``[]`` when the
source looks usable. Hub ids are not checked here (``open_tabular`` reports them in one line when they fail).
"""

from __future__ import annotations

from typing import Any

from diffalign import resources
from diffalign.data import provenance
from diffalign.data._source import is_hub_id, resolve_parquet_files


def required_columns(cfg: Any) -> list[str]:
    """The columns ``cfg.format`` reads from each row (Pick-a-Pic pairs, ranked lists or unpaired images)."""
    if cfg.format == "pickapic":
        from diffalign.data.loader import record_source

        return record_source(cfg).required_columns()
    if cfg.format in ("ranked", "scored_pairs", "video"):
        from diffalign.data.ranked import RankedSource

        s = RankedSource(path=cfg.path)
        images = "videos" if cfg.format == "video" else s.images_column  # data.video.VIDEOS_COLUMN
        return [s.prompt_column, images, s.scores_column]
    if cfg.format == "unpaired":
        from diffalign.data.unpaired import UnpairedSource

        s = UnpairedSource(path=cfg.path)
        return [s.image_column, s.caption_column, s.label_column]
    return []


def problems(cfg: Any) -> list[str]:
    """Missing source, or missing columns of its first parquet file with rows, as one-line messages."""
    try:
        path = resources.resolve(cfg.path)
    except FileNotFoundError as e:
        return [f"data.path: {e}"]
    if is_hub_id(path):
        return []
    if cfg.format in ("ranked", "scored_pairs", "video"):
        from diffalign.data.ranked import jsonl_path

        if jsonl_path(path, cfg.split):  # a JSONL list file (RankedDataset reads it; no parquet schema)
            return []
        if path.endswith((".jsonl", ".json")):
            return [f"data.path={cfg.path!r}: no such file"]
    try:
        files = resolve_parquet_files(path, cfg.split)
    except (FileNotFoundError, ValueError) as e:
        return [f"data.path: {e}"]
    try:
        provenance.check_labelled_by(cfg.path, getattr(cfg, "labelled_by", None))
    except provenance.ProvenanceError as e:
        return [str(e)]
    return _column_problems(files, required_columns(cfg), cfg)


def _column_problems(files: list[str], required: list[str], cfg: Any) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            return [f"data.path={cfg.path!r}: {f} is not a readable parquet file ({e})"]
        if meta.metadata.num_rows == 0:
            continue
        present = meta.schema_arrow.names
        missing = [c for c in required if c not in present]
        if missing:
            return [
                f"data.path={cfg.path!r}: {f} has no column {', '.join(map(repr, missing))} (data.format="
                f"{cfg.format} reads {', '.join(required)}; it has {', '.join(present)})"
            ]
        return []
    return []
