"""Ranked lists for RankDPO (Karthik et al., arXiv 2410.18013): K images and K scores per prompt.

Sources:

- JSONL, one row per line: ``{"prompt": str, "images": ["rel/path.png", ...], "scores": [float, ...]}``
  with image paths relative to the JSONL file (absolute paths also work). ``path`` is the ``.jsonl`` file,
  or a directory holding ``{split}.jsonl``.
- parquet (file, directory or glob) or a Hub id: columns ``prompt`` (string), ``images``
  (list of binary, or list of ``datasets.Image``) and ``scores`` (list of float).

Records come out sorted by score, highest first (a stable sort: equal scores keep their file order), with
the scores kept so the loss can weight pairs (RankDPO Eq. 6). Row metadata (prompt, scores, list lengths)
is checked at construction; images are read lazily per item. Bad rows follow ``on_bad_row`` exactly as in
``pickapic``: unparsable JSON, a non-string prompt, non-finite scores, fewer than ``min_images`` images or
a K mismatch between images and scores, and (when the item is read) a missing or undecodable image file,
which names the row and the path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
from torch.utils.data import Dataset

from diffalign.data._source import column_names, is_hub_id, open_tabular, require_columns
from diffalign.data.records import (
    BAD_ROW_POLICIES,
    LoadStats,
    PreferenceRecord,
    SkippedRow,
    check_choice,
    decode_image,
    handle_bad_row,
    is_finite_number,
)


@dataclass(frozen=True, kw_only=True)
class RankedSource:
    """Where and how to read ranked lists; ``path`` is a ``.jsonl`` file, parquet file/dir/glob or Hub id."""

    path: str
    split: str = "train"
    on_bad_row: str = "skip"
    max_rows: int | None = None
    min_images: int = 2
    prompt_column: str = "prompt"
    images_column: str = "images"
    scores_column: str = "scores"
    source_image_column: str | None = None  # editing rows: the JSONL key of the source image (path)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_choice("on_bad_row policy", self.on_bad_row, BAD_ROW_POLICIES)
        if self.min_images < 2:
            raise ValueError(f"min_images must be >= 2 (a ranking needs two images), got {self.min_images}")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, got {self.max_rows}")


@dataclass(frozen=True)
class _Entry:
    """Validated metadata of one row: prompt, sort order (best first) and sorted scores."""

    index: int
    prompt: str
    order: tuple[int, ...]
    scores: tuple[float, ...]
    image_refs: tuple[str, ...] | None = None  # JSONL paths; None when images live in the table
    source_ref: str | None = None  # editing rows: the source image's JSONL path


def jsonl_path(path: str, split: str) -> str | None:
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded) and expanded.endswith((".jsonl", ".json")):
        return expanded
    candidate = os.path.join(expanded, f"{split}.jsonl")
    if os.path.isdir(expanded) and os.path.isfile(candidate):
        return candidate
    return None


class RankedDataset(Dataset):
    """Map-style ranked lists: ``dataset[i]`` is a ``PreferenceRecord`` (best first) or a ``SkippedRow``."""

    def __init__(self, source: RankedSource) -> None:
        self.source = source
        self.stats = LoadStats()
        self._known_bad: dict[int, SkippedRow] = {}
        self._table = None
        self._base_dir: str | None = None
        jsonl = None if is_hub_id(source.path) else jsonl_path(source.path, source.split)
        if jsonl is not None:
            self.name = jsonl
            self._base_dir = os.path.dirname(os.path.abspath(jsonl))
            self._entries = self._read_jsonl(jsonl)
        else:
            self._entries = self._read_table()

    def _check(self, index: int, prompt: Any, num_images: int, scores: Any) -> _Entry | SkippedRow:
        policy, src = self.source.on_bad_row, self.source
        if not isinstance(prompt, str):
            return handle_bad_row(policy, self.stats, self.name, index, f"{src.prompt_column!r} is not a string")
        if not isinstance(scores, (list, tuple)) or not all(is_finite_number(s) for s in scores):
            reason = f"{src.scores_column!r} must be a list of finite numbers, got {scores!r}"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        if num_images != len(scores):
            reason = f"{num_images} images but {len(scores)} scores (K mismatch)"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        if num_images < src.min_images:
            reason = f"{num_images} images; a ranked list needs at least {src.min_images}"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        order = tuple(sorted(range(num_images), key=lambda k: -float(scores[k])))
        return _Entry(index, prompt, order, tuple(float(scores[k]) for k in order))

    def _read_jsonl(self, path: str) -> list[_Entry]:
        entries = []
        with open(path, encoding="utf-8-sig") as f:
            for index, line in enumerate(f):
                if self.source.max_rows is not None and self.stats.rows_read >= self.source.max_rows:
                    break
                if not line.strip():
                    continue
                self.stats.rows_read += 1
                entry = self._parse_json_line(index, line)
                if isinstance(entry, _Entry):
                    entries.append(entry)
        return entries

    def _parse_json_line(self, index: int, line: str) -> _Entry | SkippedRow:
        policy = self.source.on_bad_row
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return handle_bad_row(policy, self.stats, self.name, index, f"line {index + 1}: invalid JSON ({e})")
        if not isinstance(row, dict):
            return handle_bad_row(policy, self.stats, self.name, index, f"line {index + 1}: not a JSON object")
        src = self.source
        wanted = (src.prompt_column, src.images_column, src.scores_column, *filter(None, [src.source_image_column]))
        missing = [c for c in wanted if c not in row]
        if missing:
            reason = f"line {index + 1}: missing key {missing[0]!r}; keys present: {', '.join(row)}"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        images = row[self.source.images_column]
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            reason = f"{self.source.images_column!r} must be a list of image paths"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        source_ref = row[src.source_image_column] if src.source_image_column else None
        if src.source_image_column and not (isinstance(source_ref, str) and source_ref):
            reason = f"line {index + 1}: {src.source_image_column!r} must be the source image's path"
            return handle_bad_row(policy, self.stats, self.name, index, reason)
        entry = self._check(index, row[self.source.prompt_column], len(images), row[self.source.scores_column])
        if isinstance(entry, _Entry):
            entry = _Entry(entry.index, entry.prompt, entry.order, entry.scores, tuple(images), source_ref)
        return entry

    def _read_table(self) -> list[_Entry]:
        src = self.source
        ds, self.name = open_tabular(src.path, src.split, streaming=False, cache_dir=src.cache_dir)
        if src.source_image_column:
            raise ValueError(
                f"{self.name}: data.source_image_column reads ranked JSONL rows (prompt, source image path, images, "
                "scores); convert this table to JSONL"
            )
        require_columns(column_names(ds), [src.prompt_column, src.images_column, src.scores_column], self.name)
        num_rows = len(ds) if src.max_rows is None else min(len(ds), src.max_rows)
        self._table = ds.select_columns([src.images_column])
        meta = ds.select_columns([src.prompt_column, src.images_column, src.scores_column]).with_format("arrow")
        meta = meta[0:num_rows]
        prompts = meta.column(src.prompt_column).to_pylist()
        scores = meta.column(src.scores_column).to_pylist()
        lengths = pc.list_value_length(meta.column(src.images_column)).to_pylist()
        entries = []
        for index in range(num_rows):
            self.stats.rows_read += 1
            entry = self._check(index, prompts[index], lengths[index] or 0, scores[index])
            if isinstance(entry, _Entry):
                entries.append(entry)
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> PreferenceRecord | SkippedRow:
        return self.record(i)

    def record(self, i: int, ranks: tuple[int, ...] | None = None) -> PreferenceRecord | SkippedRow:
        """Item ``i`` with only the images at ``ranks`` (positions in the best-first order; None: all)."""
        entry = self._entries[i]
        if entry.index in self._known_bad:
            return self._known_bad[entry.index]
        cells = (
            entry.image_refs if entry.image_refs is not None else self._table[entry.index][self.source.images_column]
        )
        ranks = tuple(range(len(entry.order))) if ranks is None else ranks
        images = []
        for k in (entry.order[r] for r in ranks):
            try:
                images.append(self.decode(cells[k], self._base_dir))
            except ValueError as e:
                where = f"{self.source.images_column}[{k}]"
                if entry.image_refs is not None:
                    where += f" ({entry.image_refs[k]})"
                item = handle_bad_row(
                    self.source.on_bad_row, self.stats, self.name, entry.index, f"{where}: {e}", cause=e
                )
                self._known_bad[entry.index] = item
                return item
        scores = [entry.scores[r] for r in ranks]
        source = None
        if entry.source_ref is not None:
            try:
                source = self.decode(entry.source_ref, self._base_dir)
            except ValueError as e:
                where = f"{self.source.source_image_column} ({entry.source_ref})"
                item = handle_bad_row(
                    self.source.on_bad_row, self.stats, self.name, entry.index, f"{where}: {e}", cause=e
                )
                self._known_bad[entry.index] = item
                return item
        return PreferenceRecord(prompt=entry.prompt, images=images, scores=scores, index=entry.index, source=source)

    def decode(self, cell: Any, base_dir: str | None) -> Any:
        """One image cell (a path relative to ``base_dir``, the JSONL's folder) -> an RGB PIL image
        (``records.decode_image``; ``data.video`` decodes videos)."""
        return decode_image(cell, base_dir=base_dir)

    def validate(self) -> LoadStats:
        """Read every image once (opt-in full scan) and return the stats; raises under ``on_bad_row="raise"``."""
        for i in range(len(self)):
            self[i]
        return self.stats
