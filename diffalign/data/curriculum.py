"""Curriculum-DPO's sampler: groups ordered by reward gap into cumulative chunks, the next one unlocked every N steps.

Croitoru et al., CVPR 2025, Curriculum Direct Preference Optimization for Diffusion and Consistency Models
(https://arxiv.org/abs/2405.13637). Read in CroitoruAlin/Curriculum-DPO@3454543:

* ``data/dataset_factory.py`` L129-132: keep pairs whose score gap exceeds a threshold (0.02 for the human-score
  and LLaVA-BERTScore rewards, 0.2 for the aesthetic score, 0.1 for others, L8-16) -> ``min_gap``;
* L141-148: sort by gap, largest first, and keep the first 150k -> ``max_groups``;
* L149-156: chunk ``c`` is the first ``linspace(0, N, chunks + 1)[c + 1]`` pairs (cumulative, easiest = largest
  gap first), ``--no_chunks 6`` (``config/args_sd.py``);
* L165-167 and ``train_stablediffusion.py`` L531-533 / L545: ``update_cl()`` (the next chunk) every
  ``--update_frequency 500`` optimizer steps; the last chunk stays until the end.

Here a "stage" of the sampler is ``batches_per_stage`` global batches (``steps_per_chunk x grad_accum``): stage s
draws from chunk ``min(s, chunks - 1)``, in fresh permutations of that chunk (seeded by seed, stage and pass) until
the stage is full. A stage is one ``GroupSampler`` epoch, so rank slicing, global batches, noise seeds per
(epoch, index) and the exact resume position are the ordinary ones. The authors' dataloader picks up a new chunk
at its next pass over the data; here it changes exactly at the step boundary. The gap of a group is its best score
minus its worst (a pair: winner minus loser), from the data's scores (``data.format: scored_pairs`` or ``ranked``);
there the winner is always the higher score, i.e. the reward model's choice, which is NOT what the authors train on
Pick-a-Pic (below).

The authors' own two variants (``data/dataset_factory.py``), selected by the data and ``curriculum.stages``:

* **Pick-a-Pic** (``class PickaPic``, L116-192; ``data.format: pickapic`` + ``curriculum.score_columns``): the pair
  is trained on its HUMAN winner (L180-185: ``label_0 > label_1`` -> jpg_0 first); the reward model only ORDERS
  pairs. L130-132 keep a row when ``label_0 in (0, 1)`` (human ties dropped: ``data.ties: drop``), the score gap
  ``|s_0 - s_1| > keep_threshold`` (``min_gap``) and both scores ``> 0.1`` (``score_floor``); L141-148 sort by
  that gap, largest first (Python's stable sort: equal gaps keep row order), and keep the first 150,000
  (``max_groups``); L149-156 the cumulative count-based chunks above. The scores are one table row per Pick-a-Pic
  row (L121-127: ``image_0_score`` / ``image_1_score`` added as columns of the split, read from ``--score_dir``):
  ``score_columns`` in the Pick-a-Pic table itself or in ``scores_path``, row ``r`` scoring row ``r``.
  ``keep_threshold`` is ``decide_threshold(reward)`` (L8-16): 0.02 for ``human_score`` (HPSv2.1, the authors'
  Pick-a-Pic reward, ``reward_models/rewards.py`` L17-39: the raw cosine ``image_features @ text_features``, no
  logit scale) and ``llava_bertscore`` (the ``--reward_fn`` default, ``config/args_sd.py`` L74), 0.2 for
  ``aesthetic_score``, else 0.1. Both 0.02 and the 0.1 floor are in the raw-cosine units: with diffalign's
  ``hpsv2`` scorer (x100) they are 2 and 10.
* **Prompts** (``class PromptsDataset``, L26-113; ``data.format: ranked`` + ``curriculum.stages: thresholds``, a
  pair loss): every image of a prompt was generated and scored; L47-56 form ALL pairs of a prompt's images with
  ``|s_i - s_j| > keep_threshold`` (the higher score wins, L102-105); L57 the stage thresholds
  ``linspace(min_gap_seen, max_gap_seen, groups)[::-1]``; L66-75 stage ``k`` uses the pairs with gap
  ``>= thresholds[k + 1]``; L77-83 ``update_cl`` advances while ``k < groups - 2``: ``groups - 1`` stages, the last
  holding every pair (``groups <= 1``: every pair from the start, L69-70 + L85-90). Stages are VALUE thresholds,
  not count-based chunks; ``groups`` is ``--no_chunks`` (``curriculum.chunks``), no 150k cap. Deviation: the
  authors pool all images with the same prompt string across the dataset (L38-43); here the pairs come from each
  ranked list (row), which is the same whenever a prompt has one row.

The stage clock is the same for both (``train_stablediffusion.py`` L530-531: ``update_cl`` every
``--update_frequency`` 500 optimizer steps).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffalign.data.records import PreferenceRecord, SkippedRow
from diffalign.data.sampler import GroupSampler


logger = logging.getLogger("diffalign.data")
STAGES = ("chunks", "thresholds")


def curriculum_order(gaps: Sequence[float], min_gap: float = 0.0, max_groups: int | None = None) -> list[int]:
    """Item indices with ``gap > min_gap``, largest gap first (stable for ties), at most ``max_groups``."""
    kept = [i for i, g in enumerate(gaps) if g > min_gap]
    kept.sort(key=lambda i: -gaps[i])
    return kept if max_groups is None else kept[:max_groups]


def chunk_sizes(num_items: int, chunks: int) -> list[int]:
    """Cumulative chunk sizes ``linspace(0, N, chunks + 1)[1:]`` truncated to int, as the authors' code does."""
    return np.linspace(0, num_items, chunks + 1).astype(np.int32)[1:].tolist()


def threshold_sizes(sorted_gaps: Sequence[float], groups: int) -> list[int]:
    """Stage sizes of the prompts variant: for ``sorted_gaps`` (largest first), stage ``k`` of ``groups - 1`` holds the
    pairs with gap ``>= linspace(min, max, groups)[::-1][k + 1]`` (``dataset_factory.py`` L57, L66-75); one stage
    with every pair when ``groups <= 1`` (L69-70)."""
    n = len(sorted_gaps)
    if n == 0 or groups <= 1:
        return [n]
    gaps = np.asarray(sorted_gaps, dtype=np.float64)
    thresholds = np.linspace(gaps.min(), gaps.max(), groups)[::-1]
    return [int((gaps >= thr).sum()) for thr in thresholds[1:]]


def pickapic_gaps(
    score_0: Sequence[float], score_1: Sequence[float], rows: Sequence[int], floor: float | None
) -> list[float]:
    """The ordering key of each kept Pick-a-Pic item: ``|s_0 - s_1|`` of its source row ``rows[i]``; NaN (never
    kept) when a score is missing or not finite, or either score is not above ``floor`` (L131)."""
    gaps = []
    for r in rows:
        s0, s1 = score_0[r], score_1[r]
        ok = all(v is not None and math.isfinite(v) and (floor is None or v > floor) for v in (s0, s1))
        gaps.append(abs(s0 - s1) if ok else math.nan)
    return gaps


class RankedPairs(Dataset):
    """Every pair of a ranked list whose score gap exceeds ``min_gap``, higher score first (the prompts variant).

    ``pairs[p] = (list item, rank of the winner, rank of the loser)``; ``gaps[p]`` its score gap. Item ``p`` is a
    two-image ``PreferenceRecord`` whose ``index`` is ``p`` (its noise seed; bad-row reports name the list's row).
    """

    def __init__(self, lists: Any, min_gap: float) -> None:
        self.lists, self.stats = lists, lists.stats
        self.pairs: list[tuple[int, int, int]] = []
        self.gaps: list[float] = []
        for i, entry in enumerate(lists._entries):
            scores = entry.scores  # best first
            for hi in range(len(scores)):
                for lo in range(hi + 1, len(scores)):
                    if scores[hi] - scores[lo] > min_gap:
                        self.pairs.append((i, hi, lo))
                        self.gaps.append(scores[hi] - scores[lo])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, p: int) -> PreferenceRecord | SkippedRow:
        i, hi, lo = self.pairs[p]
        item = self.lists.record(i, (hi, lo))
        return dataclasses.replace(item, index=p) if isinstance(item, PreferenceRecord) else item


def curriculum_records(records: Any, cfg: Any) -> Any:
    """The records the loader serves: ranked lists become their pairs under ``curriculum.stages: thresholds``."""
    c = getattr(cfg, "curriculum", None)
    if c is None or c.chunks <= 0 or getattr(c, "stages", "chunks") != "thresholds":
        return records
    return RankedPairs(records, c.min_gap)


def curriculum_gaps(records: Any, cfg: Any) -> list[float]:
    """The ordering key of every item of ``records``: a ranked list's best minus worst score, a pair's gap, or a
    Pick-a-Pic pair's reward gap from ``curriculum.score_columns`` (NaN: filtered out)."""
    if isinstance(records, RankedPairs):
        return list(records.gaps)
    if hasattr(records, "_entries"):
        return [e.scores[0] - e.scores[-1] for e in records._entries]
    cached = getattr(records, "_curriculum_gaps", None)
    if cached is not None:  # the sampler is rebuilt at every stage; the score table is read once
        return cached
    c = cfg.curriculum
    score_0, score_1 = read_score_columns(cfg)
    rows = [records.source_index(i) for i in range(len(records))]
    if rows and max(rows) >= len(score_0):
        raise ValueError(
            f"data.curriculum: the score table has {len(score_0)} rows but the Pick-a-Pic split has row {max(rows)}; "
            "row r of the scores must score row r of the split"
        )
    gaps = pickapic_gaps(score_0, score_1, rows, c.score_floor)
    logger.info(
        "curriculum: %d of %d Pick-a-Pic pairs have both %s scores above %s",
        sum(not math.isnan(g) for g in gaps),
        len(gaps),
        "/".join(c.score_columns),
        c.score_floor,
    )
    records._curriculum_gaps = gaps
    return gaps


def read_score_columns(cfg: Any) -> tuple[list[float | None], list[float | None]]:
    """The two per-image score columns (jpg_0's, jpg_1's), from ``curriculum.scores_path`` or the data itself."""
    from diffalign.data._source import column_names, open_tabular, require_columns

    c = cfg.curriculum
    if not c.score_columns or len(c.score_columns) != 2:
        raise ValueError("data.curriculum.score_columns must name the two per-image score columns (jpg_0's, jpg_1's)")
    ds, name = open_tabular(c.scores_path or cfg.path, cfg.split, streaming=False)
    require_columns(column_names(ds), list(c.score_columns), name)
    table = ds.select_columns(list(c.score_columns)).with_format("arrow")[0 : len(ds)]
    return tuple(table.column(col).to_pylist() for col in c.score_columns)  # type: ignore[return-value]


class CurriculumSampler(GroupSampler):
    """Yields item indices of the current chunk; epoch ``e`` of the sampler is stage ``e`` of the curriculum."""

    def __init__(
        self,
        gaps: Sequence[float],
        per_device_batch_size: int,
        *,
        chunks: int = 6,
        batches_per_stage: int = 500,
        min_gap: float = 0.0,
        max_groups: int | None = None,
        stages: str = "chunks",
        **kwargs,
    ) -> None:
        self.order = curriculum_order(gaps, min_gap, max_groups)
        super().__init__(len(self.order), per_device_batch_size, **kwargs)
        if chunks <= 0 or batches_per_stage <= 0:
            raise ValueError(
                f"curriculum: chunks and batches_per_stage must be > 0; got {chunks}, {batches_per_stage}"
            )
        if stages not in STAGES:
            raise ValueError(f"curriculum: unknown stages {stages!r}; choose one of {STAGES}")
        if stages == "chunks":
            self.sizes = chunk_sizes(len(self.order), chunks)
        else:
            self.sizes = threshold_sizes([gaps[i] for i in self.order], chunks)
        if self.sizes[0] < self.global_batch_size:
            raise ValueError(
                f"curriculum: the first {'chunk' if stages == 'chunks' else 'stage'} has {self.sizes[0]} groups "
                f"({len(self.order)} with gap > {min_gap}, {chunks} {stages}), fewer than one global batch "
                f"({self.global_batch_size})"
            )
        self.batches_per_stage = batches_per_stage

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_per_stage

    def chunk(self, stage: int) -> int:
        """How many groups (the first of ``order``) stage ``stage`` draws from."""
        return self.sizes[min(stage, len(self.sizes) - 1)]

    def permutation(self, epoch: int) -> torch.Tensor:
        """The stage's ``batches_per_stage`` global batches of item indices, identical on every rank."""
        size, gbs = self.chunk(epoch), self.global_batch_size
        per_pass = size // gbs
        picks, passes = [], -(-self.batches_per_stage // per_pass)
        pool = torch.as_tensor(self.order[:size])
        for p in range(passes):
            gen = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch + p)
            perm = torch.randperm(size, generator=gen) if self.shuffle else torch.arange(size)
            picks.append(pool[perm[: per_pass * gbs]])
        return torch.cat(picks)[: self.batches_per_stage * gbs]
