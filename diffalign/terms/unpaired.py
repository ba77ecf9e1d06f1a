"""Per-image ELBO terms for unpaired binary feedback (Diffusion-KTO): each image is a group of one.

Unlike pairs, images do NOT share noise or timestep: every image is its own group (K=1) with its own seed, so
``offline.group_errors`` draws one noise tensor and one timestep per image (as the Diffusion-KTO code does,
``train_kto_sd_v1.5.py`` L1321-1338), and the whole batch still goes through the denoiser as one policy forward
and one no-grad reference forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffalign.models.base import Adapter, Cond
from diffalign.terms.offline import group_errors
from diffalign.types import SampleInfo, UnpairedTerms


def unpaired_terms(
    adapter: Adapter,
    latents: Tensor,
    labels: Tensor,
    seeds: Sequence[int],
    *,
    prompts: Sequence[str] | None = None,
    info: Sequence[SampleInfo] | None = None,
    cond: Cond | None = None,
    need_ref: bool = True,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> UnpairedTerms:
    """Errors of B labelled images, each with its own noise and timestep.

    Args:
        latents: (B, C, h, w) or (B, 1, C, h, w) clean latents.
        labels: (B,) bool or {0, 1}: True / 1 = desirable.
        seeds: one seed per image (B,).
        reduce_sum: sums a tensor over data-parallel processes (None for one process).
    """
    if latents.dim() == 4:
        latents = latents.unsqueeze(1)
    if latents.shape[1] != 1:
        raise ValueError(f"unpaired terms need one image per row; got {latents.shape[1]}")
    errors = group_errors(adapter, latents, seeds, prompts=prompts, info=info, cond=cond, need_ref=need_ref)
    return UnpairedTerms(
        policy=errors.policy[:, 0],
        labels=torch.as_tensor(labels).to(errors.policy.device).bool().reshape(-1),
        ref=None if errors.ref is None else errors.ref[:, 0],
        timesteps=errors.timesteps,
        num_train_timesteps=adapter.process.num_train_timesteps,
        reduce_sum=reduce_sum,
    )


def labels_from_scores(scores: Tensor) -> Tensor:
    """(B, 1) or (B,) scores of unpaired records (1.0 desirable, 0.0 undesirable) -> (B,) bool labels."""
    return scores.reshape(-1) > 0.5
