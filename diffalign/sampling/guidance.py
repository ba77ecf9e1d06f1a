"""Conditioning and classifier-free guidance for the sampler loops: one helper each.

``encode_condition`` gives the (cond, uncond) pair a sampler guides with: the unconditional branch is the encoded
empty prompt (the family's ``negative_prompt``: Qwen-Image's pipelines document ``" "``), or zeros (the SDXL pipeline's ``force_zeros_for_empty_prompt``: every embedding zero, the size/crop
``time_ids`` kept). ``guided_output`` is classifier-free guidance (Ho & Salimans 2022) on the raw model output,
``u + w (c - u)`` (``Adapter.combine_guidance``; Qwen-Image renormalises it as its pipeline does), from ONE concatenated [uncond, cond] forward, as the diffusers pipelines batch it; with
``detach_uncond`` no gradient flows through the unconditional branch (Flow-GRPO ``scripts/train_sd3.py:180-195``),
which changes no value.

Shapes: latents (B, C, h, w); timesteps (B,); every ``Cond`` entry batch-first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models import editing
from diffalign.models.base import Adapter, Cond
from diffalign.types import SampleInfo


UNCOND_MODES = ("empty_prompt", "zeros")
# kept as they are in a "zeros" unconditional branch: SDXL's size/crop conditioning, and the text masks of Qwen-Image and
# Z-Image (zero embeddings at the prompt's valid positions; an all-zero Z-Image mask would leave no caption token)
MICRO_COND_KEYS = ("time_ids", "encoder_hidden_states_mask", "cap_mask", editing.SOURCE)


def default_info(adapter: Adapter, latent_hw: Sequence[int]) -> SampleInfo:
    """The geometry of an unconditioned sample of this latent size (original = target size, no crop)."""
    f = adapter.vae_scale_factor
    size = (int(latent_hw[0]) * f, int(latent_hw[1]) * f)
    return SampleInfo(original_size=size, crop_top_left=(0, 0), target_size=size)


def encode_condition(
    adapter: Adapter,
    prompts: Sequence[str],
    info: Sequence[SampleInfo],
    uncond: str,
    *,
    grad: bool = False,
    with_uncond: bool = True,
    sources: Tensor | None = None,
) -> tuple[Cond, Cond | None]:
    """(cond, uncond) for classifier-free guidance; ``uncond`` is the encoded empty prompt or zeros, or None without
    ``with_uncond`` (no CFG: the empty prompt is not encoded). ``sources``: editing families' source images
    (B, 3, H, W) in [-1, 1]; both branches see them (the edit pipelines encode the negative prompt with the image)."""
    if uncond not in UNCOND_MODES:
        raise ValueError(f"unknown uncond {uncond!r}; choices: {', '.join(UNCOND_MODES)}")
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        cond = editing.encode(adapter, prompts, info, sources)
        if not with_uncond:
            return cond, None
        if uncond == "zeros":
            empty = {k: (v if k in MICRO_COND_KEYS else torch.zeros_like(v)) for k, v in cond.items()}
        else:
            empty = editing.encode(adapter, [adapter.negative_prompt] * len(prompts), info, sources)
    return cond, empty


def guided_output(
    adapter: Adapter,
    x: Tensor,
    timesteps: Tensor,
    cond: Cond,
    uncond: Cond | None,
    guidance_scale: float,
    *,
    detach_uncond: bool = False,
) -> Tensor:
    """fp32 ``u + w (c - u)`` of the raw model output from one concatenated [uncond, cond] forward; the conditional
    output alone when ``uncond`` is None or ``w == 1`` (FLUX.1-dev: its guidance embedding instead, set on the
    adapter). ``detach_uncond``: no gradient through the unconditional branch."""
    if uncond is None or guidance_scale == 1.0:
        return adapter.predict(x, timesteps, cond).float()
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    out = adapter.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).float()
    u, c = out.chunk(2)
    if detach_uncond:
        u = u.detach()
    return adapter.combine_guidance(u, c, guidance_scale)
