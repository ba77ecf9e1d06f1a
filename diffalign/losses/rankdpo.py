"""RankDPO: Karthik et al. 2024, Scalable Ranked Preference Optimization for T2I, https://arxiv.org/abs/2410.18013.

Listwise Diffusion-DPO with DCG pair weights (paper Eq. 5-7). Per prompt b: K candidates sharing one noise
draw and one timestep, per-sample errors ``policy``/``ref`` (B, K) and preference scores ``phi`` (B, K)::

    s_i       = policy_i - ref_i                                   # Eq. 5; lower = better than the reference
    tau_i     = 1 + #{j : phi_j > phi_i}                           # rank, 1 = best
    G_i       = 2^phi_i - 1 ;  D(tau) = log_base(1 + tau)
    Delta_ij  = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|            # Eq. 6
    loss_b    = -sum_{phi_i > phi_j} Delta_ij * log sigmoid(-0.5 * beta * (s_i - s_j))   # Eq. 7
    loss      = mean_b(loss_b)          # reduction="mean" first divides loss_b by its number of ordered pairs

Choices the paper leaves open, made here:

* ``beta`` carries the same ``-0.5`` as ``dpo.py`` (the paper writes ``-beta``), so for K=2 the loss is exactly
  Diffusion-DPO with the same ``beta``, weighted per prompt by ``|G_w - G_l| * (1/D(1) - 1/D(2))`` (paper App.
  A.2, "DPO + gain weights"). Default 5000, the Diffusion-DPO value; the paper does not state its value.
* ``log_base = 2`` (LambdaLoss / LiPO / NDCG convention; the paper writes ``log``). Since
  ``1/log_b(x) = ln(b)/ln(x)``, the base only rescales every weight by ``ln(b)``.
* ``reduction = "sum"`` over pairs, as in Eq. 7; ``"mean"`` divides by the number of ordered pairs of the prompt.
* Ties: a pair with equal scores is not an ordered pair (its gain difference, hence Delta, is 0), and tied items
  share the best rank of their group (competition ranking, "1224"), so the loss does not depend on the order of
  the list. Without ties this is the plain 1..K ranking.

The paper's scores are win fractions in [0, 1]; the gain ``2^phi - 1`` is scale-sensitive, so raw reward scores
on another scale change the weights. Metrics are over ordered pairs: ``ranking_acc`` counts ``s_i < s_j``
strictly (a tie scores 0), ``mean_weight`` is the mean Delta, ``reward_margin`` the mean ``-0.5 beta (s_i - s_j)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses._common import check_finite_config, check_positive_beta, detached_metrics, fp32
from diffalign.types import ListTerms, LossOutput


TERMS = "list"
REQUIRES: frozenset[str] = frozenset({"ref"})
REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: KL strength, -0.5 * beta convention of dpo.py. ``log_base``: base of D. ``reduction``: over pairs."""

    beta: float = 5000.0
    log_base: float = 2.0
    reduction: str = "sum"

    def __post_init__(self) -> None:
        check_finite_config("rankdpo", beta=self.beta, log_base=self.log_base)
        check_positive_beta("rankdpo", self.beta)
        if self.log_base <= 1.0:
            raise ValueError(f"rankdpo: Config.log_base must be > 1; got {self.log_base}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"rankdpo: unknown reduction {self.reduction!r}; choose one of {REDUCTIONS}")


def check_list_terms(terms: ListTerms) -> None:
    """Raise ``ValueError`` naming the field: (B, K) errors and scores, K >= 2, reference present, finite scores."""
    shape = tuple(terms.policy.shape)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"rankdpo: terms.policy must be (B, K) with K >= 2; got shape {shape}")
    if terms.ref is None:
        raise ValueError("rankdpo needs terms.ref (REQUIRES 'ref') but it is None")
    for name in ("ref", "scores"):
        if tuple(getattr(terms, name).shape) != shape:
            raise ValueError(
                f"rankdpo: terms.{name} has shape {tuple(getattr(terms, name).shape)}; policy has {shape}"
            )
    bad = (~torch.isfinite(terms.scores)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rankdpo: terms.scores has non-finite values in rows {bad}")


def pair_weights(scores: Tensor, log_base: float) -> tuple[Tensor, Tensor]:
    """(B, K) scores -> Delta (B, K, K) fp32 and the mask ``above[b, i, j] = phi_i > phi_j`` (B, K, K) bool."""
    scores = scores.detach().float()
    above = scores.unsqueeze(2) > scores.unsqueeze(1)
    rank = 1 + above.transpose(1, 2).sum(dim=2)
    inv_discount = math.log(log_base) / torch.log1p(rank.float())
    gain = torch.exp2(scores) - 1.0
    delta = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs() * (
        inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)
    ).abs()
    return delta * above, above


def loss(terms: ListTerms, cfg: Config) -> LossOutput:
    """RankDPO loss over a batch of ranked lists; needs ``ref`` (reference computed under no_grad)."""
    check_list_terms(terms)
    policy, ref = fp32(terms.policy, terms.ref)
    delta, above = pair_weights(terms.scores, cfg.log_base)
    s = policy - ref
    inside = -0.5 * cfg.beta * (s.unsqueeze(2) - s.unsqueeze(1))
    per_prompt = (-F.logsigmoid(inside) * delta).sum(dim=(1, 2))
    pairs_per_prompt = above.sum(dim=(1, 2)).float()
    if cfg.reduction == "mean":
        per_prompt = per_prompt / pairs_per_prompt.clamp(min=1.0)
    n_pairs = pairs_per_prompt.sum().clamp(min=1.0)
    metrics = detached_metrics(policy_err=policy, ref_err=ref, policy_minus_ref=s, pairs_per_prompt=pairs_per_prompt)
    metrics["ranking_acc"] = ((inside.detach() > 0) & above).sum() / n_pairs
    metrics["mean_weight"] = delta.sum() / n_pairs
    metrics["reward_margin"] = (inside.detach() * above).sum() / n_pairs
    return LossOutput(loss=per_prompt.mean(), metrics=metrics, samples={"reward_margin": inside.detach()[above]})
