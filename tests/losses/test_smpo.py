"""SmPO: reward-scaled DPO margin, hand-derived values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses import dpo, smpo
from diffalign.types import ListTerms, PairTerms


def lists(policy, ref, scores) -> ListTerms:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return ListTerms(policy=t(policy).requires_grad_(True), ref=t(ref), scores=t(scores))


def test_probability_is_the_authors_normalised_softmax():
    cfg = smpo.Config()
    scores = torch.tensor([[25.0, 20.0]])  # diffalign PickScore units (~100 * cos)
    lo, hi = 0.11543526500463486, 0.28201571106910706
    a, b = (0.25 - lo) / (hi - lo), (0.20 - lo) / (hi - lo)
    assert smpo.preference_probability(scores, cfg).item() == pytest.approx(math.exp(a) / (math.exp(a) + math.exp(b)))


def test_hand_computed_value_and_gradient():
    terms = lists([[0.10, 0.30]], [[0.20, 0.25]], [[25.0, 20.0]])
    cfg = smpo.Config(beta=10.0)
    p = smpo.preference_probability(terms.scores, cfg).item()
    delta = (0.10 - 0.30) - (0.20 - 0.25)  # -0.15
    inside = -0.5 * 10.0 * 10.0 * (2 * p - 1) * delta
    out = smpo.loss(terms, cfg)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss, terms.policy)
    d_inside = -(1 - 1 / (1 + math.exp(-inside)))  # d(-log sigma(u))/du
    k = -0.5 * 10.0 * 10.0 * (2 * p - 1)
    assert grad.tolist()[0] == pytest.approx([d_inside * k, -d_inside * k], rel=1e-5)


def test_at_policy_equals_reference_it_is_log2_and_matches_dpo_at_the_same_effective_beta():
    terms = lists([[0.3, 0.2], [0.1, 0.4]], [[0.3, 0.2], [0.1, 0.4]], [[24.0, 21.0], [23.0, 19.0]])
    out = smpo.loss(terms, smpo.Config(beta=2000.0))
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-7)
    # a single pair: SmPO == DPO with beta' = beta * smooth * (2p - 1)
    one = lists([[0.31, 0.2]], [[0.3, 0.2]], [[24.0, 21.0]])
    cfg = smpo.Config(beta=2.0)
    p = smpo.preference_probability(one.scores, cfg).item()
    pair = PairTerms(policy_w=one.policy[:, 0], policy_l=one.policy[:, 1], ref_w=one.ref[:, 0], ref_l=one.ref[:, 1])
    expected = dpo.loss(pair, dpo.Config(beta=2.0 * 10 * (2 * p - 1))).loss.item()
    assert smpo.loss(one, cfg).loss.item() == pytest.approx(expected, rel=1e-6)


def test_equal_scores_give_no_gradient_and_k_must_be_2():
    terms = lists([[0.1, 0.3]], [[0.2, 0.2]], [[20.0, 20.0]])
    out = smpo.loss(terms, smpo.Config())
    (grad,) = torch.autograd.grad(out.loss, terms.policy)
    assert torch.all(grad == 0)
    with pytest.raises(ValueError, match="K=2"):
        smpo.loss(lists([[0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3]], [[3.0, 2.0, 1.0]]), smpo.Config())
