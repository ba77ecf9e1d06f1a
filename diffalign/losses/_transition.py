"""DDIM transition log-probabilities and the clamped-ratio step preference loss shared by SPO and LPO.

Step-level preference methods (D3PO arXiv 2311.13231, SPO arXiv 2406.04314, LPO arXiv 2502.01051) compare two
children ``x_w``, ``x_l`` of one parent ``x_t`` drawn by a stochastic DDIM step. The transition density is the
DDIM posterior (Song et al. 2021, arXiv 2010.02502, Eq. 12 and 16), with ``a_t = alphas_cumprod[t]`` and
``a_p = alphas_cumprod[prev_t]``::

    std_t^2 = eta^2 (1 - a_p) / (1 - a_t) (1 - a_t / a_p)
    mu      = sqrt(a_p) x0_hat + sqrt(1 - a_p - std_t^2) eps_hat
    log p(x_prev | x_t) = mean over C,h,w of [ -(x_prev - mu)^2 / (2 std_t^2) - log std_t - log sqrt(2 pi) ]

exactly as ``ddim_step_with_logprob`` in the SPO / LPO code (the per-element log-density is *averaged* over the
latent, not summed, which is why beta is 10 for SPO and 500 for LPO; both depend on this normalisation and on
the latent size). ``x0_hat`` / ``eps_hat`` come from the classifier-free-guided model output (CFG inside both
the policy and the reference, as ``train.cfg = True`` there). The loss, per pair::

    log r_y = log clamp(exp(logp_policy(y) - logp_ref(y)), 1 - eps, 1 + eps)      y in {w, l}
    loss    = -log sigmoid(beta log r_w - beta log r_l)

averaged over pairs. The clamp is a trust region, not PPO's min(): a child whose ratio leaves [1-eps, 1+eps]
contributes no gradient. It is applied here to the log-ratio with the bounds ``log(1 - eps)``, ``log(1 + eps)``
(asymmetric: -0.1054 and 0.0953 for eps = 0.1), which is the same function as the reference's exp -> clamp -> log
up to the rounding of the exp/log round trip, and cannot turn an overflowing ``exp`` into an ``inf * 0 = NaN``
gradient. ``-log(sigmoid(z))`` is computed as ``-logsigmoid(z)`` (same value, finite for any z; with beta=500
|z| reaches 100, where ``sigmoid`` underflows towards fp32 denormals). All of it runs in fp32.

Shapes: latents (B, C, h, w); ``a_t``, ``a_prev`` and every per-sample result (B,).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses._common import check_finite_config, check_positive_beta, detached_metrics, implicit_accuracy
from diffalign.types import LossOutput, StepTerms


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _col(x: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) fp32 on ``like``'s device."""
    return x.float().reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def ddim_std(a_t: Tensor, a_prev: Tensor, eta: float = 1.0) -> Tensor:
    """(B,) fp32 DDIM step std ``eta sqrt((1 - a_p)/(1 - a_t) (1 - a_t/a_p))`` (DDIM Eq. 16)."""
    a_t, a_prev = a_t.float(), a_prev.float()
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    return eta * variance.sqrt()


def ddim_mean_std(
    x0_hat: Tensor, eps_hat: Tensor, a_t: Tensor, a_prev: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mean (B, C, h, w) and std (B, 1, 1, 1) of the DDIM step ``x_t -> x_prev`` (DDIM Eq. 12), fp32.

    ``x0_hat`` / ``eps_hat`` are the (guided) model's clean-sample and noise estimates at ``x_t``; no clipping
    of ``x0_hat`` (the SD schedulers have ``clip_sample=False``).
    """
    std = _col(ddim_std(a_t, a_prev, eta), x0_hat)
    a_p = _col(a_prev, x0_hat)
    direction = (1.0 - a_p - std**2).clamp_min(0.0).sqrt() * eps_hat.float()
    return a_p.sqrt() * x0_hat.float() + direction, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) per-element Gaussian log-density of ``x`` under ``N(mean, std^2)``, averaged over all non-batch dims."""
    x, mean, std = x.detach().float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.flatten(1).mean(dim=1)


def transition_log_prob(
    x_prev: Tensor, x0_hat: Tensor, eps_hat: Tensor, a_t: Tensor, a_prev: Tensor, eta: float = 1.0
) -> Tensor:
    """(B,) mean-over-dims log-density of the child ``x_prev`` under the DDIM step from the model's estimates."""
    if eta <= 0:
        raise ValueError(f"the transition density needs a stochastic step (eta > 0), got eta={eta}")
    mean, std = ddim_mean_std(x0_hat, eps_hat, a_t, a_prev, eta)
    return gaussian_log_prob(x_prev, mean, std)


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
