"""Step-level preference pairs (SPO / LPO): mining them with the policy's sampler, and their transition terms.

**Mining** (``mine``; SPO arXiv 2406.04314 Sec. 3-4, LPO arXiv 2502.01051 Sec. 4; research note
``step-level-and-peers.md`` 1.2, 1.5, 2.3, 2.6). The policy (LoRA on) samples each prompt with DDIM, eta = 1,
classifier-free guidance ``u + w (c - u)`` on the raw model output. At a branching step (index >= ``branch_start``;
SPO 4 of 20, i.e. t <= 751; LPO 0) the guided model runs once on the parent ``x_t``, and ``K`` children
``x_{t-1} = mu + std z_k`` are drawn around the same DDIM mean with independent noise. A *step-aware scorer*
scores the K children at the child's timestep (``score_timestep="parent"`` gives the parent's, which is what LPO's
code passes its latent reward model). With best / worst child ``w`` / ``l`` and ``p = softmax([s_w, s_l])``, the pair
``(x_t, t, prev_t, x_w, x_l, prompt)`` is kept when ``p_w - p_l > threshold`` (strictly, as in both codes): a
constant (SPO: 0.3 SD1.5, 0.4 SDXL) or the step's DDIM std mapped linearly onto ``[threshold_min, threshold_max]``
over the sampling grid (LPO: [0.35, 0.5] SD1.5, [0.45, 0.6] SDXL; larger noise -> larger threshold). Sampling then
continues from a child drawn uniformly at random (SPO Tab. 4: random beats continuing from the winner). Not done:
SPO-SDXL's "inner steps" (MSPO, each child rolled 3 more steps before scoring).

Randomness of each prompt (initial noise, children noise, continuation choice) comes from a generator seeded with
that prompt's own seed, so mining is deterministic given the seeds and does not depend on batch composition.
The timestep grid is DDIM's "leading" spacing with the checkpoint's ``steps_offset`` (SD: 951, 901, ..., 1 for 20
steps); the last step goes to timestep 0 (``alphas_cumprod[0]``, the SPO code's clamp).

**Scorers.** Anything with ``scorer(latents, timesteps, prompts, *, adapter) -> (B,)``; latents are the children.
SPO-style scorers decode an x0-prediction (``DecodedScorer`` wraps any ``diffalign.scorers`` image scorer; the
SPM lives in ``diffalign.scorers.spm``); LPO-style ones read latents directly (``diffalign.scorers.lrm``). Toy,
deterministic ones for tests and benches: ``LinearLatentScorer`` and ``DecodedScorer(PixelLinearScorer())``.

**Terms** (``step_terms``): one guided policy forward on the parent (LoRA on, with grad) and one no-grad reference
forward (LoRA off) give the DDIM means; both children of a pair are scored under the same mean, so one forward per
pair serves both. The log-density arithmetic is ``diffalign.diffusion.transition``; the conditioning, CFG, grid and
noise helpers are ``diffalign.sampling``'s.

Shapes: latents (B, C, h, w); timesteps (B,) long in model units.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from diffalign.diffusion.transition import ddim_log_prob, ddim_mean_std, ddim_std
from diffalign.diffusion.vp import VPProcess
from diffalign.models.base import Adapter
from diffalign.sampling.grids import scheduler_timesteps
from diffalign.sampling.guidance import UNCOND_MODES, default_info, encode_condition, guided_output
from diffalign.sampling.seeds import draw_noise
from diffalign.types import SampleInfo, StepTerms


THRESHOLD_SCHEDULES = ("constant", "sigma")
SCORE_TIMESTEPS = ("child", "parent")
PAIRS_FORMAT = "diffalign.stepwise.pairs.v1"


# ---- scorers ------------------------------------------------------------------------------------------
@runtime_checkable
class StepScorer(Protocol):
    """A step-aware scorer: ``(B,)`` fp32 scores (higher = better) of latents at their timesteps."""

    def __call__(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Adapter) -> Tensor: ...


class LinearLatentScorer:
    """Toy LPO-style scorer: a fixed random linear map of the latents, ``scale * <W, x> / sqrt(numel)``.

    ``W`` is drawn once per latent shape from ``seed`` (CPU generator), so scores are deterministic. It ignores the
    prompt and the timestep; it exists to exercise mining and the recipe without reward-model weights.
    """

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        self.seed, self.scale = seed, scale
        self._weights: dict[tuple[int, ...], Tensor] = {}

    def weight(self, shape: Sequence[int]) -> Tensor:
        key = tuple(shape)
        if key not in self._weights:
            gen = torch.Generator().manual_seed(self.seed)
            self._weights[key] = torch.randn(math.prod(key), generator=gen) / math.sqrt(math.prod(key))
        return self._weights[key]

    def __call__(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Adapter) -> Tensor:
        w = self.weight(latents.shape[1:]).to(latents.device)
        return self.scale * (latents.float().flatten(1) @ w)


class PixelLinearScorer:
    """Toy image scorer in the ``diffalign.scorers`` interface: images (B, 3, H, W) in [0, 1] -> (B,) fp32 on CPU.

    Images are average-pooled to ``grid x grid`` and mapped by a fixed random linear map drawn from ``seed``.
    """

    name = "toy_pixel"
    batch_size = 64
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, seed: int = 0, scale: float = 1.0, grid: int = 8) -> None:
        self.seed, self.scale, self.grid = seed, scale, grid
        self.variant = f"seed{seed}"
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * grid * grid, generator=gen) / grid

    def __call__(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        pooled = F.adaptive_avg_pool2d(images.float().cpu(), self.grid).flatten(1)
        return self.scale * (pooled @ self.weight)


class DecodedScorer:
    """SPO-style step scorer: x0-prediction of the children -> VAE decode -> an image scorer.

    The x0-prediction uses the adapter as it is (the policy, LoRA on, as SPO does) with classifier-free guidance
    ``guidance_scale``; children at timestep 0 are decoded as they are (SPO scores the final sample with t = 0).
    ``pixel_scorer`` is any ``diffalign.scorers`` scorer (``scorer(images in [0, 1], prompts) -> (B,)``).
    """

    def __init__(self, pixel_scorer: Any, *, guidance_scale: float = 5.0, uncond: str = "empty_prompt") -> None:
        if uncond not in UNCOND_MODES:
            raise ValueError(f"unknown uncond {uncond!r}; choices: {', '.join(UNCOND_MODES)}")
        self.pixel_scorer, self.guidance_scale, self.uncond = pixel_scorer, guidance_scale, uncond

    def predict_x0(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], adapter: Adapter) -> Tensor:
        """(B, C, h, w) fp32 guided x0-prediction; rows with timestep 0 are returned unchanged."""
        t = timesteps.to(latents.device).long()
        info = [default_info(adapter, latents.shape[-2:])] * len(prompts)
        with torch.no_grad():
            cond, uncond = encode_condition(adapter, prompts, info, self.uncond)
            out = guided_output(adapter, latents, t, cond, uncond, self.guidance_scale)
            x0 = adapter.process.pred_x0(latents.float(), out, t)
        return torch.where((t == 0).view(-1, 1, 1, 1), latents.float(), x0.float())

    def __call__(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str], *, adapter: Adapter) -> Tensor:
        x0 = self.predict_x0(latents, timesteps, prompts, adapter)
        images = (adapter.decode_latents(x0) + 1.0) / 2.0
        return self.pixel_scorer(images, list(prompts)).float().to(latents.device)


def build_scorer(
    name: str,
    *,
    adapter: Adapter,
    path: str | None = None,
    pixel_scorer: str | None = None,
    guidance_scale: float = 5.0,
    uncond: str = "empty_prompt",
    seed: int = 0,
    scale: float = 1.0,
) -> StepScorer:
    """The step scorer named by a recipe's ``stepwise.scorer`` section.

    ``spm`` / ``lrm``: ``diffalign.scorers.<name>.load(path, adapter=adapter, device=adapter.device)`` (SPO's
    step-aware preference model, LPO's latent reward model; ``path=None`` takes the module's default). ``decoded``: ``DecodedScorer`` over ``diffalign.scorers.load(pixel_scorer, path=...)``.
    ``toy_latent`` / ``toy_decoded``: the deterministic toy scorers. A dotted name ``pkg.module`` is imported and
    its ``load(path, adapter=adapter)`` called, for user scorers.
    """
    if name == "toy_latent":
        return LinearLatentScorer(seed=seed, scale=scale)
    if name == "toy_decoded":
        return DecodedScorer(PixelLinearScorer(seed=seed, scale=scale), guidance_scale=guidance_scale, uncond=uncond)
    if name == "decoded":
        if not pixel_scorer:
            raise ValueError("stepwise.scorer.name='decoded' needs stepwise.scorer.pixel_scorer (e.g. pickscore)")
        from diffalign import scorers

        kwargs: dict[str, Any] = {"device": adapter.device}
        if path:
            kwargs["path"] = path
        return DecodedScorer(scorers.load(pixel_scorer, **kwargs), guidance_scale=guidance_scale, uncond=uncond)
    module_name = f"diffalign.scorers.{name}" if name in ("spm", "lrm") else name
    if "." not in module_name:
        choices = "spm, lrm, decoded, toy_latent, toy_decoded, or a dotted module path"
        raise ValueError(f"unknown step scorer {name!r}; choices: {choices}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise ValueError(f"step scorer {name!r}: module {module_name} is not available in this installation") from e
    kwargs = {"adapter": adapter, "device": adapter.device} if name in ("spm", "lrm") else {"adapter": adapter}
    return module.load(path, **kwargs) if path is not None else module.load(**kwargs)


# ---- grid and thresholds ------------------------------------------------------------------------------
def vp_process(adapter: Adapter) -> VPProcess:
    process = adapter.process
    if not isinstance(process, VPProcess):
        raise ValueError(
            f"step-level mining needs a stochastic DDIM sampler on a VP (DDPM-family) model; {adapter.family} "
            f"has a {type(process).__name__} (SPO / LPO do not apply to flow matching as published)"
        )
    return process


def scheduler_grid(adapter: Adapter, num_steps: int) -> tuple[Tensor, Tensor]:
    """(timesteps, prev) (N,) long: the checkpoint's DDIM "leading" grid, the last step clamped to timestep 0."""
    t, prev = scheduler_timesteps(adapter, num_steps, ("leading",), who="step-level mining")
    return t, prev.clamp_min(0)


def step_thresholds(spec: MiningSpec, sigmas: Tensor) -> Tensor:
    """(N,) pair threshold per sampling step: constant, or the step std mapped onto [min, max] (LPO "sigma")."""
    if spec.threshold_schedule == "constant":
        return torch.full_like(sigmas, spec.threshold)
    lo, hi = sigmas.min(), sigmas.max()
    frac = (sigmas - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(sigmas)
    return spec.threshold_min + frac * (spec.threshold_max - spec.threshold_min)


def preference_gap(best: Tensor, worst: Tensor) -> Tensor:
    """``p_w - p_l`` with ``p = softmax([s_best, s_worst])`` (the compare function of the SPO / LPO code)."""
    p = torch.stack([best, worst], dim=-1).float().softmax(dim=-1)
    return p[..., 0] - p[..., 1]


# ---- mined pairs --------------------------------------------------------------------------------------
_TENSOR_FIELDS = (
    "x_t",
    "child_w",
    "child_l",
    "timesteps",
    "prev_timesteps",
    "prompt_ids",
    "score_w",
    "score_l",
    "gap",
    "threshold",
    "step_index",
    "sizes",
)


@dataclass
class MinedPairs:
    """N step pairs. ``x_t`` / ``child_w`` / ``child_l``: (N, C, h, w) fp32; ``timesteps`` / ``prev_timesteps`` /
    ``step_index`` / ``prompt_ids``: (N,) long; ``score_*`` / ``gap`` / ``threshold``: (N,) fp32; ``sizes``: (N, 6)
    long = original (h, w), crop (top, left), target (h, w) of each pair's ``SampleInfo``; ``prompts``: N strings.
    ``prompt_ids`` are whatever ids the caller gave ``mine`` (the recipe: global prompt positions).
    """

    x_t: Tensor
    child_w: Tensor
    child_l: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor
    prompt_ids: Tensor
    score_w: Tensor
    score_l: Tensor
    gap: Tensor
    threshold: Tensor
    step_index: Tensor
    sizes: Tensor
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.x_t.shape[0]
        for name in _TENSOR_FIELDS:
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"MinedPairs.{name} has {getattr(self, name).shape[0]} rows; x_t has {n}")
        if len(self.prompts) != n:
            raise ValueError(f"MinedPairs has {n} pairs but {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return self.x_t.shape[0]

    @classmethod
    def empty(cls, latent_shape: Sequence[int]) -> MinedPairs:
        z = torch.zeros(0, *latent_shape)
        i, f = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return cls(z, z, z, i, i, i, f, f, f, f, i, torch.zeros(0, 6, dtype=torch.long), [])

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_FIELDS}

    def select(self, index: Tensor | slice) -> MinedPairs:
        """The pairs at ``index`` (a slice, a 1-D long tensor, or a boolean mask), in that order."""
        if isinstance(index, slice):
            prompts = self.prompts[index]
        else:
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            prompts = [self.prompts[int(i)] for i in index]
        return MinedPairs(**{k: v[index] for k, v in self.tensors().items()}, prompts=prompts)

    def to(self, device: torch.device | str) -> MinedPairs:
        return MinedPairs(**{k: v.to(device) for k, v in self.tensors().items()}, prompts=list(self.prompts))

    @staticmethod
    def cat(parts: Sequence[MinedPairs]) -> MinedPairs:
        if not parts:
            raise ValueError("MinedPairs.cat needs at least one part")
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in _TENSOR_FIELDS}
        return MinedPairs(**tensors, prompts=[s for p in parts for s in p.prompts])

    def info(self) -> list[SampleInfo]:
        return [SampleInfo((int(r[0]), int(r[1])), (int(r[2]), int(r[3])), (int(r[4]), int(r[5]))) for r in self.sizes]

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (prompts JSON-encoded in its metadata), atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        save_file(tensors, str(tmp), metadata={"format": PAIRS_FORMAT, "prompts": json.dumps(self.prompts)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MinedPairs:
        """Read a file written by ``save``; a file of another format is an error naming it."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PAIRS_FORMAT:
                raise ValueError(f"{path}: not a mined-pairs file (metadata format {meta.get('format')!r})")
            missing = sorted(set(_TENSOR_FIELDS) - set(f.keys()))
            if missing:
                raise ValueError(f"{path}: missing tensors {missing}")
            tensors = {k: f.get_tensor(k) for k in _TENSOR_FIELDS}
        return cls(**tensors, prompts=json.loads(meta["prompts"]))


# ---- mining -------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MiningSpec:
    """How pairs are mined (defaults: SPO SD1.5, except ``branch_start``; see the module docstring)."""

    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    num_children: int = 4
    branch_start: int = 0
    threshold: float = 0.3
    threshold_schedule: str = "constant"
    threshold_min: float = 0.35
    threshold_max: float = 0.5
    score_timestep: str = "child"
    uncond: str = "empty_prompt"
    resolution: int = 512

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("threshold_schedule", self.threshold_schedule, THRESHOLD_SCHEDULES),
            ("score_timestep", self.score_timestep, SCORE_TIMESTEPS),
            ("uncond", self.uncond, UNCOND_MODES),
        ):
            if value not in choices:
                raise ValueError(f"MiningSpec.{key}={value!r}; choices: {', '.join(choices)}")
        if self.num_children < 2:
            raise ValueError(f"MiningSpec.num_children={self.num_children} must be >= 2 (a pair needs two children)")
        if not 0 <= self.branch_start < self.num_steps:
            raise ValueError(f"MiningSpec.branch_start={self.branch_start} must be in [0, num_steps={self.num_steps})")
        if self.eta <= 0:
            raise ValueError(f"MiningSpec.eta={self.eta} must be > 0 (children need a stochastic step)")
        if min(self.threshold, self.threshold_min, self.threshold_max) < 0:
            raise ValueError("MiningSpec thresholds must be >= 0 (a gap p_w - p_l lies in [0, 1))")


@dataclass
class MiningResult:
    """The kept pairs and per-call statistics (floats: candidates, kept, mean score / gap over candidates)."""

    pairs: MinedPairs
    stats: dict[str, float]


@torch.no_grad()
def mine(
    adapter: Adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    spec: MiningSpec,
    scorer: StepScorer,
    *,
    prompt_ids: Sequence[int] | None = None,
) -> MiningResult:
    """Sample ``prompts`` with the policy and keep the step pairs that pass the threshold (module docstring).

    Args:
        seeds: one seed per prompt (all of its randomness).
        prompt_ids: stored with each pair (e.g. dataset indices); default ``range(len(prompts))``.
    """
    b = len(prompts)
    if len(seeds) != b:
        raise ValueError(f"need one seed per prompt: got {len(seeds)} seeds for {b} prompts")
    ids = list(range(b)) if prompt_ids is None else [int(i) for i in prompt_ids]
    device, process = adapter.device, vp_process(adapter)
    shape = adapter.latent_shape(spec.resolution)
    alphas = process.alphas_cumprod.to(device)
    grid, prev_grid = scheduler_grid(adapter, spec.num_steps)
    thresholds = step_thresholds(spec, ddim_std(alphas[grid.to(device)], alphas[prev_grid.to(device)], spec.eta))
    info = [default_info(adapter, shape[1:])] * b
    cond, uncond = encode_condition(adapter, prompts, info, spec.uncond)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = draw_noise(gens, shape, device)
    kept: list[MinedPairs] = []
    totals = {"candidates": 0.0, "score_sum": 0.0, "gap_sum": 0.0}
    rows = torch.arange(b, device=device)
    for i, (t, prev) in enumerate(zip(grid.tolist(), prev_grid.tolist(), strict=True)):
        t_b = torch.full((b,), t, dtype=torch.long, device=device)
        out = guided_output(adapter, x, t_b, cond, uncond, spec.guidance_scale)
        x0, eps = process.pred_x0(x, out, t_b).float(), process.pred_eps(x, out, t_b).float()
        mean, std = ddim_mean_std(x0, eps, alphas[t_b], alphas[torch.full_like(t_b, prev)], spec.eta)
        k = spec.num_children if i >= spec.branch_start else 1
        children = mean[:, None] + std[:, None] * draw_noise(gens, (k, *shape), device)  # (B, k, C, h, w)
        if k > 1:
            score_t = prev if spec.score_timestep == "child" else t
            flat_prompts = [p for p in prompts for _ in range(k)]
            t_score = torch.full((b * k,), score_t, dtype=torch.long, device=device)
            scores = scorer(children.flatten(0, 1), t_score, flat_prompts, adapter=adapter)
            scores = scores.float().to(device).view(b, k)
            best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
            gap = preference_gap(scores[rows, best], scores[rows, worst])
            keep = gap > thresholds[i]
            if bool(keep.any()):
                step = _Step(i, t, prev, thresholds[i], ids, prompts, info)
                kept.append(_pairs(x, children, scores, best, worst, gap, keep, step))
            totals["candidates"] += b
            totals["score_sum"] += float(scores.mean(dim=1).sum())
            totals["gap_sum"] += float(gap.sum())
        choice = torch.cat([torch.randint(0, k, (1,), generator=g) for g in gens]).to(device) if k > 1 else 0
        x = children[rows, choice]
    pairs = MinedPairs.cat(kept) if kept else MinedPairs.empty(shape).to(device)
    n = max(totals["candidates"], 1.0)
    stats = {
        "candidates": totals["candidates"],
        "kept": float(len(pairs)),
        "score_mean": totals["score_sum"] / n,
        "gap_mean": totals["gap_sum"] / n,
    }
    return MiningResult(pairs=pairs, stats=stats)


@dataclass(frozen=True)
class _Step:
    """What a kept pair records about its sampling step and its batch."""

    index: int
    t: int
    prev: int
    threshold: Tensor
    ids: Sequence[int]
    prompts: Sequence[str]
    info: Sequence[SampleInfo]


def _pairs(
    parent: Tensor,
    children: Tensor,
    scores: Tensor,
    best: Tensor,
    worst: Tensor,
    gap: Tensor,
    keep: Tensor,
    step: _Step,
) -> MinedPairs:
    """The kept rows of one branching step as ``MinedPairs`` (on the children's device)."""
    rows = torch.arange(parent.shape[0], device=parent.device)
    idx = keep.nonzero().flatten()
    n, dev = idx.numel(), parent.device
    sizes = [[*s.original_size, *s.crop_top_left, *s.target_size] for s in step.info]
    return MinedPairs(
        x_t=parent[idx].float(),
        child_w=children[rows, best][idx].float(),
        child_l=children[rows, worst][idx].float(),
        timesteps=torch.full((n,), step.t, dtype=torch.long, device=dev),
        prev_timesteps=torch.full((n,), step.prev, dtype=torch.long, device=dev),
        prompt_ids=torch.tensor(list(step.ids), dtype=torch.long, device=dev)[idx],
        score_w=scores[rows, best][idx],
        score_l=scores[rows, worst][idx],
        gap=gap[idx],
        threshold=step.threshold.float().expand(n).to(dev).clone(),
        step_index=torch.full((n,), step.index, dtype=torch.long, device=dev),
        sizes=torch.tensor(sizes, dtype=torch.long, device=dev)[idx],
        prompts=[step.prompts[int(j)] for j in idx],
    )


# ---- terms --------------------------------------------------------------------------------------------
def _log_probs(
    process: VPProcess, out: Tensor, pairs: MinedPairs, x_t: Tensor, alphas: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    t, prev = pairs.timesteps.to(x_t.device), pairs.prev_timesteps.to(x_t.device)
    x0, eps = process.pred_x0(x_t, out, t), process.pred_eps(x_t, out, t)
    a_t, a_prev = alphas[t], alphas[prev]
    w = ddim_log_prob(pairs.child_w.to(x_t.device), x0, eps, a_t, a_prev, eta)
    lose = ddim_log_prob(pairs.child_l.to(x_t.device), x0, eps, a_t, a_prev, eta)
    return w, lose


def step_terms(
    adapter: Adapter,
    pairs: MinedPairs,
    *,
    guidance_scale: float,
    eta: float = 1.0,
    uncond: str = "empty_prompt",
    need_ref: bool = True,
) -> StepTerms:
    """Policy (with grad) and reference (no grad, LoRA off) log-densities of both children of each pair.

    One guided forward on the parents per model; both use the same CFG as the sampler (``guidance_scale``,
    ``uncond``). With a text-encoder LoRA the prompts are encoded with grad, and re-encoded with the LoRA off for
    the reference.
    """
    if len(pairs) == 0:
        raise ValueError("step_terms needs at least one pair")
    process = vp_process(adapter)
    device = adapter.device
    alphas = process.alphas_cumprod.to(device)
    x_t = pairs.x_t.to(device, torch.float32)
    t = pairs.timesteps.to(device)
    info = pairs.info()
    text_lora = adapter.trains_text_encoders()
    cond, empty = encode_condition(adapter, pairs.prompts, info, uncond, grad=text_lora)
    out = guided_output(adapter, x_t, t, cond, empty, guidance_scale)
    policy_w, policy_l = _log_probs(process, out, pairs, x_t, alphas, eta)
    ref_w = ref_l = None
    if need_ref:
        with torch.no_grad(), adapter.reference():
            if text_lora:
                cond, empty = encode_condition(adapter, pairs.prompts, info, uncond)
            ref_out = guided_output(adapter, x_t, t, cond, empty, guidance_scale)
            ref_w, ref_l = _log_probs(process, ref_out, pairs, x_t, alphas, eta)
    return StepTerms(
        policy_w=policy_w,
        policy_l=policy_l,
        ref_w=ref_w,
        ref_l=ref_l,
        timesteps=t,
        num_train_timesteps=process.num_train_timesteps,
    )
