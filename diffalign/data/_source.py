"""Find and open a tabular data source: a Hub dataset id, a local directory of parquet files, or a glob.

Local files are read with ``datasets.load_dataset("parquet", data_files=...)``; a Hub id with
``load_dataset(id)``. The Hub ids of Pick-a-Pic have moved (``yuvalkirstain/pickapic_v2`` is gone since
2025), so the id is always configurable and a failed Hub load says what to try instead.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence

import datasets

from diffalign import resources
from diffalign.errors import UserError


logger = logging.getLogger("diffalign.data")

_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "dev")


class DataSourceError(UserError, RuntimeError):
    """A data source cannot be opened: names the source and what was tried."""


def is_hub_id(path: str) -> bool:
    """True when ``path`` is not a local path or glob and looks like ``owner/name``."""
    if _GLOB_CHARS.search(path) or os.path.exists(path):
        return False
    if path.startswith(("/", ".", "~")) or path.endswith((".parquet", ".jsonl", ".json")):
        return False
    return bool(_HUB_ID.match(path))


def _split_files_in_dir(root: str, split: str) -> list[str]:
    patterns = (
        f"data/{split}-*.parquet",
        f"data/{split}/*.parquet",
        f"**/{split}-*.parquet",
        f"**/{split}/**/*.parquet",
    )
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
        if files:
            return files
    files = sorted(glob.glob(os.path.join(root, "**/*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no parquet files under directory {root!r}")
    other_splits = [f for f in files if _looks_like_split_file(f, root)]
    if other_splits:
        names = ", ".join(os.path.relpath(f, root) for f in other_splits[:6])
        raise FileNotFoundError(f"no parquet files for split {split!r} under {root!r}; found other splits: {names}")
    return files


def _looks_like_split_file(path: str, root: str) -> bool:
    parts = os.path.relpath(path, root).replace(os.sep, "/").split("/")
    stem = parts[-1].lower()
    return any(stem.startswith((f"{s}-", f"{s}.")) or s in parts[:-1] for s in _SPLIT_NAMES)


def resolve_parquet_files(path: str, split: str) -> list[str]:
    """Local parquet files for ``split``: ``path`` is a parquet file, a directory or a glob.

    A directory is searched for ``data/{split}-*.parquet`` (the Hub layout, e.g.
    ``data/train-00000-of-00387-<hash>.parquet``), then ``**/{split}-*.parquet`` and ``**/{split}/**``,
    and finally every ``**/*.parquet`` when no file is named after any split.
    """
    expanded = os.path.expanduser(path)
    if _GLOB_CHARS.search(expanded):
        files = sorted(glob.glob(expanded, recursive=True))
        if not files:
            raise FileNotFoundError(f"parquet glob {path!r} matches no files")
        return files
    if os.path.isdir(expanded):
        return _split_files_in_dir(expanded, split)
    if os.path.isfile(expanded):
        return [expanded]
    raise FileNotFoundError(f"data path {path!r} does not exist (not a file, directory, glob or Hub id)")


def describe_files(files: Sequence[str]) -> str:
    if len(files) == 1:
        return files[0]
    return f"{files[0]} (+{len(files) - 1} more files)"


def open_tabular(
    path: str, split: str, *, streaming: bool = False, cache_dir: str | None = None
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """Open ``path`` as a ``datasets`` split; returns the dataset and a description for error messages.

    Image-typed columns (``datasets.Image``) are switched to ``decode=False`` so rows carry raw bytes and
    the loaders decide what a broken image does.
    """
    path = resources.resolve(path)
    if is_hub_id(path):
        ds = _load_hub(path, split, streaming=streaming, cache_dir=cache_dir)
        name = f"{path} (split {split!r})"
    else:
        files = [f for f, _ in local_files(path, split)]
        logger.info("reading %d parquet file(s) for split %r: %s", len(files), split, describe_files(files))
        ds = datasets.load_dataset(
            "parquet", data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
        )
        name = describe_files(files)
    return _without_image_decoding(ds), name


def local_files(path: str, split: str) -> list[tuple[str, int]]:
    """``(file, row count)`` of the local parquet files ``open_tabular`` reads for ``split``, in the order their rows
    come (0-row files left out: ``datasets`` fails on them). Row ``i`` of the split is in the first file whose
    cumulative count exceeds ``i``: what a path relative to "the parquet's folder" is resolved against."""
    return _with_rows(resolve_parquet_files(resources.resolve(path), split), split)


def _with_rows(files: Sequence[str], split: str) -> list[tuple[str, int]]:
    """The files that hold rows, with their counts; none at all is a clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = {}
    for f in files:
        try:
            counts[f] = pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataSourceError(f"{f}: not a readable parquet file: {e}") from e
    empty = [f for f in files if counts[f] == 0]
    if len(empty) == len(files):
        raise DataSourceError(f"{describe_files(files)}: 0 rows for split {split!r}; there is nothing to train on")
    if empty:
        logger.warning("ignoring %d parquet file(s) with 0 rows: %s", len(empty), describe_files(empty))
    return [(f, counts[f]) for f in files if counts[f] > 0]


def _load_hub(
    path: str, split: str, *, streaming: bool, cache_dir: str | None
) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        hint = (
            " Offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), so only locally cached datasets load."
            if offline
            else ""
        )
        raise DataSourceError(
            f"cannot load Hub dataset {path!r} split {split!r}: {type(e).__name__}: {e}.{hint} "
            "The original Pick-a-Pic ids (yuvalkirstain/pickapic_v1, _v2) were removed from the Hub; pass a "
            "mirror id (e.g. pickapic-anonymous/pickapic_v1) or a local directory / glob of parquet files."
        ) from e


def _without_image_decoding(ds: datasets.Dataset | datasets.IterableDataset):
    features = ds.features
    if features is None:
        return ds
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image) and feature.feature.decode:
            raw = datasets.Image(decode=False)
            if isinstance(feature, datasets.LargeList):
                ds = ds.cast_column(name, datasets.LargeList(raw))
            elif isinstance(feature, (datasets.List, datasets.Sequence)):
                ds = ds.cast_column(name, type(feature)(raw, length=getattr(feature, "length", -1)))
    return ds


def column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    names = ds.column_names
    if names is None:  # a streaming source with unknown features: peek at the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return list(names)


def require_columns(present: Sequence[str], required: Sequence[str], source: str) -> None:
    """Raise ``ValueError`` naming the first missing column, the source and the columns it has."""
    for column in required:
        if column not in present:
            raise ValueError(f"{source}: required column {column!r} is missing; columns present: {', '.join(present)}")
