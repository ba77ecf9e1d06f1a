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


def test_winner_preserving_keeps_the_value_and_scales_only_the_loser_gradient():
    """Authors' --use_winner_preserving (Diffusion-SDPO train.py L1187-1191): same loss, loser grad times lam.

    One pair, C,H,W = 1,2,2 (N = 4): winner residual pred_w - target_w = 1 everywhere, loser residual 2 everywhere.
    Output-space grads g_w = 2*1/4 = 0.5, g_l = 2*2/4 = 1 per element: ||g_w||^2 = 1, <g_l, g_w> = 2 > 0, so with
    mu = 0.5: lam = (1 - 0.5) * 1 / (2 + 1e-9) = 0.25. At policy == reference u = 0 and dL/du = log(a/(1-a))/4,
    du/dpolicy_l = +0.5 beta, so dL/dpolicy_l = 0.25 * log(0.01/0.99)/4 * 1000 (plain DMPO: the same without 0.25).
    """
    target = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    terms = PairTerms(
        policy_w=torch.tensor([0.3], dtype=torch.float64, requires_grad=True),
        policy_l=torch.tensor([0.4], dtype=torch.float64, requires_grad=True),
        ref_w=torch.tensor([0.3], dtype=torch.float64),
        ref_l=torch.tensor([0.4], dtype=torch.float64),
        pred_w=torch.ones(1, 1, 2, 2, dtype=torch.float64),
        pred_l=torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64),
        target_w=target,
        target_l=target,
    )
    plain = dmpo.loss(terms, dmpo.Config(beta=2000.0, alpha=0.01))
    guarded = dmpo.loss(terms, dmpo.Config(beta=2000.0, alpha=0.01, winner_preserving=True, winner_preserving_mu=0.5))
    assert guarded.loss.item() == plain.loss.item()  # same forward value, bit for bit
    assert guarded.metrics["lambda"].item() == pytest.approx(0.25, rel=1e-8)
    g_plain = torch.autograd.grad(plain.loss, [terms.policy_w, terms.policy_l])
    g_guard = torch.autograd.grad(guarded.loss, [terms.policy_w, terms.policy_l])
    dl_du = math.log(0.01 / 0.99) / 4
    assert g_plain[1].item() == pytest.approx(dl_du * 1000.0, rel=1e-6)
    assert g_guard[1].item() == pytest.approx(0.25 * dl_du * 1000.0, rel=1e-6)
    assert g_guard[0].item() == pytest.approx(g_plain[0].item(), rel=1e-12)  # the winner's gradient is untouched
    assert dmpo.requires(dmpo.Config(winner_preserving=True)) == {"ref", "pred"}
    assert dmpo.requires(dmpo.Config()) == {"ref"}
    with pytest.raises(ValueError, match="pred_w"):  # the safeguard needs the raw predictions
        dmpo.loss(pair([0.3], [0.4], [0.3], [0.4]), dmpo.Config(winner_preserving=True))
    with pytest.raises(ValueError, match="winner_preserving_mu"):
        dmpo.Config(winner_preserving_mu=1.5)
