"""Per-sample diagnostics (issue 23 item 6): every preference objective logs its implicit reward margin, KTO its
per-image z, DSPO its c, SmPO its per-pair scale; hand-derived batch means."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import losses
from diffalign.losses import dspo, kto, mapo, smpo
from diffalign.types import ListTerms, PairTerms, UnpairedTerms
from tests.losses.test_contract import make_terms


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("name", [n for n in losses.available() if losses.get(n).TERMS != "policy"])
def test_every_preference_objective_logs_its_implicit_reward_margin(name):
    module = losses.get(name)
    out = module.loss(make_terms(module), module.Config())
    assert "reward_margin" in out.metrics and torch.isfinite(out.metrics["reward_margin"])
    assert out.metrics["reward_margin"].dim() == 0 and not out.metrics["reward_margin"].requires_grad


def test_kto_per_image_z_by_hand():
    """g = ref - policy = [0.1, -0.05], KL = mean = 0.025; z = 10 * (g - KL) = [0.75, -0.75];
    labels [1, 0]: reward_margin = [0.75, 0.75]; h = sigmoid(0.75) for both."""
    terms = UnpairedTerms(
        policy=torch.tensor([0.4, 0.55], dtype=torch.float64),
        ref=torch.tensor([0.5, 0.5], dtype=torch.float64),
        labels=torch.tensor([True, False]),
    )
    m = kto.loss(terms, kto.Config(beta=10.0)).metrics
    assert m["z"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["reward_margin"].item() == pytest.approx(0.75, rel=1e-6)
    assert m["h"].item() == pytest.approx(sig(0.75), rel=1e-6)


def test_dspo_c_and_smpo_scale_and_mapo_margin_by_hand():
    e = torch.tensor([0.2, 0.4])
    pair = PairTerms(policy_w=e, policy_l=e + 0.1, ref_w=e, ref_l=e + 0.1, gap_w=torch.zeros(2))
    assert dspo.loss(pair, dspo.Config()).metrics["weight_c"].item() == pytest.approx(0.5)  # policy == ref: c = 1/2
    scores = torch.tensor([[25.0, 20.0], [22.0, 22.0]])
    lists = ListTerms(policy=torch.rand(2, 2), ref=torch.rand(2, 2), scores=scores)
    p = smpo.preference_probability(scores, smpo.Config())
    assert p[1].item() == pytest.approx(0.5)  # equal scores: scale 0
    m = smpo.loss(lists, smpo.Config()).metrics
    assert m["scale"].item() == pytest.approx(10.0 * (2 * p[0].item() - 1) / 2, rel=1e-6)
    pair = PairTerms(policy_w=torch.tensor([0.1]), policy_l=torch.tensor([0.3]), num_train_timesteps=1000)
    cfg = mapo.Config()
    log_odds = mapo.score(pair.policy_w, cfg.snr_value) - mapo.score(pair.policy_l, cfg.snr_value)
    m = mapo.loss(pair, cfg).metrics
    assert m["reward_margin"].item() == pytest.approx(1000 * log_odds.item(), rel=1e-6)


@pytest.mark.parametrize("name", [n for n in losses.available() if losses.get(n).TERMS not in ("policy", "step")])
def test_per_sample_values_for_histograms_average_to_the_logged_means(name):
    """``LossOutput.samples`` holds one detached value per pair / image / ranked pair; its mean is the metric."""
    module = losses.get(name)
    out = module.loss(make_terms(module), module.Config())
    for key, values in out.samples.items():
        assert values.dim() == 1 and not values.requires_grad
        assert values.mean().item() == pytest.approx(out.metrics[key].item(), rel=1e-5, abs=1e-7)
    assert "reward_margin" in out.samples
    extra = {"kto": "z", "dspo": "weight_c", "smpo": "scale"}.get(name)
    assert extra is None or extra in out.samples
