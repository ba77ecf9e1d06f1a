"""The shared step-level loss arithmetic: the ratio clamp and the clamped-ratio loss (the DDIM transition density
it is fed is tested in ``tests/diffusion/test_transition.py``).

Hand-derived loss values (beta = 10, eps = 0.1; log(0.9) = -0.1053605, log(1.1) = 0.0953102):

    pair  log ratio w  log ratio l  clamped w    clamped l    margin = 10 (w - l)   -log sigmoid(margin)
    0     +0.05        -0.05        +0.05        -0.05        +1.0                  log(1 + e^-1)  = 0.3132617
    1     +0.50        -0.50        +0.0953102   -0.1053605   +2.0067070            log(1 + e^-2.0067070) = 0.1261309
    2      0.0          0.0          0.0          0.0          0.0                  log 2          = 0.6931472

    mean = 0.3775132
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses import _transition
from diffalign.types import PairTerms, StepTerms


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_clamp_bounds_are_log_one_minus_and_plus_eps() -> None:
    d = torch.tensor([-1.0, -0.2, -0.1, 0.0, 0.05, 0.09, 0.2, 3.0])
    got = _transition.clamped_log_ratio(d, torch.zeros_like(d), eps=0.1)
    reference = torch.log(torch.clamp(torch.exp(d), 0.9, 1.1))  # the SPO / LPO code's arithmetic
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-7)
    assert got[0].item() == pytest.approx(math.log(0.9)) and got[-1].item() == pytest.approx(math.log(1.1))
    assert got[2].item() == pytest.approx(-0.1) and got[3].item() == 0.0  # inside: unchanged


def test_clamp_gradient_is_one_inside_and_zero_outside() -> None:
    logp = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5], requires_grad=True)
    _transition.clamped_log_ratio(logp, torch.zeros(5), eps=0.1).sum().backward()
    assert logp.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_hand_derived_loss_value() -> None:
    terms = StepTerms(
        policy_w=torch.tensor([0.05, 0.5, 0.0]),
        policy_l=torch.tensor([-0.05, -0.5, 0.0]),
        ref_w=torch.zeros(3),
        ref_l=torch.zeros(3),
    )
    out = _transition.step_preference_loss(terms, beta=10.0, eps=0.1, objective="t")
    assert out.loss.item() == pytest.approx(0.3775132, abs=2e-6)
    assert out.metrics["clip_frac"].item() == pytest.approx(2 / 6)
    assert out.metrics["implicit_acc"].item() == pytest.approx(2 / 3)  # the tie scores 0
    assert out.metrics["ratio_w"].item() == pytest.approx((math.exp(0.05) + 1.1 + 1.0) / 3, abs=1e-6)


def test_on_policy_ratio_is_one_and_loss_is_exactly_log2() -> None:
    logp = _rand(16, seed=6)
    out = _transition.step_preference_loss(
        StepTerms(policy_w=logp, policy_l=logp.flip(0), ref_w=logp.clone(), ref_l=logp.flip(0).clone()),
        beta=500.0,
        eps=0.1,
        objective="t",
    )
    assert out.loss.item() == torch.tensor(math.log(2)).item()  # exactly, in fp32
    assert out.metrics["ratio_w"].item() == 1.0 and out.metrics["ratio_l"].item() == 1.0


def test_loss_does_not_depend_on_batch_size_or_how_pairs_are_batched() -> None:
    lp = [_rand(12, seed=s) * 0.05 for s in range(4)]
    terms = StepTerms(policy_w=lp[0], policy_l=lp[1], ref_w=lp[2], ref_l=lp[3])
    whole = _transition.step_preference_loss(terms, beta=500.0, eps=0.1, objective="t").loss
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    parts = []
    for idx in (perm[:5], perm[5:7], perm[7:]):
        sub = StepTerms(policy_w=lp[0][idx], policy_l=lp[1][idx], ref_w=lp[2][idx], ref_l=lp[3][idx])
        parts.append(_transition.step_preference_loss(sub, beta=500.0, eps=0.1, objective="t").loss * len(idx))
    assert torch.stack(parts).sum().item() / 12 == pytest.approx(whole.item(), rel=1e-6)


def test_huge_log_ratio_gives_finite_loss_and_zero_gradient() -> None:
    policy = torch.tensor([1e4, -1e4], requires_grad=True)
    terms = StepTerms(policy_w=policy, policy_l=torch.zeros(2), ref_w=torch.zeros(2), ref_l=torch.zeros(2))
    out = _transition.step_preference_loss(terms, beta=500.0, eps=0.1, objective="t")
    out.loss.backward()
    assert torch.isfinite(out.loss) and policy.grad.tolist() == [0.0, 0.0]


def test_bad_inputs_are_named() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"needs terms\.ref_w"):
        _transition.step_preference_loss(StepTerms(policy_w=x, policy_l=x), beta=1.0, eps=0.1, objective="spo")
    with pytest.raises(ValueError, match="policy_l has shape"):
        _transition.step_preference_loss(
            StepTerms(policy_w=x, policy_l=torch.zeros(2), ref_w=x, ref_l=x), beta=1.0, eps=0.1, objective="spo"
        )
    with pytest.raises(TypeError, match="takes StepTerms"):
        _transition.step_preference_loss(PairTerms(policy_w=x, policy_l=x), beta=1.0, eps=0.1, objective="spo")
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        _transition.check_config("spo", 10.0, 1.0)
