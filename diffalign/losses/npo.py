"""Diffusion-NPO: Wang et al., ICLR 2025, Negative Preference Optimization for diffusion, https://arxiv.org/abs/2505.11245.

Trains a NEGATIVE model (a LoRA) that prefers what people rejected: Diffusion-DPO (``dpo.py``) with winner and
loser swapped, per pair b::

    inside_b = -0.5 * beta * ((policy_l - policy_w) - (ref_l - ref_w))
    loss     = mean_b( -log sigmoid(inside_b) )

(G-U-N/Diffusion-NPO ``train_sd15.py`` / ``train_sdxl.py`` are the diffusers DPO scripts with the label flipped.)
At inference the negative model replaces only the unconditional branch of classifier-free guidance; see
``diffalign.sampling.npo``.

Betas in this project's ``-0.5 * beta`` convention (the authors' scripts mix conventions): SD1.5
``beta_dpo=500`` without the 0.5 -> ``beta = 1000`` (the default here); SDXL ``beta_dpo=2000`` with the 0.5 ->
``beta = 2000``. Both scripts: LoRA rank 8, lr 5e-6, released weights at 2k steps.

Metrics are DPO's in the flipped frame: ``*_w`` is the dataset's rejected image, and ``implicit_acc`` is the
fraction of pairs where the model now prefers the rejected one. ``pred_*`` / ``target_*`` are swapped too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffalign.losses import dpo
from diffalign.losses._common import check_finite_config, check_pair_terms, check_positive_beta
from diffalign.types import LossOutput, PairTerms


TERMS = "pair"
REQUIRES: frozenset[str] = frozenset({"ref"})


@dataclass(frozen=True, kw_only=True)
class Config:
    """``beta``: -0.5 * beta convention (SD1.5 1000, SDXL 2000). ``loss_type``: "sigmoid" or "hinge" as in dpo."""

    beta: float = 1000.0
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        check_finite_config("npo", beta=self.beta)
        check_positive_beta("npo", self.beta)
        if self.loss_type not in dpo.LOSS_TYPES:
            raise ValueError(f"npo: unknown loss_type {self.loss_type!r}; choose one of {dpo.LOSS_TYPES}")


def swap(terms: PairTerms) -> PairTerms:
    """The same terms with every winner field exchanged with its loser field."""
    return dataclasses.replace(
        terms,
        policy_w=terms.policy_l,
        policy_l=terms.policy_w,
        ref_w=terms.ref_l,
        ref_l=terms.ref_w,
        pred_w=terms.pred_l,
        pred_l=terms.pred_w,
        target_w=terms.target_l,
        target_l=terms.target_w,
    )


def loss(terms: PairTerms, cfg: Config) -> LossOutput:
    """NPO loss: ``dpo.loss`` on the swapped pair; needs ``ref_w`` / ``ref_l``."""
    check_pair_terms(terms, REQUIRES, "npo")
    return dpo.loss(swap(terms), dpo.Config(beta=cfg.beta, loss_type=cfg.loss_type))
