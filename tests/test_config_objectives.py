"""Cross-field checks for the objectives of issue 11 (unpaired KTO data, positive_ratio)."""

from __future__ import annotations

import pytest

from diffalign import config


BASE = ["run.output_dir=/tmp/x", "model.path=/tmp/m"]


def test_kto_reads_pickapic_or_an_unpaired_table():
    assert config.load("toy/kto", BASE).data.positive_ratio == 0.8
    assert config.load("toy/kto", [*BASE, "data.format=unpaired"]).data.format == "unpaired"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.format=ranked"], "unpaired loss"),
        (["data.positive_ratio=1.5"], "positive_ratio=1.5"),
        (["data.streaming=true"], "map-style"),
    ],
)
def test_kto_data_problems(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("toy/kto", [*BASE, *overrides])


def test_pair_losses_reject_unpaired_options():
    with pytest.raises(config.ConfigError, match="positive_ratio"):
        config.load("toy/dpo", [*BASE, "data.positive_ratio=0.8"])
    with pytest.raises(config.ConfigError, match=r"data\.format='unpaired'"):
        config.load("toy/dpo", [*BASE, "data.format=unpaired"])


def test_curriculum_needs_scored_groups():
    cfg = config.load("toy/curriculum_dpo", BASE)
    assert (cfg.data.curriculum.chunks, cfg.data.format, cfg.loss.name) == (2, "scored_pairs", "dpo")
    with pytest.raises(config.ConfigError, match=r"data\.format='scored_pairs'"):
        config.load("toy/dpo", [*BASE, "data.curriculum.chunks=3"])
    with pytest.raises(config.ConfigError, match="steps_per_chunk"):
        config.load("toy/curriculum_dpo", [*BASE, "data.curriculum.steps_per_chunk=0"])
    with pytest.raises(config.ConfigError, match="list loss"):  # ranked lists stay for list losses
        config.load("toy/curriculum_dpo", [*BASE, "data.format=ranked"])


def test_curriculum_authors_variants():
    """Pick-a-Pic + score_columns (human winner, reward-ordered) and ranked lists + stages=thresholds (pairs)."""
    pick = [*BASE, "data.curriculum.chunks=6", "data.curriculum.score_columns=[image_0_score,image_1_score]"]
    cfg = config.load("toy/dpo", [*pick, "data.curriculum.score_floor=0.1", "data.curriculum.min_gap=0.02"])
    assert cfg.data.curriculum.score_columns == ["image_0_score", "image_1_score"] and cfg.data.format == "pickapic"
    with pytest.raises(config.ConfigError, match=r"data\.ties=drop"):
        config.load("toy/dpo", [*pick, "data.ties=keep"])
    with pytest.raises(config.ConfigError, match="score_columns"):
        config.load("toy/curriculum_dpo", [*BASE, "data.curriculum.score_columns=[a,b]"])
    with pytest.raises(config.ConfigError, match=r"need data\.curriculum\.score_columns"):
        config.load("toy/curriculum_dpo", [*BASE, "data.curriculum.score_floor=0.1"])
    ranked = config.load("toy/curriculum_dpo", [*BASE, "data.format=ranked", "data.curriculum.stages=thresholds"])
    assert ranked.loss.name == "dpo" and ranked.data.curriculum.stages == "thresholds"
    with pytest.raises(config.ConfigError, match="prompts variant"):
        config.load("toy/dpo", [*pick, "data.curriculum.stages=thresholds"])


def test_kto_mismatched_reference_point_needs_two_rows_per_micro_batch():
    assert config.load("toy/kto", [*BASE, "loss.reference_point=mismatched"]).loss.params["reference_point"]
    with pytest.raises(config.ConfigError, match="batch_size must be >= 2"):
        config.load("toy/kto", [*BASE, "loss.reference_point=mismatched", "optim.batch_size=1"])
