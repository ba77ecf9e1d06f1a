"""Shared parts of the step-aware scorers (``spm``: SPO's step-aware preference model, ``lrm``: LPO's latent reward
model): the common call interface, PickScore's pairwise loss, pairwise accuracy, label helpers and checks.

Interface every step-aware scorer provides (the step-wise pair mining of ``diffalign.terms.stepwise`` calls it)::

    scorer(latents (B, C, h, w), timesteps (B,), prompts: list[str], *, adapter) -> (B,) fp32, higher = preferred
    scorer.save_pretrained(dir);  module.load(path, *, adapter=None, device, dtype) -> scorer
    scorer.name, scorer.variant

``latents`` are noisy latents at ``timesteps`` in model units (DDPM indices for SD1.5/SDXL, ``sigma * 1000`` for
SD3), i.e. what the sampler holds after a step, scaled like the adapter's ``encode_images`` output.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


if TYPE_CHECKING:
    from diffalign.types import SampleInfo


@runtime_checkable
class StepScorer(Protocol):
    """A scorer of noisy latents at a timestep (see the module docstring)."""

    name: str
    variant: str

    def __call__(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Any) -> Tensor: ...

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path: ...


def check_step_inputs(latents: Tensor, timesteps: Tensor | float | int, prompts: Any) -> Tensor:
    """Validate a scorer call; returns ``timesteps`` as a (B,) tensor on the latents' device."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a float (B, C, h, w) tensor, got {shape}")
    n = latents.shape[0]
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings (one per latent), got {type(prompts).__name__}")
    if len(prompts) != n:
        raise ValueError(f"got {n} latents but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not str")
    t = torch.as_tensor(timesteps, device=latents.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"timesteps must be a scalar or shape ({n},), got {tuple(t.shape)}")
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"timesteps must be >= 0, got min {float(t.min())}")
    return t


def default_info(latents: Tensor, vae_scale_factor: int) -> list[SampleInfo]:
    """Uncropped SDXL micro-conditioning for latents of this size: original = target = pixel size, crop (0, 0)."""
    from diffalign.types import SampleInfo

    size = (latents.shape[-2] * vae_scale_factor, latents.shape[-1] * vae_scale_factor)
    return [SampleInfo(original_size=size, crop_top_left=(0, 0), target_size=size) for _ in range(latents.shape[0])]


def cat_cond(*conds: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate conditioning dicts along the batch dimension, key by key."""
    return {key: torch.cat([c[key] for c in conds], dim=0) for key in conds[0]}


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022)."""
    return uncond + scale * (cond - uncond)


# ---- labels, loss, accuracy ------------------------------------------------------------------------------------


def pair_labels(scores: Tensor | None, n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n, 2) soft labels of winner-first pairs: the batch's Pick-a-Pic scores ([1, 0] or [0.5, 0.5]) or [1, 0]."""
    if scores is None:
        return torch.tensor([[1.0, 0.0]], device=device).expand(n, 2).clone()
    labels = scores.to(device=device, dtype=torch.float32)
    if labels.shape != (n, 2):
        raise ValueError(f"pair scores must have shape ({n}, 2), got {tuple(labels.shape)}")
    if not torch.allclose(labels.sum(-1), torch.ones(n, device=labels.device)) or bool((labels < 0).any()):
        bad = [i for i, row in enumerate(labels.tolist()) if min(row) < 0 or abs(sum(row) - 1) > 1e-6]
        raise ValueError(f"pair labels must be non-negative and sum to 1; rows {bad[:5]} do not")
    return labels


def pseudo_labels(scores_0: Tensor, scores_1: Tensor, margin: float) -> Tensor:
    """Labels from a scorer: softmax([s0, s1]); a probability gap above ``margin`` decides the pair, else a tie.

    SPO's SDXL step-aware preference model is trained on these PickScore pseudo-labels with margin 0.1
    (``SPMTaskConfig.use_pickscore_label``, ``update_as_pickscore_label``). Returns (B, 2).
    """
    p = torch.softmax(torch.stack([scores_0.float(), scores_1.float()], dim=-1), dim=-1)
    gap = p[:, 0] - p[:, 1]
    labels = torch.full_like(p, 0.5)
    labels[gap > margin] = torch.tensor([1.0, 0.0], device=p.device)
    labels[gap < -margin] = torch.tensor([0.0, 1.0], device=p.device)
    return labels


def pairwise_loss(scores_0: Tensor, scores_1: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """PickScore's pairwise objective, used by both SPO's SPM and LPO's LRM trainers (scalar, fp32).

    Per pair: ``-(y0 log p0 + y1 log p1) + [tie] log 0.5`` with ``p = softmax([s0, s1])``, so a tie
    (y = 0.5/0.5) scored equal costs 0 like a decided pair scored with certainty (Kirstain et al. 2023,
    ``trainer/criterions/clip_criterion.py``; no in-batch negatives). Pairs are averaged with ``weights``
    normalised to sum 1 (PickScore weights by 1 / num_examples_per_prompt; uniform when None).

    Shapes: scores (B,), labels (B, 2), weights (B,) or None.
    """
    logits = torch.stack([scores_0.float(), scores_1.float()], dim=-1)
    log_p = F.log_softmax(logits, dim=-1)
    labels = labels.to(log_p)
    per_pair = -(labels * log_p).sum(-1)
    per_pair = per_pair + (labels[:, 0] == labels[:, 1]).to(log_p) * math.log(0.5)
    w = torch.ones_like(per_pair) if weights is None else weights.to(per_pair)
    return (per_pair * (w / w.sum())).sum()


def pairwise_accuracy(scores_0: Tensor, scores_1: Tensor, labels: Tensor) -> Tensor:
    """PickScore / SPO credit per pair (B,): y0 if s0 > s1, y1 if s1 > s0, 0 on an exact score tie.

    A decided pair scores 1 or 0; a labelled tie scores 0.5 whichever image wins.
    """
    labels = labels.to(scores_0.device, torch.float32)
    return (scores_0 > scores_1).float() * labels[:, 0] + (scores_0 < scores_1).float() * labels[:, 1]


# ---- folders -----------------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a saved {what} folder: {path.name} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def check_format(meta: dict[str, Any], expected: str, path: Path) -> None:
    found = meta.get("format")
    if found != expected:
        raise ValueError(f"{path}: format is {found!r}, expected {expected!r}")


def strict_load(module: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the missing and unexpected keys and the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: missing keys {missing[:8]} (of {len(missing)}), unexpected keys "
            f"{unexpected[:8]} (of {len(unexpected)})"
        )
    shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


# ---- the denoiser's clean-sample estimate --------------------------------------------------------------------------


@torch.no_grad()
def predict_x0(
    adapter: Any,
    latents: Tensor,
    timesteps: Tensor,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    info: Sequence[SampleInfo] | None = None,
) -> Tensor:
    """x0_hat of noisy ``latents`` (B, C, h, w) at ``timesteps`` (B,) from the adapter's denoiser with CFG.

    One forward over ``[uncond; cond]`` (empty-prompt negative, as the SD pipelines and SPO's SPM trainer use),
    ``eps = eps_u + g (eps_c - eps_u)`` (``guidance_scale=1`` skips the unconditional half), then the forward
    process's ``pred_x0`` (epsilon, v or flow velocity, whatever the checkpoint predicts). fp32 result.
    """
    n = latents.shape[0]
    info = list(info) if info is not None else default_info(latents, adapter.vae_scale_factor)
    cond = adapter.encode_prompts(list(prompts), info)
    if guidance_scale == 1.0:
        out = adapter.predict(latents, timesteps, cond).float()
    else:
        uncond = adapter.encode_prompts([""] * n, info)
        both = adapter.predict(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), cat_cond(uncond, cond)
        ).float()
        out_u, out_c = both.chunk(2)
        out = guided(out_c, out_u, guidance_scale)
    return adapter.process.pred_x0(latents.float(), out, timesteps).float()
