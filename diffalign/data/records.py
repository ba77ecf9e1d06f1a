"""Plain containers shared by the data loaders: records, skipped rows, load statistics, image decoding.

A *group* is one prompt with K images ordered most preferred first (K=2 for Pick-a-Pic pairs, K>=2 for
ranked lists). Loaders produce ``PreferenceRecord`` (PIL images); ``transforms`` turns a record into a
``Group`` (one (K, 3, H, W) tensor plus its ``SampleInfo``); ``collate`` stacks groups into a ``Batch``.

Bad rows never crash a run silently or stop it by accident: a loader either raises ``BadRowError``
(``on_bad_row="raise"``) or returns a ``SkippedRow`` that names the row and the reason, logs a warning and
counts it in ``LoadStats`` (``on_bad_row="skip"``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffalign.errors import UserError
from diffalign.registry import suggest
from diffalign.types import SampleInfo


logger = logging.getLogger("diffalign.data")

BAD_ROW_POLICIES = ("skip", "raise")


class BadRowError(UserError, ValueError):
    """A row of a data source cannot be used: names the source, the row index, the column and why."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt and its K images, most preferred first.

    ``scores`` (length K, descending) are the preference scores when the source has them: Pick-a-Pic
    gives ``[1.0, 0.0]`` for a decided pair and ``[0.5, 0.5]`` for a kept tie; ranked lists give their
    per-image scores. ``index`` is the row index in the source split, for error messages.
    """

    prompt: str
    images: list[Image.Image]
    scores: list[float] | None
    index: int
    image_prompts: list[str] | None = None  # one caption per image (DCPO), in the images' order
    source: Image.Image | None = None  # editing rows: the source image the K images edit


@dataclass(frozen=True)
class SkippedRow:
    """Stands in for a row that was skipped under ``on_bad_row="skip"``; ``collate_groups`` drops it."""

    index: int
    reason: str


@dataclass(frozen=True)
class Group:
    """A transformed group ready to collate: ``pixels`` (K, 3, H, W) in [-1, 1], winner first.

    ``flags``: ``(kind, detail)`` for what is usable but suspect in the source row (see ``quality_flags``).
    """

    prompt: str
    pixels: Tensor
    info: SampleInfo
    scores: list[float] | None
    index: int
    flags: tuple[tuple[str, str], ...] = ()
    image_prompts: list[str] | None = None
    source: Tensor | None = None  # editing rows: the source image (3, H, W), transformed with the group


EMPTY_CAPTION, DEGENERATE_IMAGE = "empty captions", "degenerate images"
FLIPPED_SIDES = "captions naming left/right with hflip_prob > 0"
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)
MIN_IMAGE_SIDE, MAX_ASPECT = 32, 8.0  # a 1x1 or 4000x1 "image" is upscaled into a meaningless training target


def quality_flags(record: PreferenceRecord, hflip_prob: float = 0.0) -> tuple[tuple[str, str], ...]:
    """``(kind, detail)`` for an empty caption, for each image under ``MIN_IMAGE_SIDE`` or beyond ``MAX_ASPECT``,
    and (when ``hflip_prob > 0``) for a caption that says "left" or "right": a mirrored image contradicts it."""
    flags = [(EMPTY_CAPTION, "empty caption")] if not record.prompt.strip() else []
    if hflip_prob > 0:
        for text in (record.prompt, *(record.image_prompts or ())):
            match = _SIDE_WORD.search(text)
            if match:
                flags.append((FLIPPED_SIDES, f"caption says {match.group(1).lower()!r}"))
                break
    for k, image in enumerate(record.images):
        w, h = image.size
        if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
            flags.append((DEGENERATE_IMAGE, f"image {k} is {w}x{h} px"))
    return tuple(flags)


@dataclass
class LoadStats:
    """What a loader read, dropped by policy, and skipped as broken.

    Counts are per process: with DataLoader workers, rows skipped inside a worker are counted in that
    worker's copy; ``collate_groups`` also carries them to the main process in ``GroupBatch.skipped``,
    and ``add_skipped`` folds them back in (each row is counted once).
    """

    rows_read: int = 0
    ties_dropped: int = 0
    unlabeled_dropped: int = 0
    not_different_dropped: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    flagged: dict[str, dict[int, str]] = field(default_factory=dict)  # kind -> {row index: detail}

    @property
    def bad_rows_skipped(self) -> int:
        return len(self.bad_rows)

    def add_bad_row(self, index: int, reason: str) -> bool:
        """Record a skipped row once; returns False if this row index was already recorded."""
        if any(i == index for i, _ in self.bad_rows):
            return False
        self.bad_rows.append((index, reason))
        return True

    def add_skipped(self, skipped: Sequence[tuple[int, str]]) -> None:
        for index, reason in skipped:
            self.add_bad_row(index, reason)

    def add_flagged(self, flagged: Sequence[tuple[int, str, str]]) -> None:
        """Count ``(row index, kind, detail)`` of used-but-suspect rows, each row once per kind."""
        for index, kind, detail in flagged:
            self.flagged.setdefault(kind, {}).setdefault(index, detail)

    def summary(self) -> str:
        text = (
            f"rows read {self.rows_read}; dropped by policy: ties {self.ties_dropped}, "
            f"unlabeled {self.unlabeled_dropped}, not different {self.not_different_dropped}; "
            f"bad rows skipped {self.bad_rows_skipped}{_examples(self.bad_rows)}"
        )
        degenerate = f" (shorter side < {MIN_IMAGE_SIDE} px or aspect > {MAX_ASPECT:g}:1)"
        for kind, note in ((EMPTY_CAPTION, ""), (DEGENERATE_IMAGE, degenerate)):
            rows = self.flagged.get(kind, {})  # used for training as they are; counted so they are not silent
            text += f"; {kind}{note} {len(rows)}{_examples(sorted(rows.items()))}"
        rows = self.flagged.get(FLIPPED_SIDES, {})
        if rows:  # only when flipping is on and some caption is spatial
            text += (
                f"; {FLIPPED_SIDES} {len(rows)}{_examples(sorted(rows.items()))} (a flipped image contradicts its "
                "caption: set data.hflip_prob=0 for spatial prompts)"
            )
        return text


class TooManyBadRowsError(BadRowError):
    """A source whose unusable rows exceed ``data.max_bad_fraction``: names the counts, the most common reason
    with an example row, and the two fixes."""


def too_many_bad(bad: int, seen: int, max_fraction: float) -> bool:
    """Whether ``bad`` unusable rows out of ``seen`` show a bad fraction above ``max_fraction`` beyond chance.

    A one-sided binomial test at two standard deviations: ``bad > f * seen + 2 * sqrt(seen * f * (1 - f))``. A
    source with exactly ``f`` bad rows passes it ~98% of the time, so a short run on a good source is not stopped
    by one unlucky batch (1 of 8 at f = 0.1), while a broken one stops within a few batches (4 of 12, 10 of 50,
    29 of 200 at f = 0.1). ``f = 0`` stops at the first bad row; ``f = 1`` never stops.
    """
    return bad > max_fraction * seen + 2 * math.sqrt(seen * max_fraction * (1 - max_fraction))


def reason_kind(reason: str) -> str:
    """A bad-row reason without its row-specific parts (a path after the second ": ", numbers such as a byte count
    or a label value): what ``BadRowTally`` groups by."""
    return re.sub(r"\b\d+(?:\.\d+)?\b", "N", ": ".join(reason.split(": ")[:2]))


@dataclass
class BadRowTally:
    """Unusable rows by ``reason_kind``: ``{kind: [count, lowest row index, that row's reason]}``.

    Mergeable across processes (``merge``), so the most common kind and its example are the same whatever the
    number of processes that drew the rows.
    """

    kinds: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, index: int, reason: str) -> None:
        entry = self.kinds.setdefault(reason_kind(reason), [0, index, reason])
        entry[0] += 1
        if index < entry[1]:
            entry[1:] = [index, reason]

    def merge(self, other: BadRowTally) -> None:
        for kind, (count, index, reason) in other.kinds.items():
            entry = self.kinds.setdefault(kind, [0, index, reason])
            entry[0] += count
            if index < entry[1]:
                entry[1:] = [index, reason]

    def most_common(self) -> tuple[str, int, int, str] | None:
        """``(kind, count, example row index, its reason)`` of the most frequent kind (ties: the alphabetical)."""
        if not self.kinds:
            return None
        kind = min(self.kinds, key=lambda k: (-self.kinds[k][0], k))
        count, index, reason = self.kinds[kind]
        return kind, count, index, reason


def check_bad_fraction(bad: int, seen: int, max_fraction: float, tally: BadRowTally, what: str, path: str) -> None:
    """Raise ``TooManyBadRowsError`` (one line) when ``too_many_bad(bad, seen, max_fraction)``.

    ``what`` names the rows counted (e.g. "rows drawn so far", "rows whose labels were read"); ``path`` is
    ``data.path``.
    """
    if not too_many_bad(bad, seen, max_fraction):
        return
    top = tally.most_common()
    why = f"; most common reason ({top[1]} rows), e.g. row {top[2]}: {' '.join(top[3].split())}" if top else ""
    raise TooManyBadRowsError(
        f"data.path={path}: {bad} of {seen} {what} are unusable ({bad / max(seen, 1):.0%}, above "
        f"data.max_bad_fraction={max_fraction:g}){why}; fix the data, or raise data.max_bad_fraction (1 never stops)"
    )


def _examples(rows: Sequence[tuple[int, str]], shown: int = 5) -> str:
    if not rows:
        return ""
    more = f" (+{len(rows) - shown} more)" if len(rows) > shown else ""
    return " [" + "; ".join(f"row {i}: {r}" for i, r in rows[:shown]) + more + "]"


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the option and listing the valid choices."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; {suggest(str(value), tuple(choices))}")


def handle_bad_row(
    policy: str, stats: LoadStats, source: str, index: int, reason: str, *, cause: BaseException | None = None
) -> SkippedRow:
    """Apply the bad-row policy: raise ``BadRowError``, or log a warning, count the row and return a marker."""
    message = f"{source}: row {index}: {reason}"
    if policy == "raise":
        raise BadRowError(
            f"{message} (data.on_bad_row=raise; fix the row, or data.on_bad_row=skip skips such rows)"
        ) from cause
    if stats.add_bad_row(index, reason):
        logger.warning("skipping bad row %d of %s: %s", index, source, reason)
    return SkippedRow(index=index, reason=reason)


def decode_image(value: Any, *, base_dir: str | None = None) -> Image.Image:
    """Decode one image cell to an RGB PIL image.

    Accepts JPEG/PNG bytes (Pick-a-Pic ``jpg_*`` is ``binary``), a ``datasets.Image`` cell
    (``{"bytes": ..., "path": ...}``), a PIL image, or a file path (relative to ``base_dir``).
    Raises ``ValueError`` with a short reason for empty, missing or undecodable data.
    """
    if value is None:
        raise ValueError("image is missing (None)")
    if isinstance(value, dict):
        data = value.get("bytes")
        value = data if data is not None else value.get("path")
        if value is None:
            raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        path = value if base_dir is None or os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise ValueError(f"image file not found: {path}")
        with open(path, "rb") as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ValueError("image bytes are empty")
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        except UnidentifiedImageError as e:
            raise ValueError(f"cannot identify image data ({len(value)} bytes; truncated or not an image)") from e
        except Exception as e:  # PIL raises many types for broken data (OSError, SyntaxError, bomb errors, ...)
            raise ValueError(f"cannot decode image ({len(value)} bytes): {type(e).__name__}: {e}") from e
    raise ValueError(f"unsupported image cell type {type(value).__name__}")


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
