"""Stack transformed groups into a ``Batch``; drop skipped rows and report them to the main process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffalign.data.records import Group, SkippedRow
from diffalign.types import Batch


@dataclass
class GroupBatch(Batch):
    """A ``Batch`` that also lists the rows dropped from it as ``(row index, reason)``.

    Collation runs inside DataLoader workers, so this is how skip counts reach the training loop:
    ``stats.add_skipped(batch.skipped)``. ``len(batch)`` can be smaller than the requested batch size, and
    0 when every row was bad (then ``pixels`` is None); a recipe should skip such a step.
    """

    skipped: list[tuple[int, str]] = field(default_factory=list)
    flagged: list[tuple[int, str, str]] = field(default_factory=list)  # (row index, kind, detail): Group.flags


def collate_groups(items: Sequence[Group | SkippedRow | None]) -> GroupBatch:
    """Groups -> ``GroupBatch`` with pixels (B, K, 3, H, W) and scores (B, K) float32 or None.

    ``None`` and ``SkippedRow`` items are dropped. All groups must have the same K and image size, and
    either all or none of them carry scores; otherwise ``ValueError`` names the offending rows.
    """
    skipped = [(item.index, item.reason) for item in items if isinstance(item, SkippedRow)]
    groups = [item for item in items if isinstance(item, Group)]
    unknown = [type(item).__name__ for item in items if item is not None and not isinstance(item, (Group, SkippedRow))]
    if unknown:
        raise TypeError(f"collate_groups expects Group / SkippedRow / None items, got {unknown[0]}")
    if not groups:
        return GroupBatch(prompts=[], info=[], skipped=skipped)
    _check_same_shape(groups)
    with_scores = [g.scores is not None for g in groups]
    if any(with_scores) and not all(with_scores):
        missing = [g.index for g in groups if g.scores is None]
        raise ValueError(f"rows {missing} have no scores while other rows in the batch do")
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float32) if all(with_scores) else None
    return GroupBatch(
        prompts=[g.prompt for g in groups],
        info=[g.info for g in groups],
        pixels=torch.stack([g.pixels for g in groups]),
        scores=scores,
        skipped=skipped,
        flagged=[(g.index, kind, detail) for g in groups for kind, detail in g.flags],
        image_prompts=[list(g.image_prompts) for g in groups] if groups[0].image_prompts is not None else None,
        source_pixels=torch.stack([g.source for g in groups]) if groups[0].source is not None else None,
    )


def _check_same_shape(groups: Sequence[Group]) -> None:
    first = groups[0]
    for g in groups[1:]:
        if g.pixels.shape[0] != first.pixels.shape[0]:
            raise ValueError(
                f"groups in one batch must have the same number of images K: row {first.index} has "
                f"K={first.pixels.shape[0]}, row {g.index} has K={g.pixels.shape[0]}"
            )
        if g.pixels.shape != first.pixels.shape:
            raise ValueError(
                f"image tensors differ in shape within a batch: row {first.index} {tuple(first.pixels.shape)} vs "
                f"row {g.index} {tuple(g.pixels.shape)}"
            )
        if g.scores is not None and len(g.scores) != g.pixels.shape[0]:
            raise ValueError(f"row {g.index}: {len(g.scores)} scores for K={g.pixels.shape[0]} images")
    if first.scores is not None and len(first.scores) != first.pixels.shape[0]:
        raise ValueError(f"row {first.index}: {len(first.scores)} scores for K={first.pixels.shape[0]} images")
