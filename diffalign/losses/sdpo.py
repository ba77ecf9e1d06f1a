"""Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models, https://arxiv.org/abs/2511.03317.

Diffusion-DPO whose loser gradient is scaled down whenever it would raise the winner's error (paper Sec. 4,
Eq. 15-17, Alg. 1; AIDC-AI/Diffusion-SDPO ``get_adaptive_lose_l_scale``). From the DETACHED policy predictions
``p`` and targets ``eps`` (B, C, H, W) of the whole micro-batch, with N = numel of one half::

    g_w = 2 (p_w - eps_w) / N ;  g_l = 2 (p_l - eps_l) / N     # output-space gradients of the batch-mean MSEs
    lam = clamp((1 - mu) * <g_w, g_w> / (<g_l, g_w> + 1e-9), 0, 1)   if <g_l, g_w> > 0   else 1
        = min(1, (1 - mu) * ||p_w - eps_w||^2 / <p_l - eps_l, p_w - eps_w>)   (up to the 1e-9 guard)

ONE scalar per micro-batch (winner row i paired elementwise with loser row i; they share noise), as the authors'
code does; under data parallelism each process computes its own. It keeps the winner loss from rising to first
order: ``(-grad A + lam grad B) . grad A <= -mu ||grad A||^2``. The loser error then enters DPO as
``L_l.detach() + lam * (L_l - L_l.detach())``: the forward value is exactly DPO's, only the loser's gradient
is multiplied by ``lam``. The DPO part is ``dpo.py`` (``-0.5 * beta`` convention, sigmoid).

Defaults: ``beta = 5000``, ``mu = 0.9`` (SD1.5 scripts); the SDXL scripts use ``mu = 0.6`` with the same beta.
The 1e-9 guard is kept in the official gradient units, so ``lam`` matches the authors' code, guard included.
Metrics: DPO's (``win_diff``, ``lose_diff``, ``implicit_acc``, ...) plus ``lambda``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.losses import dpo
from diffalign.losses._common import check_finite_config, check_pair_terms, check_positive_beta
from diffalign.types import LossOutput, PairTerms


TERMS = "pair"
REQUIRES: frozenset[str] = frozenset({"ref", "pred"})
_DEN_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: DPO strength (-0.5 * beta convention). ``mu`` in [0, 1]: winner-preservation margin."""

    beta: float = 5000.0
    mu: float = 0.9

    def __post_init__(self) -> None:
        check_finite_config("sdpo", beta=self.beta, mu=self.mu)
        check_positive_beta("sdpo", self.beta)
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"sdpo: Config.mu must be in [0, 1]; got {self.mu}")


def safeguard_lambda(terms: PairTerms, mu: float) -> Tensor:
    """The detached fp32 scalar ``lam`` in [0, 1] from ``pred_*`` / ``target_*`` (B, C, H, W) of the micro-batch."""
    pred_w, pred_l, target_w, target_l = (
        t.detach().float() for t in (terms.pred_w, terms.pred_l, terms.target_w, terms.target_l)
    )
    for name, value in (("pred_l", pred_l), ("target_w", target_w), ("target_l", target_l)):
        if value.shape != pred_w.shape:
            raise ValueError(f"sdpo: terms.{name} has shape {tuple(value.shape)}; pred_w has {tuple(pred_w.shape)}")
    n = pred_w.numel()
    grad_w = 2.0 * (pred_w - target_w) / n
    grad_l = 2.0 * (pred_l - target_l) / n
    num = grad_w.pow(2).sum()
    den = (grad_l * grad_w).sum()
    lam = torch.where(den > 0, (1.0 - mu) * num / (den + _DEN_EPS), torch.ones_like(den))
    return lam.clamp(0.0, 1.0)


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """SDPO loss over a micro-batch of pairs; needs ``ref_*`` and ``pred_*`` / ``target_*``."""
    check_pair_terms(terms, REQUIRES, "sdpo")
    if terms.pred_w.shape[0] != terms.policy_w.shape[0]:
        raise ValueError(
            f"sdpo: terms.pred_w has {terms.pred_w.shape[0]} rows; policy_w has {terms.policy_w.shape[0]}"
        )
    lam = safeguard_lambda(terms, cfg.mu)
    policy_l = terms.policy_l.float()
    scaled_l = policy_l.detach() + lam * (policy_l - policy_l.detach())
    out = dpo.loss(dataclasses.replace(terms, policy_l=scaled_l), dpo.Config(beta=cfg.beta))
    return LossOutput(loss=out.loss, metrics={**out.metrics, "lambda": lam}, samples=out.samples)
