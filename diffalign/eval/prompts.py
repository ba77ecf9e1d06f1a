"""Evaluation prompt sets from local files, shipped lists or hub datasets.

``load_prompts(source)`` returns ``PromptRecord``s in file order; ``prompt_id`` is the 5-digit position in the set
(``"00012"``), or ``<style>/<position>`` for an HPSv2 benchmark folder. Formats, chosen by suffix:

========================  =====================================================================================
``.txt``                  one prompt per line; blank lines are skipped (``assets/prompts/*.txt``, T2I-CompBench)
``.jsonl``                one JSON object per line with a ``prompt`` or ``caption`` key; other keys kept as
                          ``meta`` (GenEval ``evaluation_metadata.jsonl``: ``tag``, ``include``, ``exclude``)
``.json``                 a list of strings (one HPSv2 benchmark style file), a list of objects as in JSONL
                          (SDPO ``papv2.json``), or ``{style: [prompts]}``
folder of ``*.json``      the HPSv2 benchmark folder (``anime.json``, ``concept-art.json``, ...): ``meta.style``
``.csv`` / ``.tsv``       a header row with a prompt column: ``prompt``, ``prompts`` (DrawBench), ``caption`` or
                          ``text`` (DPG-Bench), case-insensitive; PartiPrompts TSV (``Prompt``, ``Category``, ...)
``.parquet``              rows as in JSONL (e.g. a hub dataset's converted parquet)
========================  =====================================================================================

A bare name (``default`` = ``eval_default``, ``validation``) is a list shipped in ``assets/prompts/``. Anything else that is not a
local path and looks like ``org/name`` is loaded with ``datasets.load_dataset``; offline, that fails at once with
a message saying so. ``key=`` names the prompt column explicitly. Errors name the file, the row and the key.
Text files may start with a UTF-8 byte-order mark (some Windows editors write one); it is not part of the first row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign import resources
from diffalign.errors import UserError


ASSETS_PROMPTS = resources.ASSETS / "prompts"
PROMPT_KEYS = ("prompt", "caption", "prompts", "text")
SHIPPED_ALIASES = {"default": "eval_default"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EvalError(UserError, ValueError):
    """A user-facing evaluation problem (bad prompt file, missing image prompt, unknown scorer, ...)."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set: its id (stable within the set), the text, and the set's other fields for it."""

    prompt_id: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_prompts(
    source: str | os.PathLike, *, key: str | None = None, split: str | None = None, limit: int | None = None
) -> list[PromptRecord]:
    """The prompts of ``source`` (file, folder, shipped name or hub dataset id), at most ``limit`` of them."""
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    path = resolve_source(source)
    if path is None:
        records = _from_hub(str(source), key=key, split=split)
    elif path.is_dir():
        records = _from_style_folder(path)
    else:
        records = records_from_rows(read_rows(path), str(path), key=key)
    if not records:
        raise EvalError(f"{source}: no prompts found")
    return records[:limit] if limit else records


def resolve_source(source: str | os.PathLike) -> Path | None:
    """A local file or folder, a shipped list (``assets/prompts/<name>.txt``), or None for a hub dataset id."""
    text = resources.resolve(os.fspath(source))
    path = Path(text).expanduser()
    if path.exists():
        return path
    shipped = ASSETS_PROMPTS / f"{SHIPPED_ALIASES.get(text, text)}.txt"
    if re.fullmatch(r"[\w.-]+", text) and shipped.is_file():
        return shipped
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return None
    names = ", ".join(sorted([*SHIPPED_ALIASES, *(p.stem for p in ASSETS_PROMPTS.glob("*.txt"))]))
    raise EvalError(f"prompt source {text!r} not found: not a file or folder, a shipped list ({names}), or a hub id")


def read_rows(path: Path) -> list[Any]:
    """Raw rows of a prompt or mapping file: strings (``.txt``, string lists) or dicts (everything else)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise EvalError(f"{path}: empty file (expected a header row)")
            return list(reader)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise EvalError(
        f"{path}: unsupported prompt file type {suffix!r}; use .txt, .jsonl, .json, .csv, .tsv or .parquet"
    )


def read_jsonl(path: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} line {n}: invalid JSON ({e.msg})") from e
    return rows


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return [{"prompt": p, "style": style} for style, prompts in data.items() for p in prompts]
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of prompts (or objects), or {{style: [prompts]}}")
    return data


def prompt_key(row: dict[str, Any], key: str | None) -> str | None:
    """The column holding the prompt: ``key`` if given, else the first of ``PROMPT_KEYS`` (case-insensitive)."""
    if key is not None:
        return key if key in row else None
    lower = {str(k).lower(): k for k in row}
    return next((lower[k] for k in PROMPT_KEYS if k in lower), None)


def records_from_rows(
    rows: Sequence[Any], where: str, *, key: str | None = None, start: int = 0
) -> list[PromptRecord]:
    """Rows (strings or dicts) -> records; a dict without the prompt key or an empty prompt is an error."""
    records = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            prompt, meta = row, {}
        elif isinstance(row, dict):
            col = prompt_key(row, key)
            if col is None:
                expected = repr(key) if key else " or ".join(repr(k) for k in PROMPT_KEYS)
                raise EvalError(f"{where} row {i}: no {expected} key (keys: {', '.join(map(str, row)) or 'none'})")
            prompt, meta = row[col], {str(k).lower(): v for k, v in row.items() if k != col}
        else:
            raise EvalError(f"{where} row {i}: expected a string or an object, got {type(row).__name__}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalError(f"{where} row {i}: empty or non-string prompt {prompt!r}")
        records.append(PromptRecord(f"{start + i:05d}", prompt.strip(), meta))
    return records


def _from_style_folder(folder: Path) -> list[PromptRecord]:
    """The HPSv2 benchmark layout: one JSON list of prompts per style, ``<style>.json``."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise EvalError(f"{folder}: a prompt folder must hold one <style>.json list per style (HPSv2 benchmark)")
    records = []
    for file in files:
        for rec in records_from_rows(read_rows(file), str(file)):
            meta = {"style": file.stem, **rec.meta}
            records.append(PromptRecord(f"{file.stem}/{rec.prompt_id}", rec.prompt, meta))
    return records


def _from_hub(dataset_id: str, *, key: str | None, split: str | None) -> list[PromptRecord]:
    """A hub dataset through ``datasets``; a missing network or offline mode is a clear error, not a hang."""
    try:
        import datasets

        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        offline = any(
            os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else ""
        raise EvalError(
            f"could not load hub dataset {dataset_id!r}{hint}: {type(e).__name__}: {e}. "
            "Download it first, or pass a local prompt file (.txt, .jsonl, .csv, .tsv, .json, .parquet)."
        ) from e
    if isinstance(data, dict):  # a DatasetDict: the split must be unambiguous
        if len(data) != 1:
            raise EvalError(f"hub dataset {dataset_id!r} has splits {sorted(data)}; pass split=")
        data = next(iter(data.values()))
    columns = list(data.column_names)
    col = prompt_key(dict.fromkeys(columns), key)
    if col is None:
        expected = repr(key) if key else " or ".join(repr(k) for k in PROMPT_KEYS)
        raise EvalError(f"hub dataset {dataset_id!r}: no {expected} column (columns: {', '.join(columns)})")
    return records_from_rows([{"prompt": p} for p in data[col]], f"hub dataset {dataset_id!r}")


def digest(records: Sequence[PromptRecord]) -> str:
    """sha256 of the prompt texts in order (records a protocol's exact prompt list in 64 hex characters)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(rec.prompt.encode("utf-8") + b"\n")
    return h.hexdigest()
