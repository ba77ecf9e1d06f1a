"""Run means with a prompt-level bootstrap CI, paired differences, Wilson win rates, histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffalign.eval import stats


def test_mean_ci_matches_normal_theory_for_iid_prompts():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    ci = stats.mean_ci({f"p{i}": [v] for i, v in enumerate(x)})
    assert ci.mean == pytest.approx(x.mean())
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci.ci_low < ci.mean < ci.ci_high
    assert (ci.ci_high - ci.ci_low) / 2 == pytest.approx(half, rel=0.1)
    assert (ci.n_images, ci.n_prompts) == (400, 400)


def test_ci_resamples_prompts_not_images():
    """Copying every image of a prompt four times adds no information: the CI must not shrink (per-image would)."""
    x = np.random.default_rng(2).normal(size=60)
    once = stats.mean_ci({f"p{i}": [v] for i, v in enumerate(x)})
    four = stats.mean_ci({f"p{i}": [v] * 4 for i, v in enumerate(x)})
    assert four.mean == pytest.approx(once.mean)
    assert (four.ci_low, four.ci_high) == pytest.approx((once.ci_low, once.ci_high))
    assert four.n_images == 240 and four.n_prompts == 60


def test_mean_is_over_images_and_single_prompt_has_no_ci():
    ci = stats.mean_ci({"a": [1.0, 2.0, 3.0], "b": [10.0]})
    assert ci.mean == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4, not the mean of prompt means (6.0)
    one = stats.mean_ci({"a": [1.0, 3.0]})
    assert (one.mean, one.ci_low, one.ci_high, one.std) == (2.0, None, None, pytest.approx(math.sqrt(2)))


def test_bootstrap_is_reproducible():
    groups = {f"p{i}": [float(i % 7), float(i % 3)] for i in range(30)}
    assert stats.mean_ci(groups) == stats.mean_ci(groups)


def test_wilson_matches_published_values():
    # 5/10 -> [0.2366, 0.7634]; 0/10 -> [0, 0.2775]; 10/10 -> [0.7225, 1] (Wilson 1927, z = 1.96)
    assert stats.wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_win_rate_by_hand():
    a = {"p1": 3.0, "p2": 1.0, "p3": 2.0, "p4": 5.0, "only_a": 0.0}
    b = {"p1": 1.0, "p2": 2.0, "p3": 2.0, "p4": 4.0, "only_b": 9.0}
    w = stats.win_rate(a, b)
    assert (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4)
    assert w.win_rate == pytest.approx(2.5 / 4)
    assert (w.ci_low, w.ci_high) == pytest.approx(stats.wilson(0.625, 4))
    assert w.ci_low < 0.625 < w.ci_high
    rev = stats.win_rate(b, a)
    assert (rev.wins, rev.ties, rev.losses) == (1, 1, 2) and rev.win_rate == pytest.approx(1 - w.win_rate)


def test_mean_difference_is_paired_over_shared_prompts():
    a = {"p1": 3.0, "p2": 1.0, "p3": 2.0, "only_a": 100.0}
    b = {"p1": 1.0, "p2": 2.0, "p3": 2.5}
    d = stats.mean_difference(a, b)
    assert d["mean"] == pytest.approx((2.0 - 1.0 - 0.5) / 3) and d["n"] == 3
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert d["ci_low"] >= -1.0 - 1e-12 and d["ci_high"] <= 2.0 + 1e-12  # a mean of the three diffs stays within them


def test_prompt_means_and_grouping():
    groups = stats.group_by_prompt(["x", "y", "x"], [1, 5, 3])
    assert groups == {"x": [1.0, 3.0], "y": [5.0]}
    assert stats.prompt_means(groups) == {"x": 2.0, "y": 5.0}


def test_histogram_counts_and_constant_sample():
    counts, edges = stats.histogram([0.0, 0.1, 0.5, 0.9, 1.0], bins=2)
    assert counts == [2, 3] and edges == [0.0, 0.5, 1.0]
    counts, edges = stats.histogram([2.0, 2.0], bins=4)
    assert sum(counts) == 2 and edges[0] == 1.5 and edges[-1] == 2.5


def test_ci_is_the_pooled_mean_over_resampled_prompts_with_unequal_groups():
    """Against an independent cluster bootstrap: the statistic is sum / count over the drawn prompts' images.

    Ten prompts with ten images near 1 and ten with one image near 0: the pooled mean is ~0.91, the mean of
    prompt means ~0.5, so a bootstrap of prompt means would put the interval around the wrong value.
    """
    rng = np.random.default_rng(7)
    groups = {f"big{i}": list(1.0 + 0.1 * rng.normal(size=10)) for i in range(10)}
    groups |= {f"one{i}": [0.1 * rng.normal()] for i in range(10)}
    prompts = list(groups)
    draws = np.random.default_rng(12345).integers(0, len(prompts), size=(20_000, len(prompts)))
    pooled = []
    for row in draws:
        images = [x for j in row for x in groups[prompts[j]]]
        pooled.append(sum(images) / len(images))
    want_lo, want_hi = np.quantile(pooled, [0.025, 0.975])
    ci = stats.mean_ci(groups, n_boot=20_000)
    assert ci.mean == pytest.approx(np.mean([x for v in groups.values() for x in v]))
    assert ci.ci_low == pytest.approx(want_lo, abs=0.01) and ci.ci_high == pytest.approx(want_hi, abs=0.01)
    assert ci.ci_low < ci.mean < ci.ci_high
