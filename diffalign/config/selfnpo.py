"""Schema and cross-field checks of ``recipes/selfnpo.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config.common import (
    FLOW_FAMILIES,
    DataConfig,
    EmaConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    check_positive,
    check_training,
    check_unit_interval,
    text_encoders_trained,
)
from diffalign.config.engine import register_recipe, register_validator


@dataclass(frozen=True, kw_only=True)
class SelfNPOSection:
    """Self-NPO (truncated diffusion fine-tuning, arXiv 2505.11777) teacher and loss settings.

    ``guidance_scale`` is w in ``cond + w * (cond - uncond)``: -1 (SD1.5) is the unconditional prediction,
    -5 (SDXL, with ``uncond: zeros``) is strong negative guidance. See ``diffalign.terms.selfnpo``.
    """

    guidance_scale: float = -1.0
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"
    num_ddim_steps: int = 25  # the teacher's DDIM grid (step T / 25 = 40 for T = 1000)
    max_teacher_steps: int = 5  # DDIM steps the teacher runs from the noised real image
    ema_decay: float = 0.999  # teacher = EMA of the trained LoRA tensors, updated after every optimizer step
    huber_c: float = 1e-3
    loss_type: Literal["huber", "l2"] = "huber"


@dataclass(frozen=True, kw_only=True)
class SelfNPOConfig:
    """Schema of ``recipes/selfnpo.py``: a negative LoRA from images + captions (no preference labels)."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    selfnpo: SelfNPOSection = field(default_factory=SelfNPOSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


register_recipe("selfnpo", SelfNPOConfig)


@register_validator(SelfNPOConfig)
def _check_selfnpo(cfg: SelfNPOConfig) -> list[str]:
    problems: list[str] = []
    m, data, s = cfg.model, cfg.data, cfg.selfnpo
    check_training(cfg, problems)
    check_positive(
        problems,
        data__max_rows=data.max_rows,
        selfnpo__num_ddim_steps=s.num_ddim_steps,
        selfnpo__huber_c=s.huber_c,
    )
    check_unit_interval(
        problems,
        data__hflip_prob=data.hflip_prob,
        data__proportion_empty_prompts=data.proportion_empty_prompts,
        data__max_bad_fraction=data.max_bad_fraction,
        selfnpo__ema_decay=s.ema_decay,
    )
    if m.family in FLOW_FAMILIES:
        problems.append(
            f"model.family={m.family!r} is not supported by selfnpo: its DDIM teacher rollout and re-noising use the "
            "variance-preserving process of sd15/sdxl"
        )
    if m.timestep_sampling != "uniform":
        problems.append(f"model.timestep_sampling={m.timestep_sampling!r} does not apply to selfnpo; use 'uniform'")
    if trained := text_encoders_trained(cfg):
        problems.append(
            f"{trained} is not supported by selfnpo: the negative LoRA is used on the unconditional "
            "CFG branch (diffalign.sampling.npo refuses text-encoder LoRAs)"
        )
    if s.max_teacher_steps < 0:
        problems.append(f"selfnpo.max_teacher_steps={s.max_teacher_steps} must be >= 0")
    if data.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    return problems
