"""Per-image ELBO terms for unpaired binary feedback (Diffusion-KTO): each image is a group of one.

Unlike pairs, images do NOT share noise or timestep: every image is its own group (K=1) with its own seed, so
``offline.group_errors`` draws one noise tensor and one timestep per image (as the Diffusion-KTO code does,
``train_kto_sd_v1.5.py`` L1321-1338), and the whole batch still goes through the denoiser as one policy forward
and one no-grad reference forward.

``need_mismatched`` (KTO's ``bce_offset=original`` KL estimate, ``train_kto_sd_v1.5.py`` L1376-1382 and L1434-1441):
two more no-grad forwards, policy and reference, on the same noisy latents and timesteps with the prompt embeddings
rolled by one along the batch (``torch.roll(prompt_embeds, 1, 0)``: image i gets row i-1's prompt). The image's
own geometry conditioning (SDXL ``time_ids``) is not rolled (inferred: the authors' call passes no added conditions).
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
    need_mismatched: bool = False,
) -> UnpairedTerms:
    """Errors of B labelled images, each with its own noise and timestep.

    Args:
        latents: (B, C, h, w) or (B, 1, C, h, w) clean latents.
        labels: (B,) bool or {0, 1}: True / 1 = desirable.
        seeds: one seed per image (B,).
        reduce_sum: sums a tensor over data-parallel processes (None for one process).
        need_mismatched: also the no-grad policy and reference errors under prompts rolled by one.
    """
    if latents.dim() == 4:
        latents = latents.unsqueeze(1)
    if latents.shape[1] != 1:
        raise ValueError(f"unpaired terms need one image per row; got {latents.shape[1]}")
    errors = group_errors(adapter, latents, seeds, prompts=prompts, info=info, cond=cond, need_ref=need_ref)
    mismatched = None
    if need_mismatched:  # same seeds: the same noise and timestep per image, the previous row's prompt
        rolled_prompts = None if prompts is None else [*prompts[-1:], *prompts[:-1]]
        with torch.no_grad():
            mismatched = group_errors(
                adapter, latents, seeds, prompts=rolled_prompts, info=info, cond=roll_cond(cond), need_ref=True
            )
    return UnpairedTerms(
        policy=errors.policy[:, 0],
        labels=torch.as_tensor(labels).to(errors.policy.device).bool().reshape(-1),
        ref=None if errors.ref is None else errors.ref[:, 0],
        timesteps=errors.timesteps,
        num_train_timesteps=adapter.process.num_train_timesteps,
        reduce_sum=reduce_sum,
        policy_mismatched=None if mismatched is None else mismatched.policy[:, 0],
        ref_mismatched=None if mismatched is None else mismatched.ref[:, 0],
    )


GEOMETRY_KEYS = frozenset({"time_ids"})  # conditioning that describes the image, not the prompt


def roll_cond(cond: Cond | None) -> Cond | None:
    """Prompt conditioning rolled by one along the batch (row i gets row i-1's), image geometry kept."""
    if cond is None:
        return None
    return {k: v if k in GEOMETRY_KEYS else torch.roll(v, 1, 0) for k, v in cond.items()}


def labels_from_scores(scores: Tensor) -> Tensor:
    """(B, 1) or (B,) scores of unpaired records (1.0 desirable, 0.0 undesirable) -> (B,) bool labels."""
    return scores.reshape(-1) > 0.5
