"""Curriculum-DPO as the authors run it (CroitoruAlin/Curriculum-DPO ``data/dataset_factory.py``), hand-worked.

Pick-a-Pic variant: the HUMAN winner is trained, the reward gap only orders the pairs; rows with a human tie or a
score at or below the floor are dropped, the top ``max_groups`` by gap are cut into cumulative chunks. Prompts
variant: all pairs of each ranked list, stages by gap VALUE thresholds (``groups - 1`` of them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.config.common import CurriculumConfig, DataConfig
from diffalign.data.curriculum import CurriculumSampler, RankedPairs, threshold_sizes
from diffalign.data.loader import NOISE_SALT, build_loader
from diffalign.data.ranked import RankedDataset, RankedSource
from diffalign.sampling.seeds import mixed_seed


ASSETS = Path(__file__).resolve().parents[2] / "assets"
PICKAPIC = ASSETS / "pickapic_tiny"  # train: 48 rows; label_0 == 0 (jpg_1 won) exactly when row % 3 == 1
# row -> (image_0_score, image_1_score); every other row scores (0.05, 0.05), under the 0.1 floor
SCORES = {
    0: (0.5, 0.25),  # gap 0.25, human winner jpg_0 (agrees with the reward)
    1: (0.5, 0.375),  # gap 0.125, human winner jpg_1 (the reward says jpg_0)
    2: (0.25, 0.625),  # gap 0.375, human winner jpg_0 (the reward says jpg_1)
    4: (0.25, 0.75),  # gap 0.5, human winner jpg_1
    5: (0.9375, 0.125),  # human tie (0.5 / 0.5): dropped however large the gap
    6: (0.75, 0.0625),  # one score under the floor: dropped
    7: (0.5, 0.515625),  # gap 1/64 <= min_gap 0.02: dropped
    8: (0.75, 0.5),  # gap 0.25, the same as row 0: after it (stable sort)
    9: (0.375, 0.5),  # gap 0.125, the same as row 1; human winner jpg_0 (the reward says jpg_1)
    22: (0.9375, 0.125),  # has_label False (labels 0.5 / 0.5): dropped
}


def write_scores(path: Path) -> Path:
    s0 = [SCORES.get(r, (0.05, 0.05))[0] for r in range(48)]
    s1 = [SCORES.get(r, (0.05, 0.05))[1] for r in range(48)]
    pq.write_table(pa.table({"image_0_score": s0, "image_1_score": s1}), path)
    return path


def authors_pickapic_chunks(label_0, s0, s1, keep_threshold, groups, top=150000):
    """``dataset_factory.py`` L128-156 transcribed (row indices of each cumulative chunk)."""
    not_split_idx = [
        i
        for i, label in enumerate(label_0)
        if label in (0, 1) and abs(s0[i] - s1[i]) > keep_threshold and (s0[i] > 0.1 and s1[i] > 0.1)
    ]
    diffs = [[i, abs(s0[r] - s1[r])] for i, r in enumerate(not_split_idx)]
    diffs.sort(key=lambda x: x[1], reverse=True)
    diffs = diffs[:top]
    intervals = np.linspace(0, len(diffs), groups + 1).astype(np.int32)
    return [[not_split_idx[i] for i, _ in diffs[:right]] for right in intervals[1:]]


def _pickapic_cfg(scores_path: Path, **curriculum):
    """The real ``data`` section (every other key at its default), so keys added later come along."""
    c = {
        "chunks": 2, "steps_per_chunk": 1, "min_gap": 0.02, "max_groups": 5,
        "score_columns": ["image_0_score", "image_1_score"], "scores_path": str(scores_path), "score_floor": 0.1,
        **curriculum,
    }  # fmt: skip
    return DataConfig(
        format="pickapic", path=str(PICKAPIC), resolution=32, hflip_prob=0.0, curriculum=CurriculumConfig(**c)
    )


def test_pickapic_order_chunks_and_human_winner_by_hand(tmp_path):
    """Kept: rows 4 (0.5), 2 (0.375), 0 (0.25), 8 (0.25), 1 (0.125), 9 (0.125); top 5 drops row 9.
    chunks=2 over 5: linspace(0, 5, 3) -> [0, 2, 5]: stage 0 = rows {4, 2}, stage 1 = rows {4, 2, 0, 8, 1}."""
    cfg = _pickapic_cfg(write_scores(tmp_path / "scores.parquet"))
    loader = build_loader(cfg, batch_size=2, seed=0, grad_accum=1)
    sampler = loader._sampler()
    records = loader.records
    rows = [records.source_index(i) for i in sampler.order]
    assert rows == [4, 2, 0, 8, 1] and sampler.sizes == [2, 5]
    label_0 = pq.read_table(PICKAPIC / "data" / "train-00000-of-00001.parquet").column("label_0").to_pylist()
    s0, s1 = zip(*[SCORES.get(r, (0.05, 0.05)) for r in range(48)], strict=True)
    assert authors_pickapic_chunks(label_0, s0, s1, 0.02, 2, top=5) == [[4, 2], [4, 2, 0, 8, 1]]
    # the trained winner is the human one: jpg_1 first exactly for rows 1 and 4 (row % 3 == 1), whatever the reward
    first = {records.source_index(i): int(records._first[i]) for i in sampler.order}
    assert first == {4: 1, 2: 0, 0: 0, 8: 0, 1: 1}
    reward_winner = {r: int(SCORES[r][1] > SCORES[r][0]) for r in rows}
    assert [r for r in rows if first[r] != reward_winner[r]] == [2, 1]  # trained against the reward's choice
    record = records[sampler.order[0]]  # row 4: the winner image first is jpg_1
    assert record.index == 4 and record.scores == [1.0, 0.0]


def _rows_of(seeds, stages, num_rows):
    """Which (stage, row) each noise seed belongs to: the loader derives it from (run seed 0, epoch = stage, row)."""
    table = {mixed_seed(0, e, r, NOISE_SALT): (e, r) for e in range(stages) for r in range(num_rows)}
    return [table[s] for s in seeds]


def test_pickapic_stage_unlocks_after_n_optimizer_steps(tmp_path):
    """steps_per_chunk=2, grad_accum=2: the first 4 micro-batches draw rows {4, 2} only, then the 5 kept rows."""
    cfg = _pickapic_cfg(write_scores(tmp_path / "scores.parquet"), steps_per_chunk=2)
    loader = build_loader(cfg, batch_size=2, seed=0, grad_accum=2)
    drawn = [_rows_of(loader.next_batch()[1], 8, 48) for _ in range(4 + 12)]
    assert {x for b in drawn[:4] for x in b} == {(0, 4), (0, 2)}
    later = {x for b in drawn[4:] for x in b}
    assert {r for _, r in later} == {4, 2, 0, 8, 1} and {e for e, _ in later} == {1, 2, 3}


IMAGES = ASSETS / "ranked_tiny" / "images"
LISTS = [  # prompt, images, scores (the authors' PromptsDataset: every image of a prompt generated and scored)
    ("prompt A", ["p0_0.png", "p0_1.png", "p0_2.png"], [0.5, 0.25, 0.0]),
    ("prompt B", ["p1_0.png", "p1_1.png", "p1_2.png", "p1_3.png"], [0.0, 1.0, 0.5, 0.5]),
]


def write_lists(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prompt, images, scores in LISTS:
            row = {"prompt": prompt, "images": [str(IMAGES / name) for name in images], "scores": scores}
            f.write(json.dumps(row) + "\n")
    return path


def authors_prompt_stages(entries, keep_threshold, groups):
    """``dataset_factory.py`` L38-90 transcribed: the (prompt, winner, loser) pairs of each stage ``index_curr``."""
    by_prompt: dict[str, list[tuple[str, float]]] = {}
    for prompt, image, score in entries:
        by_prompt.setdefault(prompt, []).append((image, score))
    pairs = []
    for prompt, items in by_prompt.items():
        for i, (img1, s1) in enumerate(items[:-1]):
            for img2, s2 in items[i + 1 :]:
                if abs(s1 - s2) > keep_threshold:
                    pairs.append(((prompt, img2, img1) if s2 > s1 else (prompt, img1, img2), abs(s1 - s2)))
    diffs = [d for _, d in pairs]
    thresholds = np.linspace(min(diffs), max(diffs), groups)[::-1]
    stages = []
    for index_curr in range(max(groups - 1, 1)):  # update_cl stops at len(thresholds) - 2
        if len(thresholds) <= index_curr + 1:
            stages.append({p for p, _ in pairs})
        else:
            stages.append({p for p, d in pairs if d >= thresholds[index_curr + 1]})
    return stages


def test_prompts_variant_pairs_and_value_threshold_stages_by_hand(tmp_path):
    """8 pairs (B's two 0.5 images tie: no pair), gaps A: .25 .5 .25, B: 1.0 and four of .5. groups=4:
    thresholds linspace(.25, 1, 4)[::-1] = [1, .75, .5, .25]; 3 stages: gap >= .75 (1 pair), >= .5 (6), >= .25 (8).
    Count-based chunks would give [2, 4, 6, 8] instead."""
    pairs = RankedPairs(RankedDataset(RankedSource(path=str(write_lists(tmp_path / "lists.jsonl")))), min_gap=0.02)
    named = [(LISTS[i][0], LISTS[i][1][pairs.lists._entries[i].order[hi]], LISTS[i][1][pairs.lists._entries[i].order[lo]])
             for i, hi, lo in pairs.pairs]  # fmt: skip
    assert len(pairs) == 8 and sorted(pairs.gaps) == [0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert threshold_sizes(sorted(pairs.gaps, reverse=True), 4) == [1, 6, 8]
    assert threshold_sizes([0.5, 0.25], 1) == [2]  # groups <= 1: every pair from the start (L69-70)
    sampler = CurriculumSampler(pairs.gaps, 1, chunks=4, batches_per_stage=6, min_gap=0.02, stages="thresholds")
    assert sampler.sizes == [1, 6, 8] and len(sampler.sizes) == 4 - 1
    entries = [(p, img, s) for p, imgs, scores in LISTS for img, s in zip(imgs, scores, strict=True)]
    authors = authors_prompt_stages(entries, 0.02, 4)
    ours = [{named[i] for i in sampler.order[:size]} for size in sampler.sizes]
    assert ours == authors
    assert authors[0] == {("prompt B", "p1_1.png", "p1_0.png")}
    record = pairs[named.index(("prompt B", "p1_1.png", "p1_0.png"))]  # the higher score first, own seed index
    assert record.scores == [1.0, 0.0] and record.prompt == "prompt B"
    best_of_b = RankedDataset(RankedSource(path=str(tmp_path / "lists.jsonl")))[1].images[0]
    assert record.images[0].tobytes() == best_of_b.tobytes()


def test_prompts_variant_through_the_loader(tmp_path):
    """6 micro-batches of one pair per stage: stage 0 repeats the 1.0 pair, stage 1 draws each >= .5 pair once."""
    cfg = DataConfig(
        format="ranked",
        path=str(write_lists(tmp_path / "lists.jsonl")),
        resolution=32,
        hflip_prob=0.0,
        curriculum=CurriculumConfig(chunks=4, steps_per_chunk=6, min_gap=0.02, stages="thresholds"),
    )
    loader = build_loader(cfg, batch_size=1, seed=0, grad_accum=1)
    gaps = []
    for _ in range(18):
        batch, _ = loader.next_batch()
        assert batch.pixels.shape[1] == 2 and batch.scores[0, 0] > batch.scores[0, 1]
        gaps.append(round(float(batch.scores[0, 0] - batch.scores[0, 1]), 6))
    assert gaps[:6] == [1.0] * 6
    assert sorted(gaps[6:12]) == [0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert set(gaps[12:]) <= {0.25, 0.5, 1.0}
