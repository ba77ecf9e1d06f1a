"""Diffusion-KTO: Li et al., NeurIPS 2024, Aligning Diffusion Models by Optimizing Human Utility, https://arxiv.org/abs/2404.04465.

Unpaired binary feedback: each image x (its own noise and timestep) has a label y (1 desirable, 0 not). With
the per-image errors ``policy`` / ``ref`` (B,), mean over C,H,W of the squared denoising error::

    g    = ref - policy                                   # implicit reward (log-ratio surrogate), (B,)
    KL   = clamp(mean over the GLOBAL batch of g, min=0), detached       # reference point z_0
    h    = sigmoid((2y - 1) * beta * (g - KL))
    loss = mean_b( lambda_y * (1 - h) )                   # lambda_y = lambda_d if y else lambda_u

Followed: jacklishufan/diffusion-kto@226bbd0 ``train_kto_sd_v1.5.py``:

* L1321 one noise draw per image (``randn_like(latents)``) and L1332-1338 one timestep per image (``randint(..., (bsz,))``);
  L1395-1400 per-image mean-over-C,H,W MSE; L1451-1453 ``g = -model_losses - (-ref_loss)``.
* L1459 + L1470-1471 (``bce_offset=none``, the default): ``kl = accelerator.reduce(g.mean().detach(), "mean")``
  then ``clamp(min=0).detach()`` -> ``reference_point="mean"``. L1460-1465 (``bce_offset=sigmoid``): the average of
  the desirable-class and undesirable-class means of g, not clamped -> ``reference_point="class_mean"``.
  L1466-1468 (``bce_offset=original``, commit 3c803ce "add back unpaired kto ver of kl estimate"): the KTO paper's
  mismatched-pair estimate, ``kl = accelerator.reduce(mean(ref_loss_roll - model_losses_roll).detach(), "mean")``,
  NOT clamped, where ``*_roll`` are the errors of the same noisy latents and timesteps under the prompts rolled by
  one (L1376-1382 policy under no_grad, L1434-1441 reference) -> ``reference_point="mismatched"``
  (``terms.policy_mismatched`` / ``ref_mismatched``: two extra no-grad forwards, ``requires(cfg)``). It is not the
  authors' default: ``--bce_offset`` defaults to ``none`` (L610-616) and ``exps/example.sh`` does not set it.
* L1472-1475 ``h = sigmoid((2y-1) * beta * (g - kl))`` (``halo=sigmoid``); L1488-1492 ``w_y``; L1509 ``loss = mean(w_y(1-h))``;
  L1493 ``acc``. Data: L1048-1051 policy ``gt_label_wi_l`` (an image that both won and lost counts as desirable);
  L726-741 + L1186-1189 ``WeightedRandomSampler`` with class weights ``N/count * ratio`` (``--positive_ratio``,
  0.8 in ``exps/example.sh``) -> ``data.positive_ratio``.
* Defaults: ``--beta_dpo`` 1000 (L387-391), ``--lambda_d_kto`` / ``--lambda_u_kto`` 1.0 (L394-405).

Conventions mapped: beta multiplies ``g`` with NO 0.5 factor (unlike ``dpo.py``'s ``-0.5 * beta``), and is kept in
the authors' units: beta=1000 here scales error differences as DPO's beta=2000 does. The global mean is computed
as (sum of g over all processes) / (number of images over all processes) through ``terms.reduce_sum``; the authors
average per-process means, which is the same number when every process has the same batch size (the loader's
global batches guarantee it unless bad rows are skipped). For ``class_mean`` the global per-class means are used
(the authors average per-process class means, with a 0 for a class absent on a process).
``implicit_acc`` is the fraction of images with ``(2y-1) * beta * (g - KL) > 0`` (the authors' ``acc``).
Per-image diagnostics (batch means): ``z`` = ``beta * (g - KL)``, each image's implicit reward against the reference
point; ``reward_margin`` = ``(2y-1) * z``, the sigmoid's argument (positive: on the labelled side); ``h`` the
sigmoid itself; ``reward_desirable`` / ``reward_undesirable`` the per-class means of ``g - KL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.losses._common import check_finite_config, check_positive_beta
from diffalign.types import LossOutput, UnpairedTerms


TERMS = "unpaired"
REQUIRES: frozenset[str] = frozenset({"ref"})
REFERENCE_POINTS = ("mean", "class_mean", "mismatched")


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: KTO strength (authors' units, no 0.5). ``lambda_d`` / ``lambda_u``: desirable / undesirable weights.
    ``reference_point``: "mean" (global batch mean of g, clamped >= 0; the authors' default), "class_mean" or
    "mismatched" (global mean of g under prompts rolled by one, not clamped; the authors' ``bce_offset=original``)."""

    beta: float = 1000.0
    lambda_d: float = 1.0
    lambda_u: float = 1.0
    reference_point: str = "mean"

    def __post_init__(self) -> None:
        check_finite_config("kto", beta=self.beta, lambda_d=self.lambda_d, lambda_u=self.lambda_u)
        check_positive_beta("kto", self.beta)
        if self.lambda_d < 0 or self.lambda_u < 0:
            raise ValueError(f"kto: lambda_d and lambda_u must be >= 0; got {self.lambda_d}, {self.lambda_u}")
        if self.reference_point not in REFERENCE_POINTS:
            raise ValueError(
                f"kto: unknown reference_point {self.reference_point!r}; choose one of {REFERENCE_POINTS}"
            )


def requires(cfg: Config) -> frozenset[str]:
    """``REQUIRES`` plus the mismatched-prompt errors for ``reference_point="mismatched"``."""
    return REQUIRES | {"mismatched"} if cfg.reference_point == "mismatched" else REQUIRES


def check_unpaired_terms(terms: UnpairedTerms, objective: str) -> None:
    """Raise ``ValueError`` naming a missing reference or a shape mismatch."""
    shape = tuple(terms.policy.shape)
    if len(shape) != 1:
        raise ValueError(f"{objective}: terms.policy must be (B,) per-image errors; got shape {shape}")
    if terms.ref is None:
        raise ValueError(f"{objective} needs terms.ref (REQUIRES 'ref') but it is None")
    for name in ("ref", "labels"):
        value = getattr(terms, name)
        if tuple(value.shape) != shape:
            raise ValueError(f"{objective}: terms.{name} has shape {tuple(value.shape)}; policy has {shape}")


def _global_sum(terms: UnpairedTerms, values: Tensor) -> Tensor:
    return values if terms.reduce_sum is None else terms.reduce_sum(values)


def reference_point(g: Tensor, labels: Tensor, terms: UnpairedTerms, kind: str) -> Tensor:
    """The detached scalar KL estimate from the implicit rewards ``g`` (B,) of the GLOBAL batch."""
    if kind == "mismatched":
        if terms.policy_mismatched is None or terms.ref_mismatched is None:
            raise ValueError("kto: reference_point='mismatched' needs terms.policy_mismatched / ref_mismatched")
        g_mm = (terms.ref_mismatched.float() - terms.policy_mismatched.float()).detach()
        total, count = _global_sum(terms, torch.stack([g_mm.sum(), g_mm.new_tensor(float(g_mm.numel()))])).unbind()
        return total / count
    g = g.detach()
    pos = labels.to(g.dtype)
    stats = torch.stack([g.sum(), g.new_tensor(float(g.numel())), (g * pos).sum(), pos.sum()])
    total, count, pos_sum, pos_count = _global_sum(terms, stats).unbind()
    if kind == "mean":
        return (total / count).clamp(min=0.0)
    neg_sum, neg_count = total - pos_sum, count - pos_count
    return 0.5 * (pos_sum / (pos_count + 1e-6) + neg_sum / (neg_count + 1e-6))


def loss(terms: UnpairedTerms, cfg: Config) -> LossOutput:
    """Diffusion-KTO loss over a batch of labelled images; needs ``ref`` (reference computed under no_grad)."""
    check_unpaired_terms(terms, "kto")
    policy, ref = terms.policy.float(), terms.ref.float()
    labels = terms.labels.bool()
    g = ref - policy
    kl = reference_point(g, labels, terms, cfg.reference_point)
    sign = labels.float() * 2.0 - 1.0
    scaled = sign * cfg.beta * (g - kl)
    weight = torch.where(labels, torch.full_like(g, cfg.lambda_d), torch.full_like(g, cfg.lambda_u))
    per_image = weight * (1.0 - torch.sigmoid(scaled))
    pos = labels.float()
    n_pos, n_neg = pos.sum(), (1.0 - pos).sum()
    metrics = {
        "reference_point": kl.detach(),
        "implicit_acc": (scaled.detach() > 0).float().mean(),
        "z": (cfg.beta * (g - kl)).detach().mean(),
        "reward_margin": scaled.detach().mean(),
        "h": torch.sigmoid(scaled.detach()).mean(),
        "reward_desirable": ((g.detach() - kl) * pos).sum() / (n_pos + 1e-6),
        "reward_undesirable": ((g.detach() - kl) * (1.0 - pos)).sum() / (n_neg + 1e-6),
        "frac_desirable": pos.mean(),
        "policy_err": policy.detach().mean(),
        "ref_err": ref.detach().mean(),
    }
    samples = {"z": (cfg.beta * (g - kl)).detach(), "reward_margin": scaled.detach()}
    return LossOutput(loss=per_image.mean(), metrics=metrics, samples=samples)
