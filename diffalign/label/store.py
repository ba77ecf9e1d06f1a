"""Crash-safe storage of a labelling run: an append-only record log, and the datasets published from it.

Layout of ``<out>``::

    label.json                    the run's settings (generation fingerprint + derived settings), written atomically
    {ranked,pairs}/provenance.json  scorers, ranking, prompts, generators (``diffalign.data.provenance``)
    records.jsonl                 the log: one JSON line per finished prompt, appended and fsync'd (source of truth)
    ranked/images/IIIIII_KK.png   the K images of prompt IIIIII (written before the prompt's log line)
    ranked/train.jsonl            ranked lists, one line per prompt (``RankedDataset``), rewritten atomically
    pairs/data/train-SSSSS.parquet  Pick-a-Pic-schema pairs from prompts [S * shard_size, (S + 1) * shard_size)
                                  of the log, each shard written atomically

Why a kill at any point leaves no corrupt or duplicated row:

* every file other than the log is written to a dot-named temporary in the same folder (which no loader glob
  matches), fsync'd, then ``os.replace``d over its final name: a reader sees the old file or the new one;
* a prompt is done exactly when its log line is complete. Its images are on disk before that line is written; a
  kill mid-append leaves a last line without its newline, which the next run cuts off (that prompt is redone,
  its images overwritten with the same bytes);
* shard ``S`` holds the pairs of a fixed range of log positions and is only ever replaced as a whole, so no
  record can be in two shards. The record range and the settings are stored in the shard's parquet metadata;
  a shard whose stored description differs from what the log now implies (a kill before it was written, the
  final partial shard of an extended run, a new ranking rule) is rewritten on the next run.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.data import provenance
from diffalign.data.pickapic import pickapic_schema
from diffalign.fileio import fsync_dir, temp_path, write_atomic
from diffalign.label.config import LabelError
from diffalign.label.ranking import pairs_per_prompt, ranking_scores, select_pairs


LOG_FILE = "records.jsonl"
SETTINGS_FILE = "label.json"
RANKED_DIR = "ranked"
IMAGES_DIR = "images"
RANKED_FILE = "train.jsonl"
PAIRS_DATA = Path("pairs") / "data"
SHARD_META_KEY = b"diffalign_label"
UID_NAMESPACE = uuid.UUID("6b1f4f0e-6c1a-4a43-9a43-2f7d9a1c0d11")
ROWS_PER_WRITE = 64


# ---- atomic files -------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_provenance(out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``provenance.json`` (``diffalign.data.provenance``) into ``pairs/`` and ``ranked/``: what ranked the
    labels, from which prompts and generators, so a training config can check it trains on the labels it expects
    (``data.labelled_by``), also on a copy of either folder. ``settings``: what ``label.json`` holds."""
    generation, derived = settings["generation"], settings["derived"]
    record = {
        "scorers": sorted({s["name"] for s in generation["scorers"].values()}),
        "ranking": derived["ranking"],
        "prompts": {k: settings["prompts"].get(k) for k in ("source", "count", "sha256")},
        "generators": [{k: g.get(k) for k in ("name", "family", "path")} for g in generation["generators"]],
        "label_run": str(out.resolve()),
    }
    for folder in (out / RANKED_DIR, out / PAIRS_DATA.parent):
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / provenance.FILE, record)
    return record


def remove_stale_temps(folder: Path) -> None:
    """Delete temporaries left by a killed run (they are never read)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


# ---- the record log -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One finished prompt: its K images (paths relative to ``ranked/``), their generators, seeds, raw scores."""

    prompt_index: int
    prompt_id: str
    prompt: str
    created_at: str
    images: list[str]
    generators: list[str]
    seeds: list[int]
    raw_scores: dict[str, list[float]]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Record:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise LabelError(f"{where}: not a labelling record ({e})") from e


class RecordLog:
    """``records.jsonl``: read (cutting off a torn last line) and append whole lines with fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, *, repair: bool = True) -> list[Record]:
        """All complete records, in log order. A last line without its newline (a kill mid-append) is dropped,
        and with ``repair`` cut off the file; any other unreadable line is an error naming it."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data) and repair:
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
        records = []
        for n, line in enumerate(data[:cut].split(b"\n")[:-1], start=1):
            where = f"{self.path} line {n}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LabelError(f"{where}: corrupt record ({e}); the log is only ever appended to") from e
            records.append(Record.from_dict(obj, where))
        return records

    def append(self, record: Record) -> None:
        line = (record.to_json() + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def image_name(prompt_index: int, slot: int) -> str:
    return f"{IMAGES_DIR}/{prompt_index:06d}_{slot:02d}.png"


def save_png_atomic(image: Any, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue(), sync_dir=False)


# ---- ranked lists -------------------------------------------------------------------------------------------


def ranked_row(record: Record, ranking: Any) -> dict[str, Any]:
    """One ``ranked/train.jsonl`` line: ``prompt``/``images``/``scores`` for ``RankedDataset`` plus provenance."""
    return {
        "prompt": record.prompt,
        "images": record.images,
        "scores": ranking_scores(record.raw_scores, ranking),
        "models": record.generators,
        "seeds": record.seeds,
        "raw_scores": record.raw_scores,
        "prompt_id": record.prompt_id,
        "prompt_index": record.prompt_index,
    }


def write_ranked(out: Path, records: Sequence[Record], ranking: Any) -> Path:
    path = out / RANKED_DIR / RANKED_FILE
    lines = [json.dumps(ranked_row(r, ranking), ensure_ascii=False, allow_nan=False) for r in records]
    write_atomic(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    return path


# ---- pair shards --------------------------------------------------------------------------------------------


def image_uid(record: Record, slot: int) -> str:
    """A deterministic UUID per image (Pick-a-Pic uids are UUIDs): generator, seed and prompt."""
    return str(uuid.uuid5(UID_NAMESPACE, f"{record.generators[slot]}\n{record.seeds[slot]}\n{record.prompt}"))


def shard_path(out: Path, shard: int) -> Path:
    return out / PAIRS_DATA / f"train-{shard:05d}.parquet"


def shard_description(records: Sequence[Record], first: int, derived: Mapping[str, Any]) -> dict[str, Any]:
    """What a shard must contain: its log range, the records' prompt indices (digested) and the derived settings."""
    h = hashlib.sha256(json.dumps([r.prompt_index for r in records]).encode())
    h.update(json.dumps(derived, sort_keys=True).encode())
    return {"first": first, "count": len(records), "digest": h.hexdigest()}


def stored_description(path: Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # an unreadable shard is rewritten
        return None
    raw = meta.get(SHARD_META_KEY)
    return json.loads(raw) if raw else None


def _jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Images:
    """Decoded images and their JPEG bytes for one record (each image read from its PNG once)."""

    def __init__(self, out: Path, record: Record, quality: int) -> None:
        self.root, self.record, self.quality = out / RANKED_DIR, record, quality
        self._pixels: dict[int, Any] = {}
        self._jpeg: dict[int, bytes] = {}

    def pixels(self, slot: int) -> Any:
        from PIL import Image

        if slot not in self._pixels:
            path = self.root / self.record.images[slot]
            try:
                with Image.open(path) as im:
                    self._pixels[slot] = im.convert("RGB")
            except (OSError, ValueError) as e:
                raise LabelError(f"prompt {self.record.prompt_index}: image {path} unreadable ({e})") from e
        return self._pixels[slot]

    def jpeg(self, slot: int) -> bytes:
        if slot not in self._jpeg:
            self._jpeg[slot] = _jpeg(self.pixels(slot), self.quality)
        return self._jpeg[slot]

    def different(self, a: int, b: int) -> bool:
        pa, pb = self.pixels(a), self.pixels(b)
        return pa.size != pb.size or pa.tobytes() != pb.tobytes()


def pair_rows(out: Path, record: Record, position: int, k: int, derived: Mapping[str, Any]) -> Iterator[dict]:
    """The Pick-a-Pic rows of one record (``position`` = its place in the log, for ``__index_level_0__``)."""
    from diffalign.label.config import RankingConfig

    ranking = RankingConfig(**derived["ranking"])
    scores = ranking_scores(record.raw_scores, ranking)
    pairs = select_pairs(scores, derived["pairs"], ranking.tie_tolerance)
    per_prompt = pairs_per_prompt(k, derived["pairs"])
    images = _Images(out, record, derived["jpeg_quality"])
    created = datetime.datetime.fromisoformat(record.created_at).astimezone(datetime.timezone.utc).replace(tzinfo=None)
    for j, (a, b, label_a, label_b) in enumerate(pairs):
        uid_a, uid_b = image_uid(record, a), image_uid(record, b)
        yield {
            "are_different": images.different(a, b),
            "best_image_uid": uid_a if label_a == 1.0 else uid_b if label_b == 1.0 else "",
            "caption": record.prompt,
            "created_at": created,
            "has_label": True,
            "image_0_uid": uid_a,
            "image_0_url": f"{RANKED_DIR}/{record.images[a]}",
            "image_1_uid": uid_b,
            "image_1_url": f"{RANKED_DIR}/{record.images[b]}",
            "jpg_0": images.jpeg(a),
            "jpg_1": images.jpeg(b),
            "label_0": label_a,
            "label_1": label_b,
            "model_0": record.generators[a],
            "model_1": record.generators[b],
            "ranking_id": record.prompt_index,
            "user_id": 0,
            "num_example_per_prompt": per_prompt,
            "__index_level_0__": position * per_prompt + j,
        }


def write_shard(
    out: Path, shard: int, records: Sequence[Record], first: int, k: int, derived: Mapping[str, Any]
) -> tuple[Path, int]:
    """Write shard ``shard`` (records at log positions ``first``, ``first + 1``, ...) atomically; returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = shard_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = shard_description(records, first, derived)
    schema = pickapic_schema().with_metadata({SHARD_META_KEY: json.dumps(description).encode()})
    tmp = temp_path(path)
    rows: list[dict] = []
    total = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for offset, record in enumerate(records):
            rows.extend(pair_rows(out, record, first + offset, k, derived))
            if len(rows) >= ROWS_PER_WRITE or offset == len(records) - 1:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                total += len(rows)
                rows = []
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path, total


def sync_shards(
    out: Path, records: Sequence[Record], shard_size: int, k: int, derived: Mapping[str, Any], *, final: bool
) -> list[int]:
    """Make every shard the log implies match it: all full shards, and the last partial one when ``final``.

    Returns the shard numbers written. Shards already matching (parquet metadata) are left alone.
    """
    full, rest = divmod(len(records), shard_size)
    wanted = full + (1 if final and rest else 0)
    written = []
    for shard in range(wanted):
        first = shard * shard_size
        chunk = records[first : first + shard_size]
        if stored_description(shard_path(out, shard)) != shard_description(chunk, first, derived):
            write_shard(out, shard, chunk, first, k, derived)
            written.append(shard)
    return written


def existing_shards(out: Path) -> list[int]:
    folder = out / PAIRS_DATA
    found = []
    for path in folder.glob("train-*.parquet") if folder.is_dir() else []:
        stem = path.stem.removeprefix("train-")
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)
