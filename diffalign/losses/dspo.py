"""DSPO: Direct Score Preference Optimization for Diffusion Model Alignment, ICLR 2025, https://openreview.net/forum?id=xyfb9HHvMe (no arXiv version found).

Score matching toward the DPO-optimal score: the winner's prediction is pulled toward its target and pushed from
the reference by a weight that shrinks as the pair's DPO margin grows. Per pair b, with ``inside`` DPO's
``-0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))`` (Salesforce convention, ``dpo.py``) and
``c = 1 - sigmoid(inside)`` (with gradient)::

    form="sd15":  mean_CHW (a - beta * c * d)^2      a = pred_w - target_w,  d = pred_w - ref_pred_w
    form="sdxl":  c^2 * mean_CHW d^2    if mean_b mean_CHW d^2 >= gap_threshold (batch-level switch), else c^2
    loss = mean_b(per_pair)

Followed: huaishengzhu/DSPO@8b4e09b ``train.py``: L1141 ``model_diff_w`` = ``a``; L1159-1160 the inside term;
L1162 ``pred2`` = ``d`` (winner half of ``model_pred - ref_pred``, ref detached, L1150-1153); L1163-1167 the SDXL
form and its switch on the micro-batch mean of ``mean_CHW d^2`` at 0.1; L1169 the SD1.5 form. Gradient flows
through ``c`` (both errors of the pair) and through ``d``; the loser enters only through ``c``.
Defaults: SD1.5 ``--beta_dpo 0.001`` (``launchers/sd15.sh``; README: search {0.001, 0.01, 0.05}, best 500-1500
steps); SDXL ``--beta_dpo 5000`` with ``--sdxl`` (``launchers/sdxl.sh``; README: search 1000-5000, best 600-700
steps). The same loss is copied in AIDC-AI/Diffusion-SDPO@84fb241 ``train.py`` L1210-1218.

The scalar form over diffalign's terms (no raw tensors): with ``e = mean_CHW a^2 = policy_w``,
``r = mean_CHW (ref_pred_w - target_w)^2 = ref_w`` and ``D = mean_CHW d^2 = gap_w`` (``REQUIRES "gap"``, with
gradient), the polarisation identity ``2 a.d = |a|^2 + |d|^2 - |ref_pred - target|^2`` gives exactly::

    mean_CHW (a - beta c d)^2 = e - beta * c * (e + D - r) + beta^2 * c^2 * D

beta keeps the authors' units and the same ``-0.5 * beta`` inside as ``dpo.py``. ``implicit_acc`` counts
``inside > 0`` (authors' L1161). Diagnostics (batch means): ``weight_c`` = ``c``, ``reward_margin`` = ``inside``,
``pred_gap_w`` = ``D``.

Arithmetic order (fp32). The scalar identity is exact in real numbers but not in fp32: ``e + D - r`` (= ``2 a.d / N``,
the only path of the loser's gradient, through ``c``) is the difference of two errors near 0.09 that agree to ~1e-4,
so their rounding errors dominate it. The recipe therefore hands the SD1.5 form the raw ``pred_w``, ``target_w`` and
the reference's ``ref_pred_w`` (``requires(cfg)``: "pred", "ref_pred"; no extra memory, the reference prediction is
held for the gap anyway) and the loss is computed in the authors' order, ``mean_CHW (a - beta * c * d)^2``
(L1169), whose gradient is built from elementwise products (``tests/losses/test_dspo.py`` measures both against
fp64). The scalar form remains for callers that pass only ``(policy, ref, gap)`` scalars.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.losses import dpo
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
REQUIRES: frozenset[str] = frozenset({"ref", "gap"})
FORMS = ("sd15", "sdxl")


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: DPO strength in the inside term (SD1.5 0.001, SDXL 5000). ``form``: "sd15" or "sdxl" loss.
    ``gap_threshold``: the SDXL form's switch on the batch-mean prediction gap."""

    beta: float = 0.001
    form: str = "sd15"
    gap_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_finite_config("dspo", beta=self.beta, gap_threshold=self.gap_threshold)
        check_positive_beta("dspo", self.beta)
        if self.form not in FORMS:
            raise ValueError(f"dspo: unknown form {self.form!r}; choose one of {FORMS}")


def requires(cfg: Config) -> frozenset[str]:
    """SD1.5 form: the raw winner predictions, targets and reference predictions (authors' order); SDXL: ``gap_w``."""
    return frozenset({"ref", "pred", "ref_pred"}) if cfg.form == "sd15" else REQUIRES


def _has_raw(terms: PairTerms) -> bool:
    return all(getattr(terms, name) is not None for name in ("pred_w", "target_w", "ref_pred_w"))


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """DSPO loss over a batch of pairs; needs ``ref_*`` and either the raw winner tensors (``pred_w``, ``target_w``,
    ``ref_pred_w``; SD1.5 form, authors' order) or the winner's prediction gap ``gap_w``."""
    direct = cfg.form == "sd15" and _has_raw(terms)
    check_pair_terms(terms, {"ref"} if direct else REQUIRES, "dspo")
    inside = dpo.inside_term(terms, cfg.beta)
    c = 1.0 - torch.sigmoid(inside)
    policy_w, ref_w = fp32(terms.policy_w, terms.ref_w)
    if direct:
        pred_w, target_w, ref_pred_w = fp32(terms.pred_w, terms.target_w, terms.ref_pred_w.detach())
        a, d = pred_w - target_w, pred_w - ref_pred_w
        per_pair = (a - cfg.beta * c.view(-1, *[1] * (a.dim() - 1)) * d).pow(2).flatten(1).mean(1)
        gap = d.pow(2).flatten(1).mean(1)
        switched = torch.ones((), device=gap.device)
    elif cfg.form == "sd15":
        (gap,) = fp32(terms.gap_w)
        per_pair = policy_w - cfg.beta * c * (policy_w + gap - ref_w) + cfg.beta**2 * c.pow(2) * gap
        switched = torch.ones((), device=gap.device)
    else:
        (gap,) = fp32(terms.gap_w)
        switched = (gap.detach().mean() >= cfg.gap_threshold).float()
        per_pair = c.pow(2) * gap if bool(switched) else c.pow(2)
    metrics = detached_metrics(
        reward_margin=inside, weight_c=c, pred_gap_w=gap, policy_err_w=policy_w, ref_err_w=ref_w
    )
    metrics["implicit_acc"] = implicit_accuracy(inside, tie=0.0)
    metrics["gap_branch"] = switched.detach()
    samples = {"reward_margin": inside.detach(), "weight_c": c.detach()}
    return LossOutput(loss=per_pair.mean(), metrics=metrics, samples=samples)
