"""The clamped-ratio step preference loss shared by SPO and LPO.

Step-level preference methods (D3PO arXiv 2311.13231, SPO arXiv 2406.04314, LPO arXiv 2502.01051) compare two
children ``x_w``, ``x_l`` of one parent ``x_t`` drawn by a stochastic DDIM step. Their log-densities under the
DDIM transition (``diffalign.diffusion.transition``: DDIM Eq. 12 and 16, *averaged* over the latent, not summed,
which is why beta is 10 for SPO and 500 for LPO; both depend on this normalisation and on the latent size) reach
this module as ``StepTerms`` from ``diffalign.terms.stepwise``. ``x0_hat`` / ``eps_hat`` come from the classifier-free-guided model output (CFG inside both
the policy and the reference, as ``train.cfg = True`` there). The loss, per pair::

    log r_y = log clamp(exp(logp_policy(y) - logp_ref(y)), 1 - eps, 1 + eps)      y in {w, l}
    loss    = -log sigmoid(beta log r_w - beta log r_l)

averaged over pairs. The clamp is a trust region, not PPO's min(): a child whose ratio leaves [1-eps, 1+eps]
contributes no gradient. It is applied here to the log-ratio with the bounds ``log(1 - eps)``, ``log(1 + eps)``
(asymmetric: -0.1054 and 0.0953 for eps = 0.1), which is the same function as the reference's exp -> clamp -> log
up to the rounding of the exp/log round trip, and cannot turn an overflowing ``exp`` into an ``inf * 0 = NaN``
gradient. ``-log(sigmoid(z))`` is computed as ``-logsigmoid(z)`` (same value, finite for any z; with beta=500
|z| reaches 100, where ``sigmoid`` underflows towards fp32 denormals). All of it runs in fp32.

Shapes: every per-sample term and result (B,).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses._common import check_finite_config, check_positive_beta, detached_metrics, implicit_accuracy
from diffalign.types import LossOutput, StepTerms


def clamped_log_ratio(logp: Tensor, logp_ref: Tensor, eps: float) -> Tensor:
    """``log clamp(exp(logp - logp_ref), 1 - eps, 1 + eps)``, computed as a clamp of the log-ratio. (B,) fp32."""
    return (logp.float() - logp_ref.float()).clamp(math.log1p(-eps), math.log1p(eps))


def check_step_terms(terms: StepTerms, requires: Iterable[str], objective: str) -> None:
    """Raise ``ValueError`` naming the first missing or mis-shaped field of ``terms``."""
    if not isinstance(terms, StepTerms):
        raise TypeError(f"{objective} is a step-level objective: it takes StepTerms, got {type(terms).__name__}")
    shape = tuple(terms.policy_w.shape)
    if len(shape) != 1:
        raise ValueError(f"{objective}: terms.policy_w must be (B,) log-probabilities; got shape {shape}")
    for need in requires:
        if need != "ref":
            raise ValueError(f"{objective}: unknown REQUIRES entry {need!r} for step terms; known: ['ref']")
        for name in ("ref_w", "ref_l"):
            if getattr(terms, name) is None:
                raise ValueError(f"{objective} needs terms.{name} (REQUIRES 'ref') but it is None")
    for name in ("policy_l", "ref_w", "ref_l"):
        value = getattr(terms, name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{objective}: terms.{name} has shape {tuple(value.shape)}; policy_w has {shape}")


def check_config(objective: str, beta: float, eps: float) -> None:
    """``beta`` finite and ``eps`` in (0, 1) (the clamp's lower bound ``1 - eps`` must stay positive)."""
    check_finite_config(objective, beta=beta, eps=eps)
    check_positive_beta(objective, beta)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"{objective}: Config.eps must be in (0, 1); got {eps}")


def step_preference_loss(terms: StepTerms, *, beta: float, eps: float, objective: str) -> LossOutput:
    """``mean_b -log sigmoid(beta log r_w - beta log r_l)`` with clamped ratios (see the module docstring)."""
    check_step_terms(terms, ("ref",), objective)
    log_r_w = clamped_log_ratio(terms.policy_w, terms.ref_w, eps)
    log_r_l = clamped_log_ratio(terms.policy_l, terms.ref_l, eps)
    margin = beta * log_r_w - beta * log_r_l
    per_pair = -F.logsigmoid(margin)
    raw_w = (terms.policy_w.float() - terms.ref_w.float()).detach()
    raw_l = (terms.policy_l.float() - terms.ref_l.float()).detach()
    lo, hi = math.log1p(-eps), math.log1p(eps)
    clipped = torch.cat([(raw_w < lo) | (raw_w > hi), (raw_l < lo) | (raw_l > hi)]).float()
    metrics = detached_metrics(
        reward_margin=margin,
        ratio_w=log_r_w.exp(),
        ratio_l=log_r_l.exp(),
        log_ratio_w=raw_w,
        log_ratio_l=raw_l,
        clip_frac=clipped,
        policy_logp_w=terms.policy_w,
        policy_logp_l=terms.policy_l,
    )
    metrics["implicit_acc"] = implicit_accuracy(margin, tie=0.0)
    return LossOutput(loss=per_pair.mean(), metrics=metrics)
