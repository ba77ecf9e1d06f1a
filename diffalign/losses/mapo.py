"""MaPO: Hong et al. 2024, Margin-aware Preference Optimization (reference-free), https://arxiv.org/abs/2406.06424.

Reference-free: only the trained model's per-sample errors ``L_w``, ``L_l`` (B,) are used. As in the
authors' code (mapo-t2i/mapo ``utils.compute_loss``)::

    f(x)     = s * x / (exp(s * x) - 1)          # decreasing in x, f(0) = 1;  s = snr_value = 0.5
    log_odds = f(L_w) - f(L_l)                   # > 0 when the preferred image is denoised better
    ratio    = log sigmoid(T * log_odds)         # T = terms.num_train_timesteps (1000 for SD/SDXL)
    loss     = mean(L_w) - beta * mean(ratio)    # beta = 0.1; the first term is SFT on the winner

Defaults ``beta = 0.1``, ``snr_value = 0.5`` are the paper's / code's. ``f`` is evaluated stably: a
Taylor series near 0 (``f(0) = 1`` exactly, finite gradient) and ``|z| exp(-max(z,0)) / -expm1(-|z|)``
elsewhere, which never overflows. The legacy diffusers ``diffusion_orpo`` example's
``logsigmoid(L_w - L_l)`` (no ``f``, no ``T``, reversed margin sign) is NOT what is computed here.
``implicit_acc`` counts ``log_odds > 0`` strictly (a tie scores 0); ``reward_margin`` is the batch mean of
``num_train_timesteps * log_odds``, the log-sigmoid's argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses._common import (
    check_finite_config,
    check_pair_terms,
    check_positive_beta,
    detached_metrics,
    fp32,
    implicit_accuracy,
)
from diffalign.types import LossOutput, PairTerms


TERMS = "pair"
REQUIRES: frozenset[str] = frozenset()
_TAYLOR_BELOW = 1e-4


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: weight of the margin term. ``snr_value``: the scale ``s`` inside ``f``."""

    beta: float = 0.1
    snr_value: float = 0.5

    def __post_init__(self) -> None:
        check_finite_config("mapo", beta=self.beta, snr_value=self.snr_value)
        check_positive_beta("mapo", self.beta)
        if not self.snr_value > 0:  # s <= 0 makes f constant (s = 0) or increasing (s < 0): no or a reversed margin
            raise ValueError(f"mapo: Config.snr_value must be > 0; got {self.snr_value}")


def score(errors: Tensor, snr_value: float) -> Tensor:
    """f(x) = z / expm1(z) with z = snr_value * x, elementwise in fp32; f(0) = 1, no NaN in value or gradient."""
    z = snr_value * errors.float()
    small = z.abs() < _TAYLOR_BELOW
    z_safe = torch.where(small, torch.ones_like(z), z)
    a = z_safe.abs()
    # z / (e^z - 1) = a e^{-a} / (1 - e^{-a}) for z > 0, and a / (1 - e^{-a}) for z < 0 (a = |z|).
    exact = a * torch.exp(-a * (z_safe > 0).float()) / -torch.expm1(-a)
    taylor = 1.0 - z / 2.0 + z * z / 12.0
    return torch.where(small, taylor, exact)


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """MaPO loss over a batch of pairs; ``ref_*`` may be None."""
    check_pair_terms(terms, REQUIRES, "mapo")
    policy_w, policy_l = fp32(terms.policy_w, terms.policy_l)
    win_score, lose_score = score(policy_w, cfg.snr_value), score(policy_l, cfg.snr_value)
    log_odds = win_score - lose_score
    ratio = F.logsigmoid(terms.num_train_timesteps * log_odds)
    margin_loss = -cfg.beta * ratio.mean()
    total = policy_w.mean() + margin_loss
    metrics = detached_metrics(
        reward_margin=terms.num_train_timesteps * log_odds,  # the argument of MaPO's log-sigmoid
        win_score=win_score,
        lose_score=lose_score,
        margin_loss=margin_loss,
        policy_err_w=policy_w,
        policy_err_l=policy_l,
    )
    metrics["implicit_acc"] = implicit_accuracy(log_odds, tie=0.0)
    samples = {"reward_margin": (terms.num_train_timesteps * log_odds).detach()}
    return LossOutput(loss=total, metrics=metrics, samples=samples)
