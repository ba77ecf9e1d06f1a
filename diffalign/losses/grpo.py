"""GRPO on SDE rollouts: Flow-GRPO (Liu et al. 2025, https://arxiv.org/abs/2505.05470), DanceGRPO (Xue et al. 2025,
https://arxiv.org/abs/2505.07818) and DDPO's PPO update (Black et al. 2023, https://arxiv.org/abs/2305.13301).

Per stored transition at one trained step, with ``r = exp(logp_policy - logp_old)`` (both mean-over-C,H,W
log-densities from ``diffalign.sampling.sde.sde_step``) and the group-relative advantage ``A``
(``diffalign.terms.advantages``)::

    policy_loss = mean_b max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range))
    kl          = mean over C,H,W of (mean_policy - mean_ref)^2 / (2 kl_scale^2)
    loss        = policy_loss + kl_coef mean_b kl

as Flow-GRPO ``scripts/train_sd3.py:880-899`` (DanceGRPO ``fastvideo/train_grpo_flux.py:589-603`` and DDPO
``scripts/train.py`` have the same policy term and no KL). ``clip_range = 1e-4`` is Flow-GRPO's and DanceGRPO's
(``config/base.py:86``; copied from DDPO, which the tiny value suits only because log-probs are per-element
means; DanceGRPO issue #47 reports ratios drifting beyond it on Wan). ``kl_coef = 0`` is Flow-GRPO's base value;
its SD3.5-M recipes use 0.01 (PickScore) or 0.04 (GenEval, OCR) (``config/grpo.py``).

**KL variance convention.** Flow-GRPO's KL is the closed-form KL of two Gaussians with equal variance, but it
divides by ``2 s^2`` with ``s = a sqrt(sigma / (1 - sigma))`` the noise *scale* of its SDE, not by the transition
variance ``s^2 (-dt)`` (``train_sd3.py:895``); its KL is therefore ``1 / (-dt)`` times the true per-step KL
(10x-40x on a 10-step grid). ``kl_scale`` carries exactly that ``s`` for flow models (so ``kl_coef`` values
transfer from Flow-GRPO) and the DDIM std itself for epsilon / v models, where the KL is the true one. The
reference means come from the same weights with the LoRA off (``adapter.reference()``), under no grad.

**GRPO-Guard** (Wang et al. 2025, arXiv 2510.22319; Flow-GRPO ``scripts/train_sd3_GRPO_Guard.py:915-919, 931-932``
and ``config/grpo_guard.py`` at yifan123/flow_grpo@9745241). ``ratio_norm``: with ``d = mean_policy - mean_old``
(the rollout's stored mean) and ``std`` the transition std (``s sqrt(-dt)``), the log-ratio is
``d.noise / std - |d|^2 / (2 std^2)``: always shifted negative and scaled by ``1 / std``, which differs from step to
step. RatioNorm removes the shift and the scale::

    b = mean_CHW(d^2) / (2 std^2)          ratio = exp(std (logp - logp_old + b))

``b`` is per sample (the authors average it over the batch, a bug they confirmed in yifan123/flow_grpo#244).
``grad_reweight``: the policy term of each row is divided by the step's ``|dt|`` (``:931-932``), so every step
weighs alike. RatioNorm holds for any Gaussian step (flow_grpo / dance_grpo SDE, DDIM on epsilon / v models);
the reweighting needs a flow grid (the recipe refuses it elsewhere); neither fits CPS's unnormalised log-prob. The authors' configs use ``clip_range`` 2e-6 (OCR,
GenEval) or 4e-6 (PickScore), lr 1e-4, ``kl_coef`` 0. The first ratio of a round is still exactly 1 (``d = 0``).

Masked rows (``terms.mask`` False: zero-std groups) count in neither the mean nor the metrics. Advantages are
used as given (``terms.advantages`` already clipped to ``adv_clip_max``). ``per_sample`` gives the (B,) loss
for recipes that sum over processes and divide by the global row count. All arithmetic is fp32. Metrics:
``clip_frac`` (``|r - 1| > clip_range``), ``approx_kl`` = ``mean 0.5 (logp - logp_old)^2`` (``train_sd3.py:901-904``),
ratio mean / min / max, ``policy_loss``, ``kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.losses._common import check_finite_config
from diffalign.types import LossOutput, PolicyTerms


TERMS = "policy"
REQUIRES: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class Config:
    """``clip_range``: PPO ratio clip half-width. ``kl_coef``: weight of the KL to the reference (0: no KL)."""

    clip_range: float = 1e-4
    kl_coef: float = 0.0
    ratio_norm: bool = False  # GRPO-Guard RatioNorm (module docstring)
    grad_reweight: bool = False  # GRPO-Guard: the policy term / |dt| of its step

    def __post_init__(self) -> None:
        check_finite_config("grpo", clip_range=self.clip_range, kl_coef=self.kl_coef)
        if not 0.0 < self.clip_range < 1.0:
            raise ValueError(f"grpo: Config.clip_range must be in (0, 1); got {self.clip_range}")
        if self.kl_coef < 0:
            raise ValueError(f"grpo: Config.kl_coef must be >= 0; got {self.kl_coef}")


def _check(terms: PolicyTerms, cfg: Config) -> None:
    if not isinstance(terms, PolicyTerms):
        raise TypeError(f"grpo is an online objective: it takes PolicyTerms, got {type(terms).__name__}")
    shape = tuple(terms.policy.shape)
    if len(shape) != 1:
        raise ValueError(f"grpo: terms.policy must be (B,) log-probabilities; got shape {shape}")
    for name in ("old", "advantages", "mask"):
        value = getattr(terms, name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"grpo: terms.{name} has shape {tuple(value.shape)}; policy has {shape}")
    if cfg.kl_coef > 0:
        for name in ("ref_mean", "policy_mean", "kl_scale"):
            if getattr(terms, name) is None:
                raise ValueError(f"grpo: kl_coef={cfg.kl_coef} needs terms.{name} (the ref pass) but it is None")
    needs = (("policy_mean", "old_mean", "step_std") if cfg.ratio_norm else ()) + (
        ("step_dt",) if cfg.grad_reweight else ()
    )
    for name in needs:
        if getattr(terms, name) is None:
            raise ValueError(f"grpo: ratio_norm / grad_reweight need terms.{name} but it is None")


def kl(terms: PolicyTerms) -> Tensor:
    """(B,) fp32 ``mean_CHW (mean_policy - mean_ref)^2 / (2 kl_scale^2)`` (see the variance convention above)."""
    diff = (terms.policy_mean.float() - terms.ref_mean.detach().float()).flatten(1)
    scale = terms.kl_scale.float().reshape(-1)
    return (diff**2).mean(dim=1) / (2 * scale**2)


def guard_log_ratio(terms: PolicyTerms) -> Tensor:
    """(B,) GRPO-Guard's normalised log-ratio ``std (logp - logp_old + b)`` (module docstring)."""
    std = terms.step_std.detach().float().reshape(-1)
    diff = (terms.policy_mean.float() - terms.old_mean.detach().float()).flatten(1)
    shift = (diff**2).mean(dim=1) / (2 * std**2)
    return std * (terms.policy.float() - terms.old.detach().float() + shift)


def per_sample(terms: PolicyTerms, cfg: Config) -> tuple[Tensor, Tensor]:
    """(B,) fp32 per-row loss (policy term plus ``kl_coef`` KL) and (B,) ratios; masked rows are 0."""
    _check(terms, cfg)
    if cfg.ratio_norm:
        ratio = torch.exp(guard_log_ratio(terms))
    else:
        ratio = torch.exp(terms.policy.float() - terms.old.detach().float())
    adv = terms.advantages.detach().float()
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    rows = torch.maximum(-adv * ratio, -adv * clipped)
    if cfg.grad_reweight:
        rows = rows / terms.step_dt.detach().float().reshape(-1)
    if cfg.kl_coef > 0:
        rows = rows + cfg.kl_coef * kl(terms)
    if terms.mask is not None:
        rows = torch.where(terms.mask.to(rows.device), rows, torch.zeros_like(rows))
    return rows, ratio


def loss(terms: PolicyTerms, cfg: Config) -> LossOutput:
    """Mean over the unmasked rows of ``per_sample`` (0 with no unmasked row), with detached metrics."""
    rows, ratio = per_sample(terms, cfg)
    mask = terms.mask.to(rows.device) if terms.mask is not None else torch.ones_like(rows, dtype=torch.bool)
    count = mask.sum().clamp_min(1)
    total = rows.sum() / count
    with torch.no_grad():
        r, log_r = ratio.detach()[mask], (terms.policy.detach().float() - terms.old.float())[mask]
        empty = r.numel() == 0
        adv = terms.advantages.detach().float()[mask]
        policy_rows = torch.maximum(-adv * r, -adv * r.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))

        def stat(x: Tensor, fn) -> Tensor:
            return torch.zeros((), device=rows.device) if empty else fn(x).float()

        metrics = {
            "policy_loss": stat(policy_rows, torch.mean),
            "clip_frac": stat(((r - 1).abs() > cfg.clip_range).float(), torch.mean),
            "approx_kl": stat(0.5 * log_r**2, torch.mean),
            "ratio": stat(r, torch.mean),
            "ratio_min": stat(r, torch.min),
            "ratio_max": stat(r, torch.max),
            "kept_frac": mask.float().mean(),
        }
        if cfg.kl_coef > 0:
            metrics["kl"] = stat(kl(terms).detach()[mask], torch.mean)
    return LossOutput(loss=total.float(), metrics=metrics)
