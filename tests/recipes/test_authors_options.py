"""The authors' options of issue 23 through the offline recipe on the tiny SD1.5: KTO's mismatched reference point,
DMPO's winner-preserving safeguard, the Pick-a-Pic curriculum (human winner, reward-ordered)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.recipes.conftest import toy_overrides


def _run(recipe, tiny_dirs, tmp_path, config, *overrides, family="sd15"):
    from diffalign.models import tiny

    extra = {"run.max_steps": 2, "run.log_every": 1, "model.family": tiny.adapter_family(family)}
    return recipe.main(["--config", config, *toy_overrides(tiny_dirs[family], tmp_path / "run", **extra), *overrides])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kto_mismatched_reference_point(recipe, tiny_dirs, tmp_path, family):
    """At init policy == reference under any prompt: g = 0 and the mismatched KL = 0, so h = 1/2 and loss = 1/2."""
    result = _run(recipe, tiny_dirs, tmp_path, "toy/kto", "loss.reference_point=mismatched", family=family)
    first = result["history"][0]
    assert first["loss"] == pytest.approx(0.5, rel=1e-6) and first["loss/reference_point"] == pytest.approx(0.0)
    assert first["loss/z"] == pytest.approx(0.0, abs=1e-6) and "loss/reward_margin" in first  # item 6 diagnostics
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/z", "loss/h", "loss/reward_margin"} <= set(rows[0])  # the means reach metrics.jsonl
    assert all(math.isfinite(h["loss"]) for h in result["history"])


def test_dmpo_winner_preserving(recipe, tiny_dirs, tmp_path):
    """Same loss value at init as plain DMPO (p = 1/2 against q = 0.99); the safeguard's lambda is logged."""
    result = _run(recipe, tiny_dirs, tmp_path, "toy/dmpo", "loss.winner_preserving=true")
    first = result["history"][0]
    assert first["loss"] == pytest.approx(math.log(0.5) - 0.5 * math.log(0.99 * 0.01), rel=1e-6)
    assert 0.0 <= first["loss/lambda"] <= 1.0


def test_pickapic_curriculum_trains_on_the_human_winner(recipe, tiny_dirs, tmp_path):
    """Scores that disagree with the human label on some rows: the run trains DPO (log 2 at init) on Pick-a-Pic."""
    s0 = [0.05] * 48
    s1 = [0.05] * 48
    for row, (a, b) in {0: (0.5, 0.25), 1: (0.5, 0.375), 2: (0.25, 0.625), 4: (0.25, 0.75), 8: (0.75, 0.5)}.items():
        s0[row], s1[row] = a, b
    scores = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"image_0_score": s0, "image_1_score": s1}), scores)
    curriculum = {
        "chunks": 2, "steps_per_chunk": 1, "min_gap": 0.02, "score_floor": 0.1, "scores_path": str(scores),
        "score_columns": "[image_0_score,image_1_score]",
    }  # fmt: skip
    overrides = [f"data.curriculum.{k}={v}" for k, v in curriculum.items()]
    result = _run(recipe, tiny_dirs, tmp_path, "toy/dpo", *overrides, "optim.batch_size=2", "loss.beta=2000")
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(torch.tensor([h["loss"] for h in result["history"]])).all()


def test_per_sample_histograms_reach_tensorboard(recipe, tiny_dirs, tmp_path):
    """Item 6: KTO's per-image z and reward margin as tensorboard histograms on the logged steps (1 and 2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(recipe, tiny_dirs, tmp_path, "toy/kto", "run.report_to=[tensorboard]")
    events = sorted((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags, steps = set(), {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["histograms"]:
            tags.add(tag)
            steps[tag] = [e.step for e in acc.Histograms(tag)]
            assert all(e.histogram_value.num == 4 for e in acc.Histograms(tag))  # batch 4: one value per image
    assert {"hist/loss/z", "hist/loss/reward_margin"} <= tags
    assert steps["hist/loss/z"] == [1, 2]
