"""Diffusion-DPO: Wallace et al. 2023, Diffusion Model Alignment Using DPO, https://arxiv.org/abs/2311.12908.

Equation (paper Eq. 14 with T, the weighting and the per-element mean folded into ``beta``), per pair b::

    inside_b = -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))
    loss     = mean_b( -log sigmoid(inside_b) )                  # loss_type="sigmoid" (default)
    loss     = mean_b( relu(1 - inside_b) )                      # loss_type="hinge"

where ``policy_*`` / ``ref_*`` are per-sample mean-over-C,H,W squared denoising errors (B,) of the trained
model and the frozen reference, on the preferred (w) and rejected (l) image with shared noise and timestep.

Defaults: ``beta = 5000`` in the Salesforce convention above (official SD1.5 and SDXL runs). Conventions
elsewhere, all mapped to this ``beta``:

* diffusers SD1.5 script: ``-logsigmoid(beta_hf * ((ref_w - ref_l) - (policy_w - policy_l)))`` without the
  0.5, default 2500, so ``beta = 2 * beta_hf`` (2500 there == 5000 here); the diffusers SDXL script already
  uses this convention with 5000. Its ``hinge`` is ``relu(1 - beta_hf * logits)`` == ``relu(1 - inside)`` here.
* Diffusion-NPO: SD1.5 ``beta_dpo=500`` is in the diffusers-SD1.5 convention (use 1000 here); SDXL
  ``beta_dpo=2000`` is already in this convention (use 2000 here). NPO itself is this loss with w/l swapped.
* flow_grpo SD3.5 DPO ``beta=100`` is in this convention (velocity MSEs are larger; retune for SD3).

``implicit_acc`` counts strictly positive ``inside`` (Salesforce rule; an exact tie scores 0, where the
diffusers scripts add 0.5). Deviation: the loss is always computed in fp32 (Salesforce computes it in the
UNet's dtype); diffusers' "ipo" branch is not offered (it crashes upstream and is untested here).
"""

from __future__ import annotations

from dataclasses import dataclass

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
REQUIRES: frozenset[str] = frozenset({"ref"})
LOSS_TYPES = ("sigmoid", "hinge")


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: KL strength in the Salesforce (-0.5 * beta) convention. ``loss_type``: "sigmoid" or "hinge"."""

    beta: float = 5000.0
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        check_finite_config("dpo", beta=self.beta)
        check_positive_beta("dpo", self.beta)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo: unknown loss_type {self.loss_type!r}; choose one of {LOSS_TYPES}")


def inside_term(terms: PairTerms, beta: float) -> Tensor:
    """(B,) fp32 implicit reward margin ``-0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))``."""
    policy_w, policy_l, ref_w, ref_l = fp32(terms.policy_w, terms.policy_l, terms.ref_w, terms.ref_l)
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """Diffusion-DPO loss over a batch of pairs; needs ``ref_w`` / ``ref_l`` (reference computed under no_grad)."""
    check_pair_terms(terms, REQUIRES, "dpo")
    inside = inside_term(terms, cfg.beta)
    per_pair = -F.logsigmoid(inside) if cfg.loss_type == "sigmoid" else F.relu(1.0 - inside)
    policy_w, policy_l, ref_w, ref_l = fp32(terms.policy_w, terms.policy_l, terms.ref_w, terms.ref_l)
    metrics = detached_metrics(
        reward_margin=inside,
        policy_err_w=policy_w,
        policy_err_l=policy_l,
        ref_err_w=ref_w,
        ref_err_l=ref_l,
        win_diff=policy_w - ref_w,
        lose_diff=policy_l - ref_l,
    )
    metrics["implicit_acc"] = implicit_accuracy(inside, tie=0.0)
    return LossOutput(loss=per_pair.mean(), metrics=metrics, samples={"reward_margin": inside.detach()})
