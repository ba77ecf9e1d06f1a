"""DMPO: Li, Xu, Dang, Ermon 2025, Divergence Minimization Preference Optimization for Diffusion Model Alignment, https://arxiv.org/abs/2507.07510.

A pure function of DPO's implicit margin: with ``u = -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))``
(``dpo.inside_term``, Salesforce convention), ``p = sigmoid(u)`` and the target ``q = clamp(1 - alpha, 1e-6, 1 - 1e-6)``::

    loss = mean_b KL(Bern(p_b) || Bern(q)) = mean_b [ p log(p / q) + (1 - p) log((1 - p) / (1 - q)) ]

with ``log p = -softplus(-u)`` and ``log(1 - p) = -softplus(u)`` for stability. Unlike DPO's ``-log p``, which keeps
pushing ``p`` to 1, this reverse KL (the paper's mode-seeking direction) is minimised at ``p = q``: the margin stops growing once the pair is ranked with confidence
``1 - alpha``.

Followed: the DMPO branch of AIDC-AI/Diffusion-SDPO@84fb241 ``train.py`` L1220-1235 (its authors' port; the DMPO
paper's own code was not found): ``p = sigmoid(inside_term)``, ``q = 1 - dmpo_alpha`` clamped at 1e-6, the
Bernoulli KL, ``.mean()``; ``inside_term`` is L1205-1206, the same ``-0.5 * beta`` as ``dpo.py``.
Defaults: ``scripts/train/sd15_dmpo.sh`` beta 2000, alpha 0.01 (``--dmpo_alpha`` defaults to 0.0 in argparse,
L421-423: q = 1 - 1e-6 after the clamp, a steep (1 - p) * log(1e6) pull); ``sdxl_dmpo.sh`` beta 6000.

``winner_preserving`` (the authors' ``--use_winner_preserving``, argparse L415-420, off by default; both DMPO
scripts switch it on with ``--winner_preserving_mu`` 0.9 for SD1.5 and 0.6 for SDXL): L1187-1191 compute the SDPO
safeguard ``lam = get_adaptive_lose_l_scale(model_pred, target, mu)`` (L84-124, ``sdpo.safeguard_lambda``) and
feed ``policy_l.detach() + lam * (policy_l - policy_l.detach())`` into the inside term for EVERY train method,
DMPO included (L1203-1206, then L1220-1235). The loss value is unchanged; only the loser's gradient is multiplied
by ``lam`` in [0, 1]. It needs the raw predictions (``requires(cfg)`` adds "pred"). ``implicit_acc`` counts ``u > 0``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.nn.functional as F

from diffalign.losses import dpo, sdpo
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
REQUIRES: frozenset[str] = frozenset({"ref"})
_Q_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: margin strength (-0.5 * beta convention; SDXL 6000). ``alpha``: target probability is 1 - alpha.
    ``winner_preserving``: scale the loser's gradient by the SDPO safeguard (authors' scripts: on);
    ``winner_preserving_mu`` in [0, 1] its margin (SD1.5 scripts 0.9, SDXL 0.6)."""

    beta: float = 2000.0
    alpha: float = 0.01
    winner_preserving: bool = False
    winner_preserving_mu: float = 0.9

    def __post_init__(self) -> None:
        check_finite_config("dmpo", beta=self.beta, alpha=self.alpha, winner_preserving_mu=self.winner_preserving_mu)
        check_positive_beta("dmpo", self.beta)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"dmpo: Config.alpha must be in [0, 1]; got {self.alpha}")
        if not 0.0 <= self.winner_preserving_mu <= 1.0:
            raise ValueError(f"dmpo: Config.winner_preserving_mu must be in [0, 1]; got {self.winner_preserving_mu}")


def requires(cfg: Config) -> frozenset[str]:
    """``REQUIRES`` plus the raw predictions and targets when the winner-preserving safeguard is on."""
    return REQUIRES | {"pred"} if cfg.winner_preserving else REQUIRES


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """DMPO loss over a batch of pairs; needs ``ref_w`` / ``ref_l`` (and ``pred_*`` / ``target_*`` when
    ``winner_preserving``)."""
    check_pair_terms(terms, requires(cfg), "dmpo")
    lam = None
    if cfg.winner_preserving:
        lam = sdpo.safeguard_lambda(terms, cfg.winner_preserving_mu)
        policy_l = terms.policy_l.float()
        terms = dataclasses.replace(terms, policy_l=policy_l.detach() + lam * (policy_l - policy_l.detach()))
    u = dpo.inside_term(terms, cfg.beta)
    q = min(max(1.0 - cfg.alpha, _Q_EPS), 1.0 - _Q_EPS)
    log_p, log_1mp = -F.softplus(-u), -F.softplus(u)
    p = log_p.exp()
    per_pair = p * (log_p - math.log(q)) + (1.0 - p) * (log_1mp - math.log1p(-q))
    policy_w, policy_l, ref_w, ref_l = fp32(terms.policy_w, terms.policy_l, terms.ref_w, terms.ref_l)
    metrics = detached_metrics(
        reward_margin=u, prob_w=p, win_diff=policy_w - ref_w, lose_diff=policy_l - ref_l, policy_err_w=policy_w
    )
    metrics["implicit_acc"] = implicit_accuracy(u, tie=0.0)
    if lam is not None:
        metrics["lambda"] = lam.detach()
    return LossOutput(loss=per_pair.mean(), metrics=metrics, samples={"reward_margin": u.detach()})
