"""Diffusion-DRO: Wu, Ruan, Tseng, Shuai, NeurIPS 2025, Ranking-based Preference Optimization for Diffusion Models from Implicit User Feedback, https://arxiv.org/abs/2510.18353.

Denoising Ranking Optimization (not distributionally robust): an expert image should be denoised better, relative
to the frozen reference, than the policy's own sample. Per pair b, ``w`` = an expert image noised with fresh noise
``eps_bar`` (target ``eps_bar``), ``l`` = a latent ``x_t`` from the replay buffer of the policy's own samples, whose
target is the OLD policy's predicted noise at ``(x_t, t)``; same ``t`` and prompt, different noise::

    delta_b = (policy_w - ref_w) - (policy_l - ref_l)      # = (policy_w - policy_l) - (ref_w - ref_l)
    loss    = mean_b( relu(delta_b + margin) )             # margin = 0.001; no beta

with ``policy_*`` / ``ref_*`` the per-sample mean-over-C,H,W squared errors (B,) of the trained model and the
frozen reference against those targets. The hinge is zero once the expert's error improved on the sample's by at
least ``margin``: the ranking is satisfied and the pair stops pulling.

Followed: basiclab/DiffusionDRO@b0693ec ``train.py``: L745-746 ``eps_expert = randn_like(x0_expert)``, the expert
side noised at the buffer's ``t``; L748-751 both sides in one batch, expert first; L753-758 reference errors
``losses0``, L761-763 policy errors ``losses``, mean over dims 1-3; L764-767 ``diff = (loss_expert - loss_expert0)
- (loss_policy - loss_policy0)``; L768 ``torch.maximum(diff + args.margin, 0).mean()``; L230-233 ``--margin``
default 0.001. The buffer's target: ``misc/buffer.py`` L144-146 stores ``(t, latents, noise_pred)`` per sampler
step. Where the pairs come from (sampler, buffer, snapshot, EMA) is the recipe's business: ``recipes/dro.py``.

``implicit_acc`` is the fraction of pairs already ranked (``delta < 0``); ``reward_margin`` is ``-delta`` (positive:
the expert is denoised better than the sample, relative to the reference), the quantity the hinge pushes past
``margin``; ``active`` the fraction of pairs with a non-zero hinge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.losses._common import check_finite_config, check_pair_terms, detached_metrics, fp32, implicit_accuracy
from diffalign.types import LossOutput, PairTerms


TERMS = "pair"
REQUIRES: frozenset[str] = frozenset({"ref"})
RECIPE = "dro"  # its pairs (expert, own sample; different noise) are built by recipes/dro.py only


@dataclass(frozen=True, kw_only=True)
class Config:
    """``margin``: the hinge margin on ``delta`` (authors' ``--margin`` 0.001, in units of a mean squared error)."""

    margin: float = 0.001

    def __post_init__(self) -> None:
        check_finite_config("dro", margin=self.margin)
        if self.margin < 0:
            raise ValueError(
                f"dro: Config.margin must be >= 0 (a negative margin accepts wrong rankings); got {self.margin}"
            )


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """The Diffusion-DRO hinge over (expert, own-sample) pairs; needs ``ref_w`` / ``ref_l`` (no grad)."""
    check_pair_terms(terms, REQUIRES, "dro")
    policy_w, policy_l, ref_w, ref_l = fp32(terms.policy_w, terms.policy_l, terms.ref_w, terms.ref_l)
    delta = (policy_w - ref_w) - (policy_l - ref_l)
    per_pair = F.relu(delta + cfg.margin)
    metrics = detached_metrics(
        reward_margin=-delta,
        policy_err_w=policy_w,
        policy_err_l=policy_l,
        ref_err_w=ref_w,
        ref_err_l=ref_l,
        win_diff=policy_w - ref_w,
        lose_diff=policy_l - ref_l,
        active=(per_pair > 0).to(torch.float32),
    )
    metrics["implicit_acc"] = implicit_accuracy(-delta, tie=0.0)
    return LossOutput(loss=per_pair.mean(), metrics=metrics, samples={"reward_margin": -delta.detach()})
