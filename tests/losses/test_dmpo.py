"""DMPO: the Bernoulli KL of DPO's margin, hand-derived values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses import dmpo
from diffalign.types import PairTerms


def pair(pw, pl, rw, rl) -> PairTerms:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairTerms(policy_w=t(pw).requires_grad_(True), policy_l=t(pl), ref_w=t(rw), ref_l=t(rl))


def test_policy_equals_reference_value_and_gradient():
    """u = 0, p = 1/2: loss = log(1/2) - log(q(1-q))/2; dL/du = sigmoid'(0) log((1-q)/q) = log(alpha/(1-alpha))/4."""
    terms = pair([0.3, 0.2], [0.4, 0.1], [0.3, 0.2], [0.4, 0.1])
    out = dmpo.loss(terms, dmpo.Config(beta=2000.0, alpha=0.01))
    assert out.loss.item() == pytest.approx(math.log(0.5) - 0.5 * math.log(0.99 * 0.01), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss, terms.policy_w)
    du_dpw = -0.5 * 2000.0
    assert grad.tolist() == pytest.approx([math.log(0.01 / 0.99) / 4 * du_dpw / 2] * 2, rel=1e-5)


def test_hand_computed_value_and_minimum_at_the_target():
    # u = -0.5 * 10 * ((0.1 - 0.3) - (0.2 - 0.2)) = 1.0
    out = dmpo.loss(pair([0.1], [0.3], [0.2], [0.2]), dmpo.Config(beta=10.0, alpha=0.2))
    p, q = 1 / (1 + math.exp(-1.0)), 0.8
    assert out.loss.item() == pytest.approx(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)), rel=1e-6)
    # at u = logit(q) the KL and its gradient vanish
    u = math.log(0.8 / 0.2)
    at_q = pair([0.0], [u / 5.0], [0.0], [0.0])  # u = -0.5 * 10 * (0 - u/5) = u
    out = dmpo.loss(at_q, dmpo.Config(beta=10.0, alpha=0.2))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, at_q.policy_w)
    assert abs(grad.item()) < 1e-5


def test_gradient_pushes_the_margin_toward_the_target():
    """Below logit(q) the loss falls as u rises (dL/du < 0); above it, it rises; the loser only enters through u."""
    low, high = pair([0.2], [0.2], [0.2], [0.2]), pair([0.0], [1.0], [0.0], [0.0])  # u = 0 and u = 5
    for terms, sign in ((low, 1.0), (high, -1.0)):
        out = dmpo.loss(terms, dmpo.Config(beta=10.0, alpha=0.2))
        (grad,) = torch.autograd.grad(out.loss, terms.policy_w)  # du/dpolicy_w = -5
        assert sign * grad.item() > 0
    with pytest.raises(ValueError, match="alpha"):
        dmpo.Config(alpha=1.5)
