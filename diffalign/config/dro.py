"""Schema and cross-field checks of ``recipes/dro.py`` (Diffusion-DRO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffalign.config.common import (
    FLOW_FAMILIES,
    VIDEO_FAMILIES,
    DataConfig,
    EmaConfig,
    ExportConfig,
    LoraConfig,
    LossSection,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    check_loss_kind,
    check_positive,
    check_training,
    check_unit_interval,
    text_encoders_trained,
)
from diffalign.config.engine import register_recipe, register_validator


@dataclass(frozen=True, kw_only=True)
class DROSection:
    """Diffusion-DRO's online negatives (basiclab/DiffusionDRO@b0693ec ``train.py`` options, defaults cited there).

    ``num_steps``: sampler steps of a buffer trajectory (``--buffer_num_inference_steps`` 20); ``guidance_scale``:
    its CFG (``--buffer_guidance_scale`` 1.0: the conditional prediction alone); ``perturb_timesteps``: one random
    offset in ``[0, T // num_steps)`` per trajectory added to its grid (``--buffer_perturb_timesteps``, on; sd15/sdxl
    only: the flow families need ``false``);
    ``buffer_size``: trajectories the replay buffer keeps (``--buffer_size`` 4; every micro-step commits one per
    group of the micro-batch, ``--buffer_sample_steps`` 1); ``snapshot_every``: micro-steps between refreshes of
    the sampling policy snapshot (``--buffer_update_steps`` 16), always from the trained weights (never the EMA).

    The authors' ``--use_ema`` is the shared ``ema:`` section (``diffalign.training.ema``, diffusers ``EMAModel``):
    the DRO configs set ``ema: {enabled: true, decay: 0.9999}`` (``EMAModel``'s default decay, with its warm-up
    ``(1 + s) / (10 + s)``); ``ema.enabled: false`` exports the trained weights themselves.
    """

    num_steps: int = 20
    guidance_scale: float = 1.0
    perturb_timesteps: bool = True
    buffer_size: int = 4
    snapshot_every: int = 16


@dataclass(frozen=True, kw_only=True)
class DROConfig:
    """Schema of ``recipes/dro.py``: expert images (each group's first image) + the policy's own samples."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    loss: LossSection  # ``{name: dro, margin: 0.001}``
    dro: DROSection = field(default_factory=DROSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)  # the authors' --use_ema: the DRO configs enable it
    export: ExportConfig = field(default_factory=ExportConfig)


register_recipe("dro", DROConfig)


@register_validator(DROConfig)
def _check_dro(cfg: DROConfig) -> list[str]:
    problems: list[str] = []
    m, data, d = cfg.model, cfg.data, cfg.dro
    check_training(cfg, problems)
    check_loss_kind(cfg, problems, "dro", own=True)
    check_positive(
        problems,
        dro__num_steps=d.num_steps,
        dro__guidance_scale=d.guidance_scale,
        dro__buffer_size=d.buffer_size,
        dro__snapshot_every=d.snapshot_every,
        data__max_rows=data.max_rows,
    )
    check_unit_interval(
        problems,
        data__hflip_prob=data.hflip_prob,
        data__proportion_empty_prompts=data.proportion_empty_prompts,
        data__max_bad_fraction=data.max_bad_fraction,
    )
    if m.family in VIDEO_FAMILIES:
        problems.append(f"model.family={m.family!r} is not supported by dro: its experts and buffer are images")
    elif m.family in FLOW_FAMILIES and d.perturb_timesteps:
        problems.append(
            f"dro.perturb_timesteps=true is not supported on model.family={m.family!r}: the per-trajectory grid "
            "offsets are DDPM timesteps (sd15/sdxl); set dro.perturb_timesteps=false"
        )
    if trained := text_encoders_trained(cfg):
        problems.append(f"{trained} is not supported by dro: the buffer stores the prompt embeddings")
    if data.format not in ("pickapic", "ranked", "scored_pairs"):
        problems.append(f"data.format={data.format!r}: dro reads each group's first (preferred) image as the expert")
    if data.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    return problems
