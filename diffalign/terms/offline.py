"""Per-sample ELBO terms for offline preference data: pairs (K=2) and ranked lists (K>2).

All K images of a group share ONE noise draw and ONE timestep, and the whole batch goes through the
denoiser as ONE no-grad forward for the reference (the same weights with the LoRA switched off), run first, and
ONE concatenated forward for the policy. The per-sample error is mean over C,H,W of (prediction - target)^2,
computed in fp32 whatever the autocast dtype, because DPO multiplies error differences by ~2500.

Noise and timestep of a group come from a generator seeded with that group's own seed, so the draw does not
depend on how groups are split across processes or micro-batches (data-parallel runs reproduce a
single-process run, and a resumed run reproduces an uninterrupted one).

Optional, at no cost when unused: ``need_gap`` (DSPO's policy-vs-reference prediction gap), ``noise_fn`` (a noise
provider replacing the shared draw, e.g. InPO / SmPO's DDIM inversion in ``terms.inversion``: each image then has
its own noise at the group's timestep) and ``image_prompts`` (one caption per image, DCPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.models import editing
from diffalign.models.base import Adapter, Cond, repeat_cond
from diffalign.types import ListTerms, PairTerms, SampleInfo


NoiseFn = Callable[[Tensor, Tensor, Cond, list[int]], Tensor]


@dataclass(frozen=True)
class GroupErrors:
    """Shapes: ``policy``/``ref``/``gap`` (B, K) fp32; ``timesteps`` (B,); ``pred``/``target`` (B, K, C, h, w).

    ``gap``: mean over C,H,W of (policy prediction - reference prediction)^2, with gradient (DSPO).
    ``ref_pred``: (B, K, C, h, w) the reference's raw predictions (no grad), when asked for (DSPO's SD1.5 form).
    """

    policy: Tensor
    timesteps: Tensor
    ref: Tensor | None = None
    pred: Tensor | None = None
    target: Tensor | None = None
    gap: Tensor | None = None
    ref_pred: Tensor | None = None


def draw_noise(process: object, shape: Sequence[int], seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One noise tensor and one timestep per group, each from a generator seeded by the group's seed.

    Returns noise (B, *shape) fp32 and timesteps (B,) on CPU.
    """
    noises, steps = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        steps.append(process.sample_timesteps(1, generator=gen)[0])
        noises.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(noises), torch.stack(steps)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Host -> ``device`` without blocking the host: from pinned memory, asynchronously, on CUDA."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all non-batch dims of the squared error, in fp32. (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def group_errors(
    adapter: Adapter,
    latents: Tensor,
    seeds: Sequence[int],
    *,
    prompts: Sequence[str] | None = None,
    info: Sequence[SampleInfo] | None = None,
    cond: Cond | None = None,
    need_ref: bool = True,
    need_pred: bool = False,
    need_gap: bool = False,
    need_ref_pred: bool = False,
    noise_fn: NoiseFn | None = None,
    image_prompts: Sequence[Sequence[str]] | None = None,
    sources: Tensor | None = None,
) -> GroupErrors:
    """Policy (and reference) denoising errors of K latents per group under shared noise and timestep.

    Args:
        latents: (B, K, C, h, w) clean latents, most preferred first.
        seeds: one seed per group (B,).
        prompts / info: per-group prompts and geometry, encoded here; or ``cond``: per-group conditioning
            already encoded (latent cache). With a text-encoder LoRA the prompts must be given, because the
            reference pass re-encodes them with the adapters off.
        need_ref: run the no-grad reference forward (adapter disabled).
        need_pred: also return the raw policy predictions and targets (e.g. SDPO's safeguard).
        need_gap: also return the policy-vs-reference prediction gap (needs ``need_ref``; DSPO).
        need_ref_pred: also return the reference's raw predictions (needs ``need_ref``; DSPO's SD1.5 form).
        noise_fn: replaces the shared random noise, ``noise_fn(x0, t, cond, image_seeds) -> eps`` per image under
            no_grad (``diffalign.terms.inversion``: InPO / SmPO's DDIM-inversion noise); None keeps the draw.
        image_prompts: one caption per image (B lists of K), each image conditioned on its own (DCPO); replaces
            ``prompts`` for the denoiser (``info`` is shared by the group's images).
        sources: editing families: each group's source image (B, 3, H, W) in [-1, 1], encoded with the prompts (the
            source latents join the conditioning, the same for policy and reference).
    """
    b, k = latents.shape[:2]
    if len(seeds) != b:
        raise ValueError(f"need one seed per group: got {len(seeds)} seeds for {b} groups")
    device = adapter.device
    process = adapter.process
    noise, timesteps = draw_noise(process, latents.shape[2:], seeds)
    x0 = to_device(latents.flatten(0, 1), device).float()
    eps = to_device(noise.repeat_interleave(k, dim=0), device)
    timesteps = to_device(timesteps, device)
    t = timesteps.repeat_interleave(k)
    text_lora = adapter.trains_text_encoders()
    if cond is not None and text_lora:
        raise ValueError("cached prompt embeddings cannot be used with a text-encoder LoRA; disable the latent cache")
    if image_prompts is not None:  # per-image captions: encode B*K prompts, no repeat
        if cond is not None:
            raise ValueError("per-image captions cannot use cached prompt embeddings; disable the latent cache")
        prompts = [text for group in image_prompts for text in group]
        info = None if info is None else [g for g in info for _ in range(k)]
        if len(prompts) != b * k:
            raise ValueError(f"image_prompts: need {k} captions for each of {b} groups, got {len(prompts)} in all")
    per_image = image_prompts is not None

    def expand(c: Cond) -> Cond:
        return c if per_image else repeat_cond(c, k)

    if sources is not None and (cond is not None or image_prompts is not None):
        raise ValueError("source images (editing) cannot use cached prompt embeddings or per-image captions")
    policy_cond = cond if cond is not None else _encode(adapter, prompts, info, grad=text_lora, sources=sources)
    if noise_fn is not None:
        with torch.no_grad():
            eps = noise_fn(x0, t, expand(policy_cond), _image_seeds(seeds, k)).to(device, torch.float32)
    x_t = process.add_noise(x0, eps, t)
    target = process.target(x0, eps, t)
    if (need_gap or need_ref_pred) and not need_ref:
        raise ValueError("need_gap / need_ref_pred need the reference forward (need_ref=True)")

    ref = ref_pred = None
    if need_ref:  # before the policy pass: no policy activations are held while it runs (see bench/step_cost.py)
        with torch.no_grad(), adapter.reference():
            ref_cond = _encode(adapter, prompts, info, grad=False, sources=sources) if text_lora else policy_cond
            ref_pred = adapter.predict(x_t, t, expand(ref_cond))
            ref = per_sample_error(ref_pred, target).view(b, k)
        if not (need_gap or need_ref_pred):
            ref_pred = None  # freed before the policy forward
    pred = adapter.predict(x_t, t, expand(policy_cond))
    policy = per_sample_error(pred, target).view(b, k)
    gap = per_sample_error(pred, ref_pred).view(b, k) if need_gap else None
    shape = (b, k, *latents.shape[2:])
    return GroupErrors(
        policy=policy,
        timesteps=timesteps,
        ref=ref,
        pred=pred.view(shape) if need_pred else None,
        target=target.view(shape) if need_pred else None,
        gap=gap,
        ref_pred=ref_pred.view(shape) if need_ref_pred else None,
    )


def _image_seeds(group_seeds: Sequence[int], k: int) -> list[int]:
    """One seed per image (group-major), distinct from the group's noise seed (for a noise_fn's own draws)."""
    return [(int(s) * 1_000_003 + 7919 * (j + 1)) % (2**63 - 1) for s in group_seeds for j in range(k)]


def _encode(
    adapter: Adapter,
    prompts: Sequence[str] | None,
    info: Sequence[SampleInfo] | None,
    grad: bool,
    sources: Tensor | None = None,
) -> Cond:
    if prompts is None:
        raise ValueError("pass either prompts (to encode) or cond (cached prompt embeddings)")
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return editing.encode(adapter, prompts, info, sources)


def pair_terms(errors: GroupErrors, num_train_timesteps: int) -> PairTerms:
    """Split K=2 group errors into winner (column 0) and loser (column 1) terms."""
    if errors.policy.shape[1] != 2:
        raise ValueError(f"pair objectives need K=2 images per group, got K={errors.policy.shape[1]}")
    ref = errors.ref
    return PairTerms(
        policy_w=errors.policy[:, 0],
        policy_l=errors.policy[:, 1],
        ref_w=None if ref is None else ref[:, 0],
        ref_l=None if ref is None else ref[:, 1],
        timesteps=errors.timesteps,
        num_train_timesteps=num_train_timesteps,
        pred_w=None if errors.pred is None else errors.pred[:, 0],
        pred_l=None if errors.pred is None else errors.pred[:, 1],
        target_w=None if errors.target is None else errors.target[:, 0],
        target_l=None if errors.target is None else errors.target[:, 1],
        gap_w=None if errors.gap is None else errors.gap[:, 0],
        ref_pred_w=None if errors.ref_pred is None else errors.ref_pred[:, 0],
    )


def list_terms(errors: GroupErrors, scores: Tensor, num_train_timesteps: int) -> ListTerms:
    """Ranked-list terms: (B, K) errors with (B, K) preference scores (higher is better)."""
    if scores.shape != errors.policy.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != errors shape {tuple(errors.policy.shape)}")
    return ListTerms(
        policy=errors.policy,
        scores=scores.to(errors.policy.device, torch.float32),
        ref=errors.ref,
        timesteps=errors.timesteps,
        num_train_timesteps=num_train_timesteps,
    )
