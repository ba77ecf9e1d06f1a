"""Schema and cross-field checks of ``recipes/reward_grad.py`` (ReFL, DRaFT-K, DRaFT-LV, AlignProp)."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign import registry
from diffalign.config.common import (
    VIDEO_FAMILIES,
    EmaConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    check_positive,
    check_training,
)
from diffalign.config.engine import register_recipe, register_validator


@dataclass(frozen=True, kw_only=True)
class RewardGradSection:
    """Reward-gradient fine-tuning (``diffalign.terms.reward_grad``): ReFL, DRaFT-K, DRaFT-LV, AlignProp.

    ``scorer`` is trained on through its differentiable path; ``guard_scorers`` are held out, scored without grad on
    the same images and only logged (``guard/<name>``): a trained reward rising while they fall is reward hacking.
    Loss per prompt: ``loss_scale * relu(margin - r)`` (``relu``, ReFL) or ``loss_scale * (margin - r)`` (``linear``),
    plus ``kl_coeff`` x the squared policy-reference output distance at the grad-enabled steps.
    """

    method: Literal["refl", "draft", "draft_lv", "alignprop"] = "refl"
    scorer: str = "imagereward"
    scorer_path: str | None = None
    scorer_checkpointing: bool = False  # scorer.gradient_checkpointing(True) on its vision tower
    guard_scorers: list[str] = field(default_factory=list)
    # video families (wan): the image scorer on every frame_stride-th frame, reduced over frames (scorers.base.PerFrame)
    frame_reduction: Literal["mean", "min"] = "mean"
    frame_stride: int = 1
    num_steps: int = 40
    guidance_scale: float = 1.0
    eta: float = 1.0
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"
    refl_steps: tuple[int, int] = (30, 39)
    k: int = 1
    lv_samples: int = 2
    truncation: Literal["gaussian", "uniform", "fixed"] = "gaussian"
    truncation_args: list[float] = field(default_factory=lambda: [42.0, 5.0])
    checkpointing: bool = False  # denoiser calls with a graph and the VAE decode
    loss: Literal["relu", "linear"] = "relu"
    margin: float = 2.0
    loss_scale: float = 1e-3
    kl_coeff: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RewardGradConfig:
    """Schema of ``recipes/reward_grad.py``: LoRA fine-tuning on the gradient of a differentiable reward."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig
    reward_grad: RewardGradSection = field(default_factory=RewardGradSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


register_recipe("reward_grad", RewardGradConfig)


@register_validator(RewardGradConfig)
def _check_reward_grad(cfg: RewardGradConfig) -> list[str]:
    from diffalign import scorers

    problems: list[str] = []
    r = cfg.reward_grad
    check_training(cfg, problems)
    check_positive(problems, data__max_prompts=cfg.data.max_prompts, reward_grad__loss_scale=r.loss_scale)
    if r.kl_coeff < 0:
        problems.append(f"reward_grad.kl_coeff={r.kl_coeff} must be >= 0")
    for key, name in [("scorer", r.scorer), *(("guard_scorers", g) for g in r.guard_scorers)]:
        if name not in scorers.available():
            problems.append(f"reward_grad.{key}: {name!r}: {registry.suggest(name, scorers.available())}")
    keys = ("method", "num_steps", "refl_steps", "k", "lv_samples", "truncation", "truncation_args", "eta")
    spec = types.SimpleNamespace(**{k: getattr(r, k) for k in keys})
    problems.extend(f"reward_grad: {p}" for p in spec_problems(spec))
    if cfg.model.timestep_sampling != "uniform":
        problems.append("model.timestep_sampling applies to timestep-sampled training, not reward_grad")
    if r.frame_stride < 1:
        problems.append(f"reward_grad.frame_stride={r.frame_stride} must be >= 1")
    if cfg.model.family not in VIDEO_FAMILIES and (r.frame_reduction != "mean" or r.frame_stride != 1):
        problems.append(f"reward_grad.frame_reduction / frame_stride apply to video families {VIDEO_FAMILIES}")
    return problems


def spec_problems(spec: Any) -> list[str]:
    """Range problems of a spec (``diffalign.terms.reward_grad.GradSpec`` or the config section), one message each; the settings
    of the other methods are not checked."""
    n, m, out = spec.num_steps, spec.method, []
    if n < 1 or spec.k < 1 or spec.lv_samples < 1:
        out.append(f"num_steps={n}, k={spec.k}, lv_samples={spec.lv_samples} must all be >= 1")
    lo, hi = spec.refl_steps
    if m == "refl" and not 0 <= lo <= hi < n:
        out.append(f"refl_steps={list(spec.refl_steps)} must satisfy 0 <= low <= high < num_steps={n}")
    if m == "draft" and spec.k > n:
        out.append(f"k={spec.k} exceeds num_steps={n}")
    a = list(spec.truncation_args)
    want = {"gaussian": 2, "uniform": 2, "fixed": 1}.get(spec.truncation, 0)
    if m != "alignprop":
        pass
    elif len(a) != want:
        out.append(f"truncation={spec.truncation!r} takes {want} truncation_args, got {a}")
    elif spec.truncation == "fixed" and not 1 <= a[0] < n:
        out.append(f"truncation 'fixed' at {a[0]} must lie in [1, num_steps={n})")
    elif spec.truncation == "uniform" and not 1 <= a[0] < a[1] <= n:
        out.append(f"truncation 'uniform' range {a} must satisfy 1 <= min < max <= num_steps={n}")
    elif spec.truncation == "gaussian" and a[1] < 0:
        out.append(f"truncation 'gaussian' std {a[1]} must be >= 0")
    if spec.eta < 0:
        out.append(f"eta={spec.eta} must be >= 0")
    return out
