"""Curriculum-DPO's sampler: gap order, cumulative chunks, stage boundaries in optimizer steps, resume, ranks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from diffalign.data.curriculum import CurriculumSampler, chunk_sizes, curriculum_order
from diffalign.data.loader import build_loader


RANKED = Path(__file__).resolve().parents[2] / "assets" / "ranked_tiny"


def test_order_and_cumulative_chunks_by_hand():
    gaps = [0.5, 3.0, 1.0, 2.0, 0.05, 2.0]
    assert curriculum_order(gaps, min_gap=0.1) == [1, 3, 5, 2, 0]  # largest gap first, ties stable, 0.05 dropped
    assert curriculum_order(gaps, min_gap=0.1, max_groups=2) == [1, 3]
    assert chunk_sizes(5, 2) == [2, 5] and chunk_sizes(150, 6) == [25, 50, 75, 100, 125, 150]


def test_stages_draw_from_growing_chunks():
    gaps = [float(i) for i in range(12)]  # order: 11, 10, ..., 1 (a zero gap is not > min_gap = 0)
    s = CurriculumSampler(gaps, 2, chunks=3, batches_per_stage=5, seed=0)
    assert s.sizes == [3, 7, 11] and s.batches_per_epoch == 5 and len(s) == 10
    first = s.permutation(0).tolist()
    assert len(first) == 10 and set(first) == {11, 10, 9}
    assert set(s.permutation(1).tolist()) <= set(range(5, 12))
    for stage in (2, 7):  # the last chunk stays for the rest of the run
        assert set(s.permutation(stage).tolist()) <= set(range(1, 12))
    with pytest.raises(ValueError, match="first chunk"):
        CurriculumSampler(gaps, 4, chunks=6, batches_per_stage=5)  # first chunk: 1 group


def test_resume_and_rank_split_match_one_uninterrupted_process():
    gaps = [float(i % 7) for i in range(20)]
    one = list(CurriculumSampler(gaps, 4, chunks=2, batches_per_stage=3, seed=5))
    ranks = [
        list(CurriculumSampler(gaps, 2, chunks=2, batches_per_stage=3, num_processes=2, rank=r, seed=5))
        for r in range(2)
    ]
    assert [x for b in range(3) for r in range(2) for x in ranks[r][2 * b : 2 * b + 2]] == one
    resumed = CurriculumSampler(gaps, 4, chunks=2, batches_per_stage=3, seed=5)
    resumed.load_state_dict({"epoch": 0, "position": 2})
    assert list(resumed) == one[8:]


def _cfg(**curriculum):
    base = {
        "format": "scored_pairs", "path": str(RANKED), "split": "pairs", "streaming": False, "resolution": 32,
        "crop": "center", "hflip_prob": 0.0, "on_bad_row": "skip", "max_bad_fraction": 0.1, "labelled_by": None, "max_rows": None,
        "proportion_empty_prompts": 0.0, "num_workers": 0, "latent_cache": None,
        "curriculum": SimpleNamespace(**curriculum),
    }  # fmt: skip
    return SimpleNamespace(**base)


def test_loader_unlocks_the_next_chunk_after_n_optimizer_steps():
    """ranked_tiny/pairs: 8 best-vs-worst pairs (gap 6) then 8 middle pairs (gap ~2). Stage 0 = 1 step x 2 micro-batches."""
    cfg = _cfg(chunks=2, steps_per_chunk=1, min_gap=0.0, max_groups=None)
    loader = build_loader(cfg, batch_size=4, seed=0, grad_accum=2)
    stage0 = [loader.next_batch()[0] for _ in range(2)]
    for batch in stage0:
        assert (batch.scores[:, 0] - batch.scores[:, 1]).tolist() == pytest.approx([6.0] * 4)
    later = [loader.next_batch()[0] for _ in range(8)]
    assert {round(g) for b in later for g in (b.scores[:, 0] - b.scores[:, 1]).tolist()} == {6, 2}
