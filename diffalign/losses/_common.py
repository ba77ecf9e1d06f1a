"""Helpers shared by the objective modules: input checks, fp32 casting, implicit accuracy, metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from diffalign.types import PairTerms


# Which PairTerms fields each REQUIRES entry stands for.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "ref": ("ref_w", "ref_l"),
    "pred": ("pred_w", "pred_l", "target_w", "target_l"),
    "gap": ("gap_w",),
    "ref_pred": ("ref_pred_w",),
}


def check_pair_terms(terms: PairTerms, requires: Iterable[str], objective: str) -> None:
    """Raise ``ValueError`` naming the first missing or mis-shaped field.

    Every error tensor must be (B,) with the shape of ``policy_w``; fields named by ``requires``
    (see ``REQUIRED_FIELDS``) must not be None.
    """
    shape = tuple(terms.policy_w.shape)
    if len(shape) != 1:
        raise ValueError(f"{objective}: terms.policy_w must be (B,) per-sample errors; got shape {shape}")
    for need in requires:
        if need not in REQUIRED_FIELDS:
            raise ValueError(f"{objective}: unknown REQUIRES entry {need!r}; known: {sorted(REQUIRED_FIELDS)}")
        for name in REQUIRED_FIELDS[need]:
            if getattr(terms, name) is None:
                raise ValueError(f"{objective} needs terms.{name} (REQUIRES {need!r}) but it is None")
    for name in ("policy_l", "ref_w", "ref_l"):
        value = getattr(terms, name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{objective}: terms.{name} has shape {tuple(value.shape)}; policy_w has {shape}")


def fp32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to fp32 (keeps autograd); losses multiply tiny error differences by thousands."""
    return tuple(t.float() for t in tensors)


def implicit_accuracy(margin: Tensor, tie: float = 0.0) -> Tensor:
    """Fraction of pairs with ``margin > 0``; an exact tie (``margin == 0``) counts as ``tie``.

    ``tie=0.0`` is the Salesforce Diffusion-DPO rule (strict ``>``); diffusers' scripts use ``tie=0.5``.
    """
    margin = margin.detach().float()
    return ((margin > 0).float() + tie * (margin == 0).float()).mean()


def detached_metrics(**values: Tensor) -> dict[str, Tensor]:
    """Detached fp32 scalars for logging; (B,) tensors are averaged over the batch."""
    return {name: value.detach().float().mean() for name, value in values.items()}


def check_finite_config(objective: str, **values: float) -> None:
    """Config validation: every named number must be finite."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{objective}: Config.{name} must be finite; got {value}")


def check_positive_beta(objective: str, beta: float) -> None:
    """Config validation: ``beta > 0``. ``beta = 0`` switches the preference term off; ``beta < 0`` reverses it."""
    if not beta > 0:
        raise ValueError(
            f"{objective}: Config.beta must be > 0 (0 switches the preference term off, < 0 reverses the "
            f"preference); got {beta}"
        )
