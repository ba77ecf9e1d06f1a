"""Schema and cross-field checks of ``recipes/stepwise_pref.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign import registry
from diffalign.config.common import (
    FLOW_FAMILIES,
    EmaConfig,
    ExportConfig,
    LoraConfig,
    LossSection,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    check_loss_kind,
    check_positive,
    check_training,
    check_unit_interval,
)
from diffalign.config.engine import register_recipe, register_validator


@dataclass(frozen=True, kw_only=True)
class StepScorerConfig:
    """The step-aware scorer: ``spm`` (SPO), ``lrm`` (LPO), ``decoded`` (x0 -> VAE -> ``pixel_scorer``),
    ``toy_latent`` / ``toy_decoded`` (deterministic toys), or a dotted module with ``load(path, adapter=...)``."""

    name: str = "toy_latent"
    path: str | None = None
    pixel_scorer: str | None = None  # decoded: a diffalign.scorers name (pickscore, hpsv2, ...)
    guidance_scale: float | None = None  # decoded x0-prediction CFG; None -> stepwise.guidance_scale
    seed: int = 0  # toy scorers
    scale: float = 1.0  # toy scorers


@dataclass(frozen=True, kw_only=True)
class StepwiseSection:
    """Step-level pair mining (``diffalign.terms.stepwise.MiningSpec``) and the pair buffer.

    Each mining round samples ``sample_batch_size`` prompts per process; the kept pairs of all processes are
    gathered, shuffled and queued, and every optimizer step consumes ``optim.batch_size`` pairs per process and
    micro-batch (leftovers carry over to the next step).
    """

    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    num_children: int = 4
    branch_start: int = 0  # first branching step index (SPO 4 of 20 -> t <= 751; LPO 0)
    threshold: float = 0.3
    threshold_schedule: Literal["constant", "sigma"] = "constant"
    threshold_min: float = 0.35
    threshold_max: float = 0.5
    score_timestep: Literal["child", "parent"] = "child"
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"  # sdxl pipelines use zeros
    sample_batch_size: int = 10
    save_pairs: bool = False  # write every round's pairs to <output_dir>/pairs/round-*.safetensors
    max_empty_rounds: int = 50  # stop with an error after this many rounds in a row without a pair
    scorer: StepScorerConfig = field(default_factory=StepScorerConfig)


@dataclass(frozen=True, kw_only=True)
class StepwisePrefConfig:
    """Schema of ``recipes/stepwise_pref.py``: online step-level preference optimisation (SPO, LPO)."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig
    stepwise: StepwiseSection = field(default_factory=StepwiseSection)
    loss: LossSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


register_recipe("stepwise_pref", StepwisePrefConfig)
_BUILTIN_STEP_SCORERS = ("spm", "lrm", "decoded", "toy_latent", "toy_decoded")


@register_validator(StepwisePrefConfig)
def _check_stepwise(cfg: StepwisePrefConfig) -> list[str]:
    problems: list[str] = []
    m, data, s = cfg.model, cfg.data, cfg.stepwise
    check_training(cfg, problems)
    check_loss_kind(cfg, problems, "stepwise_pref", kind="step", examples="spo, lpo")
    check_positive(
        problems,
        data__max_prompts=data.max_prompts,
        stepwise__num_steps=s.num_steps,
        stepwise__eta=s.eta,
        stepwise__sample_batch_size=s.sample_batch_size,
        stepwise__max_empty_rounds=s.max_empty_rounds,
    )
    check_unit_interval(
        problems,
        closed=False,
        stepwise__threshold=s.threshold,
        stepwise__threshold_min=s.threshold_min,
        stepwise__threshold_max=s.threshold_max,
    )
    if s.num_children < 2:
        problems.append(f"stepwise.num_children={s.num_children} must be >= 2 (a pair needs two children)")
    if not 0 <= s.branch_start < s.num_steps:
        problems.append(f"stepwise.branch_start={s.branch_start} must be in [0, stepwise.num_steps={s.num_steps})")
    if s.threshold_schedule == "sigma" and s.threshold_min > s.threshold_max:
        problems.append(f"stepwise.threshold_min={s.threshold_min} must be <= threshold_max={s.threshold_max}")
    sc = s.scorer
    if sc.name not in _BUILTIN_STEP_SCORERS and "." not in sc.name:
        problems.append(f"stepwise.scorer.name={sc.name!r}: {registry.suggest(sc.name, _BUILTIN_STEP_SCORERS)}")
    if sc.name == "decoded" and not sc.pixel_scorer:
        problems.append("stepwise.scorer.name='decoded' needs stepwise.scorer.pixel_scorer (e.g. pickscore)")
    if m.family in FLOW_FAMILIES:
        problems.append(
            f"model.family={m.family!r} is not supported by stepwise_pref: SPO / LPO mine pairs with a stochastic "
            "DDIM sampler on a VP (DDPM-family) model; flow matching needs an SDE sampler"
        )
    if m.timestep_sampling != "uniform":
        problems.append(f"model.timestep_sampling={m.timestep_sampling!r} does not apply to stepwise_pref")
    return problems
