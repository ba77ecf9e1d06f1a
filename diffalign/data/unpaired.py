"""Unpaired binary feedback (Diffusion-KTO): single images with a desirable / undesirable label.

Two sources, both map-style, both giving one-image ``PreferenceRecord``s with ``scores == [1.0]`` (desirable)
or ``[0.0]`` (undesirable), so the usual transforms and collation apply (a group of K=1):

* ``PickapicUnpaired``: Pick-a-Pic pairs read as unpaired. Every kept pair gives two items, its winner
  (desirable) and its loser (undesirable); the pair loader's row policy decides what is kept (unlabeled rows
  dropped, ties dropped or, with ``ties="keep"``, both images desirable: an image that was not beaten counts
  as a win, as the authors' ``gt_label_wi_l`` policy counts images that both won and lost as wins,
  diffusion-kto ``train_kto_sd_v1.5.py`` L1048-1051). Only the needed image of a row is decoded.
* ``UnpairedTable``: a plain table of (image, caption, label) rows: a local parquet file / directory / glob
  or a Hub id. ``image`` is image bytes, a ``datasets.Image`` cell or a file path (relative to the folder of
  the parquet file that holds the row, e.g. ``<dir>/data`` for ``<dir>/data/train-*.parquet``); ``label`` is a bool or 0/1. Labels are checked at construction (label column only); images when
  the item is read.

Bad rows follow ``on_bad_row`` exactly as in ``pickapic``: ``"raise"`` stops with ``BadRowError`` naming the
row and column, ``"skip"`` logs, counts it in ``stats`` and returns a ``SkippedRow``.

Item indices (``PreferenceRecord.index``) seed each image's augmentation, noise and timestep, so they must
differ between the two images of a Pick-a-Pic row: item ``2 * row + side`` (side 0 = winner). Skipped-row
reports name the source row.

``labels`` (bool array, one per item, no decoding) feeds the label-balanced sampler
(``diffalign.data.balanced.BalancedSampler``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from diffalign import resources
from diffalign.data._source import column_names, is_hub_id, local_files, open_tabular, require_columns
from diffalign.data.pickapic import PickapicDataset
from diffalign.data.records import (
    BAD_ROW_POLICIES,
    LoadStats,
    PreferenceRecord,
    SkippedRow,
    check_choice,
    decode_image,
    handle_bad_row,
)


@dataclass(frozen=True, kw_only=True)
class UnpairedSource:
    """Where and how to read a plain (image, caption, label) table."""

    path: str
    split: str = "train"
    on_bad_row: str = "skip"
    max_rows: int | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_choice("on_bad_row policy", self.on_bad_row, BAD_ROW_POLICIES)
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, got {self.max_rows}")


def parse_label(value: Any) -> bool | None:
    """True / False for a bool or a number equal to 1 / 0; None for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value == 1)
    return None


class UnpairedTable(Dataset):
    """Map-style (image, caption, label) rows; ``dataset[i]`` is a one-image record or a ``SkippedRow``."""

    def __init__(self, source: UnpairedSource) -> None:
        self.source = source
        self.stats = LoadStats()
        ds, self.name = open_tabular(source.path, source.split, streaming=False, cache_dir=source.cache_dir)
        require_columns(column_names(ds), [source.image_column, source.caption_column, source.label_column], self.name)
        num_rows = len(ds) if source.max_rows is None else min(len(ds), source.max_rows)
        raw = ds.select_columns([source.label_column]).with_format("arrow")[0:num_rows]
        keep, labels = [], []
        for i, value in enumerate(raw.column(source.label_column).to_pylist()):
            self.stats.rows_read += 1
            label = parse_label(value)
            if label is None:
                reason = f"column {source.label_column!r} has invalid label {value!r} (want true/false or 1/0)"
                handle_bad_row(source.on_bad_row, self.stats, self.name, i, reason)
                continue
            keep.append(i)
            labels.append(label)
        self._index = np.asarray(keep, np.int64)
        self.labels = np.asarray(labels, bool)
        self._rows = ds.select_columns([source.image_column, source.caption_column])
        files = [] if is_hub_id(resources.resolve(source.path)) else local_files(source.path, source.split)
        self._folders = [os.path.dirname(os.path.abspath(f)) for f, _ in files]
        self._ends = np.cumsum([n for _, n in files])

    def _folder(self, row: int) -> str | None:
        """The folder of the parquet file that holds source row ``row``: relative image paths start there (the
        standard layout keeps ``<dir>/data/train-*.parquet`` and its images side by side). None for a Hub id."""
        if not self._folders:
            return None
        return self._folders[int(np.searchsorted(self._ends, row, side="right"))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> PreferenceRecord | SkippedRow:
        row = int(self._index[i])
        cells = self._rows[row]
        src = self.source
        caption = cells[src.caption_column]
        if not isinstance(caption, str):
            reason = f"column {src.caption_column!r} is not a string: {caption!r}"
            return handle_bad_row(src.on_bad_row, self.stats, self.name, row, reason)
        try:
            image = decode_image(cells[src.image_column], base_dir=self._folder(row))
        except ValueError as e:
            reason = f"column {src.image_column!r}: {e}"
            return handle_bad_row(src.on_bad_row, self.stats, self.name, row, reason, cause=e)
        return PreferenceRecord(prompt=caption, images=[image], scores=[float(self.labels[i])], index=row)


class PickapicUnpaired(Dataset):
    """Pick-a-Pic pairs as 2 unpaired items each: item ``2j`` the winner of kept pair j, ``2j+1`` its loser."""

    def __init__(self, pairs: PickapicDataset) -> None:
        self.pairs = pairs
        self.stats = pairs.stats
        ties = pairs._tie  # the pair loader's label decisions (label columns only, nothing decoded)
        self.labels = np.stack([np.ones(len(ties), bool), ties], axis=1).reshape(-1)

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int) -> PreferenceRecord | SkippedRow:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for PickapicUnpaired of length {len(self)}")
        pair, side = divmod(int(i), 2)
        pairs, src = self.pairs, self.pairs.source
        row = pairs.source_index(pair)
        cells = pairs._rows[row]
        caption = cells[src.caption_column]
        if not isinstance(caption, str):
            reason = f"column {src.caption_column!r} is not a string: {caption!r}"
            return handle_bad_row(src.on_bad_row, self.stats, pairs.name, row, reason)
        column = src.image_columns[int(pairs._first[pair]) ^ side]  # winner first: side 0 is the preferred image
        try:
            image = decode_image(cells[column])
        except ValueError as e:
            return handle_bad_row(src.on_bad_row, self.stats, pairs.name, row, f"column {column!r}: {e}", cause=e)
        return PreferenceRecord(prompt=caption, images=[image], scores=[float(self.labels[i])], index=2 * row + side)


def unpaired_records(cfg: Any) -> UnpairedTable | PickapicUnpaired:
    """The unpaired dataset for a ``data`` config section: ``format: pickapic`` (pairs read as unpaired) or
    ``format: unpaired`` (a plain image / caption / label table)."""
    if cfg.streaming:
        raise ValueError("unpaired objectives read map-style data; set data.streaming=false")
    if cfg.format == "pickapic":
        from diffalign.data.pickapic import PickapicSource

        source = PickapicSource(
            path=cfg.path, split=cfg.split, ties=cfg.ties, on_bad_row=cfg.on_bad_row, max_rows=cfg.max_rows
        )
        return PickapicUnpaired(PickapicDataset(source))
    if cfg.format == "unpaired":
        return UnpairedTable(
            UnpairedSource(path=cfg.path, split=cfg.split, on_bad_row=cfg.on_bad_row, max_rows=cfg.max_rows)
        )
    raise ValueError(f"data.format={cfg.format!r} cannot be read as unpaired images; use 'pickapic' or 'unpaired'")
