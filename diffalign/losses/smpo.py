"""SmPO: Lu et al., ICML 2025, Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models, https://arxiv.org/abs/2506.02698.

Diffusion-DPO whose margin is scaled per pair by how strongly a reward model prefers the winner. With the pair's
two scores ordered best first (the winner is the reward model's choice, not the human label), normalised
``s~ = (scale * s - score_min) / (score_max - score_min)``, and ``p = exp(s~_w) / (exp(s~_w) + exp(s~_l))``::

    inside = -0.5 * beta * smooth * (2p - 1) * ((policy_w - policy_l) - (ref_w - ref_l))
    loss   = mean_b( -log sigmoid(inside) )

Followed: JaydenLyh/SmPO@8922d54 ``train.py``: L729-731 the pair ordered by the PickScore label ``ps_label_0``;
L739-747 the min-max normalisation with min 0.11543526500463486 / max 0.28201571106910706 and the softmax
probability of the PickScore winner; L1061-1064 ``scale_term = -0.5 * beta_dpo * (2 * probs - 1) * 10`` and
``-logsigmoid``. Defaults: ``examples/sd15.sh`` beta 2000 (from an SFT UNet, ``--unet_init checkpoints/sd15-sft``),
``examples/sdxl.sh`` beta 5000. The noise is the policy's ReNoise inversion (``noise.kind: inversion``,
``renoise: true``, ``eta: 0``; 5 steps SD1.5, 10 SDXL): ``diffalign.terms.inversion``.

Conventions mapped: terms are ranked lists with K = 2 (``data.format: ranked``; ``scores`` (B, 2), best first),
so the reward model's winner comes first as in the authors' relabelling. ``score_scale`` multiplies the data's
scores before the normalisation: the authors' min/max (0.115-0.282) are PickScore / 100 (inferred from their
range), while ``diffalign.scorers.pickscore`` returns ``exp(logit_scale) * cos`` (~20), hence 0.01. The authors
use the first pair's probability for the whole micro-batch (a per-device batch of 1); here every pair uses its own.
``implicit_acc`` counts ``inside > 0``; a pair with equal scores has ``p = 1/2`` and no gradient. Diagnostics
(batch means): ``scale`` = ``smooth * (2p - 1)``, the per-pair factor on DPO's margin; ``prob_w``;
``reward_margin`` = ``inside``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.losses._common import check_finite_config, check_positive_beta, detached_metrics, implicit_accuracy
from diffalign.types import ListTerms, LossOutput


TERMS = "list"
REQUIRES: frozenset[str] = frozenset({"ref"})
LIST_K = 2  # lists of exactly two images (pairs with scores)


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta`` (-0.5 * beta convention; SD1.5 2000, SDXL 5000), ``smooth``: the authors' factor 10 on (2p - 1).
    ``score_scale`` / ``score_min`` / ``score_max``: the score normalisation (PickScore / 100 in the authors' code)."""

    beta: float = 2000.0
    smooth: float = 10.0
    score_scale: float = 0.01
    score_min: float = 0.11543526500463486
    score_max: float = 0.28201571106910706

    def __post_init__(self) -> None:
        check_finite_config("smpo", beta=self.beta, smooth=self.smooth, score_scale=self.score_scale)
        check_positive_beta("smpo", self.beta)
        if not self.score_max > self.score_min:
            raise ValueError(f"smpo: score_max ({self.score_max}) must exceed score_min ({self.score_min})")


def preference_probability(scores: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(B,) softmax probability of column 0 over the min-max normalised (B, 2) scores."""
    norm = (cfg.score_scale * scores.float() - cfg.score_min) / (cfg.score_max - cfg.score_min)
    return torch.softmax(norm, dim=1)[:, 0]


def loss(terms: ListTerms, cfg: Config) -> LossOutput:
    """SmPO loss over (B, 2) lists (reward-model winner first); needs ``ref`` and ``scores``."""
    if terms.ref is None:
        raise ValueError("smpo needs terms.ref (REQUIRES 'ref') but it is None")
    if terms.policy.dim() != 2 or terms.policy.shape[1] != LIST_K:
        raise ValueError(f"smpo: needs K=2 lists (pairs); terms.policy has shape {tuple(terms.policy.shape)}")
    if terms.scores.shape != terms.policy.shape:
        raise ValueError(
            f"smpo: terms.scores has shape {tuple(terms.scores.shape)}; policy has {tuple(terms.policy.shape)}"
        )
    policy, ref = terms.policy.float(), terms.ref.float()
    p = preference_probability(terms.scores, cfg).detach()
    delta = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    inside = -0.5 * cfg.beta * cfg.smooth * (2.0 * p - 1.0) * delta
    metrics = detached_metrics(
        reward_margin=inside,
        prob_w=p,
        scale=cfg.smooth * (2.0 * p - 1.0),
        policy_err_w=policy[:, 0],
        policy_err_l=policy[:, 1],
        win_diff=policy[:, 0] - ref[:, 0],
        lose_diff=policy[:, 1] - ref[:, 1],
    )
    metrics["implicit_acc"] = implicit_accuracy(inside, tie=0.0)
    samples = {"reward_margin": inside.detach(), "scale": (cfg.smooth * (2.0 * p - 1.0)).detach()}
    return LossOutput(loss=-F.logsigmoid(inside).mean(), metrics=metrics, samples=samples)
