"""GRPO-Guard (arXiv 2510.22319): RatioNorm of the per-step log-ratio and the |dt| gradient reweighting."""

from __future__ import annotations

import pytest
import torch

from diffalign.diffusion.transition import gaussian_log_prob
from diffalign.losses import grpo
from diffalign.types import PolicyTerms


def _terms(delta_scale: float = 0.05, std: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(4, 2, 4, 4, generator=g)
    eps = torch.randn(4, 2, 4, 4, generator=g)
    delta = delta_scale * torch.randn(4, 2, 4, 4, generator=g)
    sd = torch.full((4, 1, 1, 1), std)
    x_next = old_mean + sd * eps
    policy_mean = old_mean + delta
    terms = PolicyTerms(
        policy=gaussian_log_prob(x_next, policy_mean, sd),
        old=gaussian_log_prob(x_next, old_mean, sd),
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        policy_mean=policy_mean,
        old_mean=old_mean,
        step_std=sd,
        step_dt=torch.full((4,), 0.1),
    )
    return terms, eps, delta


def test_ratio_norm_removes_the_shift_and_the_step_scale_by_hand():
    """logp - logp_old = mean(eps d) / std - mean(d^2) / (2 std^2); RatioNorm leaves std x the first term = mean(eps d)."""
    for std in (0.05, 0.3, 1.2):
        terms, eps, delta = _terms(std=std)
        got = grpo.guard_log_ratio(terms)
        torch.testing.assert_close(got, (eps * delta).flatten(1).mean(1), rtol=1e-3, atol=1e-6)
        raw = terms.policy - terms.old
        assert (raw < got / std).all()  # the raw log-ratio carries the negative shift -|d|^2 / (2 std^2)


def test_ratio_norm_is_exactly_one_on_policy_and_reweight_divides_the_policy_term_by_dt():
    terms, _, _ = _terms()
    same = PolicyTerms(**{**terms.__dict__, "policy": terms.old.clone(), "policy_mean": terms.old_mean.clone()})
    _, ratio = grpo.per_sample(same, grpo.Config(ratio_norm=True))
    assert torch.equal(ratio, torch.ones(4))
    plain, _ = grpo.per_sample(terms, grpo.Config(clip_range=0.2, ratio_norm=True))
    weighted, _ = grpo.per_sample(terms, grpo.Config(clip_range=0.2, ratio_norm=True, grad_reweight=True))
    torch.testing.assert_close(weighted, plain / 0.1)
    with pytest.raises(ValueError, match="old_mean"):
        grpo.per_sample(PolicyTerms(**{**terms.__dict__, "old_mean": None}), grpo.Config(ratio_norm=True))


def test_defaults_ignore_the_guard_terms():
    terms, _, _ = _terms()
    a, ra = grpo.per_sample(terms, grpo.Config())
    b, rb = grpo.per_sample(PolicyTerms(terms.policy, terms.old, terms.advantages), grpo.Config())
    assert torch.equal(a, b) and torch.equal(ra, rb)
