"""Group-relative advantages (GRPO): G samples per prompt, normalised within their prompt's group.

For rewards ``r`` of the samples of one prompt (Flow-GRPO ``flow_grpo/stat_tracking.py:11-31``)::

    A = (r - mean_group(r)) / (std + eps)          std = std_group(r) ("group") or std_all(r) ("global")

- ``std="global"`` is Flow-GRPO's default (``config/base.py:52``, every ``config/grpo.py`` recipe): the mean is
  still per prompt, the std is over every reward of the iteration (all processes).
- ``eps = 1e-4`` and the population std (``np.std``, ddof 0) are Flow-GRPO's; DanceGRPO uses the unbiased
  ``torch.std`` and ``1e-8`` (``fastvideo/train_grpo_flux.py:533-545``): ``unbiased=True, eps=1e-8``.
- ``A`` is clipped to ``[-clip, clip]`` (``train.adv_clip_max = 5``, ``config/base.py:84``; applied in the loss at
  ``scripts/train_sd3.py:881-885`` and DanceGRPO ``:589-593``; clipping here is the same function).
- Groups whose rewards are all equal carry no signal: they are masked out (``mask`` False, ``A = 0``). Flow-GRPO
  drops every sample whose advantage is exactly 0 and then re-adds random ones to keep batches even
  (``train_sd3.py:796-817``); here whole zero-std groups are dropped and nothing is re-added.
- Rewards are gathered from every process *before* normalising (Flow-GRPO ``train_sd3.py:741-789``: its
  ``DistributedKRepeatSampler`` spreads a group over ranks), and each process keeps its own rows.

**Best/worst selection** (``bestofn`` > 0; DanceGRPO ``--bestofn``, ``fastvideo/train_grpo_hunyuan.py:394-410`` at
XueZeyue/DanceGRPO@15cc71d): of each group only the ``bestofn // 2`` rows with the highest advantage and the
``bestofn // 2`` with the lowest are trained (a stable sort; ties go to the earlier row); the others stay in the
forward but are masked out of the loss (``mask`` False, ``A = 0``). DanceGRPO sorts its rank's one group by the
combined advantage and drops the rest of the batch; here every group is sorted on its own, after clipping.
``metrics["bestofn_kept_frac"]``: the fraction of live rows kept.

**Per-prompt statistics across rounds** (``PerPromptStats``; DDPO's ``PerPromptStatTracker``,
``ddpo_pytorch/stat_tracking.py:5-30`` at kvablack/ddpo-pytorch@1958463, ``config/base.py:104-111``): each prompt
keeps a buffer of its last ``buffer_size`` (16) rewards over the whole run; the round's rewards are appended first,
then ``A = (r - mean(buffer)) / (std(buffer) + eps)`` (population std), or, while the prompt's buffer holds fewer
than ``min_count`` (16) rewards, the mean and std of the whole round's rewards (all processes). DDPO adds ``1e-6``
(``eps`` here). Rows whose statistics have zero std are masked (the zero-std groups above). The buffers are the
run's state: ``state_dict`` goes into the checkpoint, so a resumed run normalises as an uninterrupted one.

**Several rewards** (``Mapping[str, Tensor]`` with ``weights``): by default the weighted sum of the raw rewards is
normalised (Flow-GRPO ``multi_score``, ``flow_grpo/rewards.py:360-403``). ``per_reward=True`` normalises each
reward on its own and sums the weighted advantages (MixGRPO ``advantage_aggr``,
``fastvideo/train_grpo_flux.py:429-456``), so a reward with a small spread is not drowned by one with a large
spread (flow_grpo issue #142); a group is then masked only when every reward is constant in it.

Shapes: rewards (N,) per scorer, ``group_ids`` (N,) long (any ids, e.g. global prompt positions; the rows of a
group need not be contiguous); everything returned is (N,).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


STD_MODES = ("group", "global", "tracker")  # tracker: PerPromptStats / tracked_advantages (stateful)


@dataclass(frozen=True, kw_only=True)
class AdvantageSpec:
    """Defaults: Flow-GRPO's (global std, eps 1e-4, population std, clip 5)."""

    std: str = "global"
    eps: float = 1e-4
    unbiased: bool = False
    clip: float = 5.0
    per_reward: bool = False
    bestofn: int = 0

    def __post_init__(self) -> None:
        if self.bestofn < 0 or self.bestofn % 2:
            raise ValueError(f"AdvantageSpec.bestofn={self.bestofn} must be 0 (all rows) or an even count")
        if self.std not in STD_MODES:
            raise ValueError(f"AdvantageSpec.std={self.std!r}; choices: {', '.join(STD_MODES)}")
        if not (self.eps > 0 and self.clip > 0 and math.isfinite(self.eps)):
            raise ValueError(f"AdvantageSpec needs eps > 0 and clip > 0; got eps={self.eps}, clip={self.clip}")


@dataclass(frozen=True)
class Advantages:
    """``values`` (N,) fp32 (0 where masked); ``mask`` (N,) bool (False in zero-std groups); ``metrics``: reward
    mean / std per scorer (``reward/<name>/mean``), ``zero_std_frac`` (of groups), ``adv_clip_frac``."""

    values: Tensor
    mask: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _std(x: Tensor, index: Tensor, groups: int, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group mean, per-row group std and per-group std (fp64); a one-sample group has std 0."""
    count = torch.zeros(groups, dtype=x.dtype).index_add_(0, index, torch.ones_like(x))
    mean = torch.zeros(groups, dtype=x.dtype).index_add_(0, index, x) / count
    sq = torch.zeros(groups, dtype=x.dtype).index_add_(0, index, (x - mean[index]) ** 2)
    denom = (count - 1).clamp_min(1) if unbiased else count
    std = torch.where(count > 1, (sq / denom).sqrt(), torch.zeros_like(sq))
    return mean[index], std[index], std


def normalise(rewards: Tensor, group_ids: Tensor, spec: AdvantageSpec) -> tuple[Tensor, Tensor]:
    """(N,) fp64 unclipped advantages of one reward, and (N,) bool: the row's group has a non-zero std."""
    if spec.std == "tracker":
        raise ValueError("AdvantageSpec.std='tracker' keeps state across rounds: use tracked_advantages")
    x = rewards.detach().double().cpu().reshape(-1)
    _, index = torch.unique(group_ids.cpu().reshape(-1), return_inverse=True)
    if x.shape != index.shape:
        raise ValueError(f"{x.numel()} rewards for {index.numel()} group ids")
    if not torch.isfinite(x).all():
        raise ValueError(f"non-finite rewards at rows {(~torch.isfinite(x)).nonzero().flatten().tolist()}")
    mean, row_std, _ = _std(x, index, int(index.max()) + 1 if x.numel() else 0, spec.unbiased)
    if spec.std == "global":
        n = x.numel()
        var = ((x - x.mean()) ** 2).sum() / (max(n - 1, 1) if spec.unbiased else max(n, 1))
        scale = var.sqrt().expand_as(x)
    else:
        scale = row_std
    return (x - mean) / (scale + spec.eps), row_std > 0


def best_and_worst(values: Tensor, index: Tensor, bestofn: int) -> Tensor:
    """(N,) bool: per group (``index`` (N,) in [0, groups)), the ``bestofn // 2`` highest and ``bestofn // 2``
    lowest ``values`` (stable order; a group of at most ``bestofn`` rows keeps every row)."""
    keep = torch.zeros(values.shape[0], dtype=torch.bool)
    half = bestofn // 2
    for g in torch.unique(index):
        rows = (index == g).nonzero().flatten()
        if rows.numel() <= bestofn:
            keep[rows] = True
            continue
        order = rows[torch.argsort(values[rows], stable=True)]
        keep[order[:half]] = True
        keep[order[-half:]] = True
    return keep


def group_advantages(
    rewards: Tensor | Mapping[str, Tensor],
    group_ids: Tensor,
    spec: AdvantageSpec,
    weights: Mapping[str, float] | None = None,
) -> Advantages:
    """Advantages of ALL rows given (call ``gathered_advantages`` in a multi-process run)."""
    named = {"reward": rewards} if isinstance(rewards, Tensor) else dict(rewards)
    if not named:
        raise ValueError("group_advantages needs at least one reward")
    weights = dict(weights) if weights is not None else dict.fromkeys(named, 1.0)
    if set(weights) != set(named):
        raise ValueError(f"reward weights {sorted(weights)} do not match the rewards {sorted(named)}")
    if spec.per_reward:
        parts = {name: normalise(r, group_ids, spec) for name, r in named.items()}
        adv = sum(weights[name] * a for name, (a, _) in parts.items())
        live = torch.stack([ok for _, ok in parts.values()]).any(dim=0)
    else:
        total = sum(weights[name] * r.detach().double().cpu().reshape(-1) for name, r in named.items())
        adv, live = normalise(total, group_ids, spec)
    clipped = adv.abs() > spec.clip
    _, index = torch.unique(group_ids.cpu().reshape(-1), return_inverse=True)
    chosen = best_and_worst(adv.clamp(-spec.clip, spec.clip), index, spec.bestofn) if spec.bestofn else None
    if chosen is not None:
        before, live = live, live & chosen
    values = torch.where(live, adv.clamp(-spec.clip, spec.clip), torch.zeros_like(adv)).float()
    groups = int(index.max()) + 1 if index.numel() else 0
    group_live = torch.zeros(groups, dtype=torch.bool).index_fill_(0, index[live], True)
    metrics = {"zero_std_frac": float(1 - group_live.float().mean()) if groups else 0.0}
    metrics["adv_clip_frac"] = float((clipped & live).float().mean()) if index.numel() else 0.0
    if chosen is not None:
        metrics["bestofn_kept_frac"] = float(live.sum() / before.sum().clamp_min(1))
    for name, r in named.items():
        r = r.detach().double().cpu()
        metrics[f"reward/{name}/mean"] = float(r.mean())
        metrics[f"reward/{name}/std"] = float(r.std(unbiased=False))
    return Advantages(values, live, metrics)


def gathered_advantages(
    rewards: Tensor | Mapping[str, Tensor],
    group_ids: Tensor,
    spec: AdvantageSpec,
    accelerator: object,
    weights: Mapping[str, float] | None = None,
) -> Advantages:
    """This process's rows of the advantages computed over every process's rows (same row count on each)."""
    from diffalign.training.distributed import gather_rows

    named = {"reward": rewards} if isinstance(rewards, Tensor) else dict(rewards)
    all_ids = gather_rows(group_ids, accelerator)
    all_rewards = {name: gather_rows(r, accelerator) for name, r in named.items()}
    result = group_advantages(
        all_rewards["reward"] if isinstance(rewards, Tensor) else all_rewards, all_ids, spec, weights
    )
    n, rank = group_ids.shape[0], accelerator.process_index
    rows = slice(rank * n, (rank + 1) * n)
    return Advantages(result.values[rows], result.mask[rows], result.metrics)


class PerPromptStats:
    """DDPO's per-prompt reward statistics across rounds (module docstring); the same on every process."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"PerPromptStats needs 1 <= min_count <= buffer_size; got {min_count}, {buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(N,) fp64 advantages of ``rewards`` (N,) and (N,) bool: the row's statistics have a non-zero std."""
        x = rewards.detach().double().cpu().reshape(-1)
        if len(prompts) != x.numel():
            raise ValueError(f"{x.numel()} rewards for {len(prompts)} prompts")
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite rewards at rows {(~torch.isfinite(x)).nonzero().flatten().tolist()}")
        adv, live = torch.zeros_like(x), torch.zeros(x.numel(), dtype=torch.bool)
        batch_mean, batch_std = x.mean(), x.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # first-seen order; each prompt's buffer is independent
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(r) for r in x[rows])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                seen = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = seen.mean(), seen.std(unbiased=False)
            adv[rows] = (x[rows] - mean) / (std + eps)
            live[rows] = bool(std > 0)
        return adv, live

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buf) for prompt, buf in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[float]]) -> None:
        self.stats = {p: deque((float(r) for r in v), maxlen=self.buffer_size) for p, v in state.items()}


def tracked_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    spec: AdvantageSpec,
    tracker: PerPromptStats,
    prompt_of: Callable[[int], str],
    accelerator: object,
    weights: Mapping[str, float] | None = None,
) -> Advantages:
    """This process's rows of the ``PerPromptStats`` advantages of the weighted reward sum over every process's rows
    (``group_ids``: global prompt positions, named by ``prompt_of``); clipped and masked as ``group_advantages``."""
    from diffalign.training.distributed import gather_rows

    named = dict(rewards)
    weights = dict(weights) if weights is not None else dict.fromkeys(named, 1.0)
    all_ids = gather_rows(group_ids, accelerator).cpu().reshape(-1)
    all_rewards = {name: gather_rows(r, accelerator).detach().double().cpu().reshape(-1) for name, r in named.items()}
    total = sum(weights[name] * r for name, r in all_rewards.items())
    adv, live = tracker.update([prompt_of(int(i)) for i in all_ids], total, spec.eps)
    clipped = adv.abs() > spec.clip
    values = torch.where(live, adv.clamp(-spec.clip, spec.clip), torch.zeros_like(adv)).float()
    metrics = {
        "zero_std_frac": float(1 - live.float().mean()),
        "adv_clip_frac": float((clipped & live).float().mean()),
    }
    metrics["tracked_prompts"] = float(len(tracker.stats))
    for name, r in all_rewards.items():
        metrics[f"reward/{name}/mean"] = float(r.mean())
        metrics[f"reward/{name}/std"] = float(r.std(unbiased=False))
    n, rank = group_ids.shape[0], accelerator.process_index
    rows = slice(rank * n, (rank + 1) * n)
    return Advantages(values[rows], live[rows], metrics)
