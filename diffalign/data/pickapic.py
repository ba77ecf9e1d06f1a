"""Pick-a-Pic v1/v2 preference pairs (Kirstain et al., NeurIPS 2023) as winner-first records.

Schema (dataset card, identical for v1 and v2): ``caption`` string, ``jpg_0``/``jpg_1`` binary JPEG bytes,
``label_0``/``label_1`` float64 with 1/0 = winner/loser and 0.5/0.5 = tie, ``has_label`` and
``are_different`` bool, plus uids, urls, ``model_*``, ``created_at``, ``ranking_id``, ``user_id``,
``num_example_per_prompt``. Only caption, images and labels are required.

Row policy, in this order (each row lands in exactly one bucket of ``LoadStats``):

1. ``has_label`` False -> dropped as unlabeled (``require_label=True``, the default).
2. ``are_different`` False -> dropped (only with ``require_different=True``; PickScore's option).
3. labels outside {0, 0.5, 1}, not summing to 1, or null -> bad row.
4. a 0.5/0.5 tie -> dropped (``ties="drop"``, Diffusion-DPO's filter) or kept with jpg_0 first and
   scores [0.5, 0.5] (``ties="keep"``, what the diffusers DPO scripts do implicitly).
5. ``label_0 == 0`` -> the pair is swapped so the winner comes first (Diffusion-DPO ``train.py``).

Steps 1-5 read the label columns only. Images are decoded lazily, one row at a time; a caption or image
that cannot be used is a bad row: ``on_bad_row="raise"`` raises ``BadRowError`` naming the row and column,
``"skip"`` logs a warning with the row index, counts it in ``stats`` and returns a ``SkippedRow``.

Why ``SkippedRow`` instead of pre-validation: Pick-a-Pic v2 is ~1M rows / 322 GB, so decoding every image
up front is not an option. The map-style dataset keeps one entry per label-valid row and returns a marker
for a row whose image turns out broken; ``collate_groups`` drops markers and carries them (index and
reason) to the main process in ``GroupBatch.skipped``, so the counts survive DataLoader workers.
A batch can therefore come out smaller than requested, or empty when every row in it is broken.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from diffalign.data._source import column_names, open_tabular, require_columns
from diffalign.data.records import (
    BAD_ROW_POLICIES,
    LoadStats,
    PreferenceRecord,
    SkippedRow,
    check_choice,
    decode_image,
    handle_bad_row,
)


TIE_POLICIES = ("drop", "keep")
_VALID_LABELS = (0.0, 0.5, 1.0)


def pickapic_schema() -> Any:
    """The Pick-a-Pic v1/v2 parquet schema: the dataset card's columns and dtypes, in its order."""
    import pyarrow as pa

    return pa.schema(
        [
            ("are_different", pa.bool_()),
            ("best_image_uid", pa.string()),
            ("caption", pa.string()),
            ("created_at", pa.timestamp("ns")),
            ("has_label", pa.bool_()),
            ("image_0_uid", pa.string()),
            ("image_0_url", pa.string()),
            ("image_1_uid", pa.string()),
            ("image_1_url", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
            ("model_0", pa.string()),
            ("model_1", pa.string()),
            ("ranking_id", pa.int64()),
            ("user_id", pa.int64()),
            ("num_example_per_prompt", pa.int64()),
            ("__index_level_0__", pa.int64()),
        ]
    )


@dataclass(frozen=True, kw_only=True)
class PickapicSource:
    """Where and how to read Pick-a-Pic.

    ``path``: a Hub id (e.g. ``pickapic-anonymous/pickapic_v1``; ``yuvalkirstain/pickapic_v2`` is gone),
    a local directory holding ``data/{split}-*.parquet`` (or any parquet files), a parquet file, or a glob.
    """

    path: str
    split: str = "train"
    streaming: bool = False
    ties: str = "drop"
    on_bad_row: str = "skip"
    require_label: bool = True
    require_different: bool = False
    max_rows: int | None = None
    caption_column: str = "caption"
    image_columns: tuple[str, str] = ("jpg_0", "jpg_1")
    label_columns: tuple[str, str] = ("label_0", "label_1")
    has_label_column: str = "has_label"
    are_different_column: str = "are_different"
    cache_dir: str | None = None
    image_caption_columns: tuple[str, str] | None = None  # DCPO: one caption per image (jpg_0's, jpg_1's)

    def __post_init__(self) -> None:
        check_choice("ties policy", self.ties, TIE_POLICIES)
        check_choice("on_bad_row policy", self.on_bad_row, BAD_ROW_POLICIES)
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, got {self.max_rows}")
        if len(self.image_columns) != 2 or len(self.label_columns) != 2:
            raise ValueError("image_columns and label_columns must name exactly two columns each")

    def label_fields(self) -> list[str]:
        fields = list(self.label_columns)
        if self.require_label:
            fields.append(self.has_label_column)
        if self.require_different:
            fields.append(self.are_different_column)
        return fields

    def required_columns(self) -> list[str]:
        return [self.caption_column, *self.image_columns, *self.label_fields(), *(self.image_caption_columns or ())]


@dataclass(frozen=True)
class _Decision:
    """What the label columns say about one row: keep (with image order and scores), drop, or bad."""

    first: int = 0
    scores: tuple[float, float] = (1.0, 0.0)
    drop: str | None = None
    bad: str | None = None


def decide_row(source: PickapicSource, row: dict[str, Any]) -> _Decision:
    """Apply the row policy (module docstring, steps 1-5) to the label fields of one row."""
    if source.require_label:
        has_label = row[source.has_label_column]
        if has_label is None:
            return _Decision(bad=f"column {source.has_label_column!r} is null")
        if not has_label:
            return _Decision(drop="unlabeled")
    if source.require_different:
        different = row[source.are_different_column]
        if different is None:
            return _Decision(bad=f"column {source.are_different_column!r} is null")
        if not different:
            return _Decision(drop="not_different")
    col0, col1 = source.label_columns
    l0, l1 = row[col0], row[col1]
    for name, value in ((col0, l0), (col1, l1)):
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return _Decision(bad=f"column {name!r} has invalid label {value!r}")
    if l0 not in _VALID_LABELS or l1 not in _VALID_LABELS or abs(l0 + l1 - 1.0) > 1e-6:
        return _Decision(bad=f"labels ({col0}={l0}, {col1}={l1}) are not one of 1/0, 0/1, 0.5/0.5")
    if l0 == 0.5:
        if source.ties == "drop":
            return _Decision(drop="tie")
        return _Decision(first=0, scores=(0.5, 0.5))
    return _Decision(first=0 if l0 == 1.0 else 1)


def _count_drop(stats: LoadStats, drop: str) -> None:
    if drop == "tie":
        stats.ties_dropped += 1
    elif drop == "unlabeled":
        stats.unlabeled_dropped += 1
    else:
        stats.not_different_dropped += 1


def build_record(
    source: PickapicSource, name: str, stats: LoadStats, index: int, row: dict[str, Any], decision: _Decision
) -> PreferenceRecord | SkippedRow:
    """Decode caption and both images of a kept row, winner first; a failure goes through the bad-row policy."""
    caption = row[source.caption_column]
    if not isinstance(caption, str):
        return handle_bad_row(
            source.on_bad_row, stats, name, index, f"column {source.caption_column!r} is not a string: {caption!r}"
        )
    images = []
    for column in source.image_columns:
        try:
            images.append(decode_image(row[column]))
        except ValueError as e:
            return handle_bad_row(source.on_bad_row, stats, name, index, f"column {column!r}: {e}", cause=e)
    image_prompts = None
    if source.image_caption_columns is not None:
        image_prompts = [row[column] for column in source.image_caption_columns]
        for column, text in zip(source.image_caption_columns, image_prompts, strict=True):
            if not isinstance(text, str):
                reason = f"column {column!r} is not a string: {text!r}"
                return handle_bad_row(source.on_bad_row, stats, name, index, reason)
    if decision.first == 1:
        images.reverse()
        image_prompts = image_prompts[::-1] if image_prompts is not None else None
    return PreferenceRecord(
        prompt=caption, images=images, scores=list(decision.scores), index=index, image_prompts=image_prompts
    )


class PickapicDataset(Dataset):
    """Map-style Pick-a-Pic: label filtering at construction (label columns only), image decoding per item.

    ``dataset[i]`` returns a ``PreferenceRecord`` or, for a broken row under ``on_bad_row="skip"``, a
    ``SkippedRow``. ``len(dataset)`` counts label-valid rows; ``stats`` holds the counts of this process.
    """

    def __init__(self, source: PickapicSource) -> None:
        if source.streaming:
            raise ValueError("PickapicDataset is map-style; use PickapicIterable (or load_pickapic) for streaming")
        self.source = source
        self.stats = LoadStats()
        ds, self.name = open_tabular(source.path, source.split, streaming=False, cache_dir=source.cache_dir)
        require_columns(column_names(ds), source.required_columns(), self.name)
        num_rows = len(ds) if source.max_rows is None else min(len(ds), source.max_rows)
        self._rows = ds.select_columns(
            [source.caption_column, *source.image_columns, *(source.image_caption_columns or ())]
        )
        self._index, self._first, self._tie = self._filter(ds, num_rows)
        self._known_bad: dict[int, SkippedRow] = {}

    def _filter(self, ds, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fields = self.source.label_fields()
        table = ds.select_columns(fields).with_format("arrow")[0:num_rows]
        columns = {f: table.column(f).to_pylist() for f in fields}
        keep_index, keep_first, keep_tie = [], [], []
        for i in range(num_rows):
            self.stats.rows_read += 1
            decision = decide_row(self.source, {f: columns[f][i] for f in fields})
            if decision.bad is not None:
                handle_bad_row(self.source.on_bad_row, self.stats, self.name, i, decision.bad)
            elif decision.drop is not None:
                _count_drop(self.stats, decision.drop)
            else:
                keep_index.append(i)
                keep_first.append(decision.first)
                keep_tie.append(decision.scores[0] == 0.5)
        return np.asarray(keep_index, np.int64), np.asarray(keep_first, np.int8), np.asarray(keep_tie, bool)

    def __len__(self) -> int:
        return len(self._index)

    def source_index(self, i: int) -> int:
        """Row index in the source split of dataset item ``i``."""
        return int(self._index[i])

    def __getitem__(self, i: int) -> PreferenceRecord | SkippedRow:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for PickapicDataset of length {len(self)}")
        row_index = int(self._index[i])
        if row_index in self._known_bad:
            return self._known_bad[row_index]
        scores = (0.5, 0.5) if self._tie[i] else (1.0, 0.0)
        decision = _Decision(first=int(self._first[i]), scores=scores)
        item = build_record(self.source, self.name, self.stats, row_index, self._rows[row_index], decision)
        if isinstance(item, SkippedRow):
            self._known_bad[row_index] = item
        return item

    def validate(self) -> LoadStats:
        """Decode every kept row once (a full scan, opt-in) and return the stats; raises under ``raise``."""
        for i in range(len(self)):
            self[i]
        return self.stats


class PickapicIterable(IterableDataset):
    """Streaming Pick-a-Pic (``load_dataset(..., streaming=True)``): yields ``PreferenceRecord`` only.

    Broken rows are skipped (logged, counted in ``stats``) or raised, per ``on_bad_row``. Rank ``r`` of
    ``world_size`` owns rows ``index % world_size == r`` whatever the number of DataLoader workers; worker
    ``w`` of ``W`` takes every ``W``-th of its rank's rows. Every shard reads all rows' bytes but decodes only
    its own, and row indices are the true ones (``datasets``' own per-worker file sharding is bypassed on
    purpose). ``stats`` restarts on each pass and counts the rows this shard owns.
    """

    def __init__(self, source: PickapicSource, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.stats = LoadStats()
        ds, self.name = open_tabular(source.path, source.split, streaming=True, cache_dir=source.cache_dir)
        require_columns(column_names(ds), source.required_columns(), self.name)
        self._ds = ds.select_columns(source.required_columns())

    def _owns(self, index: int, workers: int, worker: int) -> bool:
        return index % self.world_size == self.rank and (index // self.world_size) % workers == worker

    def __iter__(self) -> Iterator[PreferenceRecord]:
        self.stats = LoadStats()
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        fields = self.source.label_fields()
        for index, row in enumerate(_rows(self._ds)):
            if self.source.max_rows is not None and index >= self.source.max_rows:
                break
            if not self._owns(index, workers, worker):
                continue
            self.stats.rows_read += 1
            decision = decide_row(self.source, {f: row[f] for f in fields})
            if decision.bad is not None:
                handle_bad_row(self.source.on_bad_row, self.stats, self.name, index, decision.bad)
                continue
            if decision.drop is not None:
                _count_drop(self.stats, decision.drop)
                continue
            item = build_record(self.source, self.name, self.stats, index, row, decision)
            if isinstance(item, PreferenceRecord):
                yield item


def _rows(ds, chunk: int = 32) -> Iterator[dict[str, Any]]:
    """Every row of a streaming split, in order, in every process.

    ``IterableDataset.__iter__`` splits the files between DataLoader workers by itself; ``.iter(batch_size)``
    does not, so each worker sees all rows with their true indices and picks its own.
    """
    for batch in ds.iter(batch_size=chunk):
        names = list(batch)
        for j in range(len(batch[names[0]]) if names else 0):
            yield {name: batch[name][j] for name in names}


def load_pickapic(source: PickapicSource, *, rank: int = 0, world_size: int = 1) -> PickapicDataset | PickapicIterable:
    """``PickapicIterable`` when ``source.streaming`` else ``PickapicDataset`` (rank sharding: use the sampler)."""
    if source.streaming:
        return PickapicIterable(source, rank=rank, world_size=world_size)
    return PickapicDataset(source)
