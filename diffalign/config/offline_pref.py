"""Schema, cross-field checks and ``--dry-run`` summary of ``recipes/offline_pref.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config.common import (
    FLOW_FAMILIES,
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
    terms_kind,
    text_encoders_trained,
    training_lines,
)
from diffalign.config.engine import ConfigError, register_recipe, register_validator


@dataclass(frozen=True, kw_only=True)
class NoiseConfig:
    """The training noise: ``random`` (one shared draw per group) or ``inversion``: the policy's DDIM inversion of
    each image (InPO, SmPO; ``diffalign.terms.inversion``). ``num_steps`` / ``eta`` / ``renoise``: the inverse
    grid, the noise added per inverse step, and SmPO's averaged two-prediction step."""

    kind: Literal["random", "inversion"] = "random"
    num_steps: int = 10
    eta: float = 0.1
    renoise: bool = False
    steps_offset: int = 1


@dataclass(frozen=True, kw_only=True)
class OfflinePrefConfig:
    """Schema of ``recipes/offline_pref.py``: offline preference optimisation on pairs or ranked lists."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    loss: LossSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


register_recipe("offline_pref", OfflinePrefConfig)


@register_validator(OfflinePrefConfig)
def _check_offline(cfg: OfflinePrefConfig) -> list[str]:
    problems: list[str] = []
    m, data = cfg.model, cfg.data
    check_training(cfg, problems)
    _check_loss_matches_data(cfg, problems)
    check_positive(problems, data__max_rows=data.max_rows, model__logit_std=m.logit_std)
    check_unit_interval(
        problems,
        data__hflip_prob=data.hflip_prob,
        data__proportion_empty_prompts=data.proportion_empty_prompts,
        data__max_bad_fraction=data.max_bad_fraction,
    )
    if (trained := text_encoders_trained(cfg)) and data.latent_cache:
        problems.append(f"{trained} needs prompt embeddings recomputed each step; unset data.latent_cache")
    if data.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    _check_noise(cfg, problems)
    _check_captions(cfg, problems)
    _check_curriculum(cfg, problems)
    return problems


def _check_curriculum(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    c, data = cfg.data.curriculum, cfg.data
    if c.chunks == 0:
        return
    check_positive(problems, data__curriculum__chunks=c.chunks, data__curriculum__steps_per_chunk=c.steps_per_chunk)
    check_positive(problems, data__curriculum__max_groups=c.max_groups)
    pickapic = data.format == "pickapic" and c.score_columns is not None
    if (data.format not in ("ranked", "scored_pairs") and not pickapic) or data.latent_cache or data.streaming:
        problems.append(
            "data.curriculum orders groups by their score gap: it needs data.format='scored_pairs' or 'ranked' "
            "(scores per image), or data.format='pickapic' with data.curriculum.score_columns (the reward of jpg_0 "
            "and jpg_1 orders the pairs; the human label picks the winner), map-style, without data.latent_cache"
        )
    if c.score_columns is not None and (data.format != "pickapic" or len(c.score_columns) != 2):
        problems.append(
            "data.curriculum.score_columns names the two per-image reward columns of data.format='pickapic' "
            f"(jpg_0's, jpg_1's); got {c.score_columns} with data.format={data.format!r}"
        )
    if (c.scores_path is not None or c.score_floor is not None) and c.score_columns is None:
        problems.append("data.curriculum.scores_path / score_floor need data.curriculum.score_columns (Pick-a-Pic)")
    if pickapic and data.ties != "drop":
        problems.append("the Pick-a-Pic curriculum trains on human winners: set data.ties=drop (authors' L131)")
    if c.stages == "thresholds" and data.format not in ("ranked", "scored_pairs"):
        problems.append(
            "data.curriculum.stages='thresholds' is the authors' prompts variant: all pairs of each ranked list, "
            "data.format='ranked' (or 'scored_pairs')"
        )
    if c.stages == "thresholds" and c.min_gap < 0:
        problems.append(f"data.curriculum.min_gap must be >= 0 with stages='thresholds'; got {c.min_gap}")


def _check_captions(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    data = cfg.data
    try:
        wants = bool(getattr(cfg.loss.resolve(cfg.loss.name), "PER_IMAGE_CAPTIONS", False))
    except ConfigError:
        return
    if wants and not data.caption_columns:
        problems.append(
            f"loss.name={cfg.loss.name!r} conditions each image on its own caption: set data.caption_columns"
        )
    if data.caption_columns is None:
        return
    if data.format != "pickapic" or len(data.caption_columns) != 2:
        problems.append("data.caption_columns names two caption columns (jpg_0's, jpg_1's) of format: pickapic data")
    if data.latent_cache:
        problems.append("data.caption_columns needs per-image prompt encoding: unset data.latent_cache")


def _check_noise(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    n = cfg.noise
    if n.kind == "random":
        return
    check_positive(problems, noise__num_steps=n.num_steps)
    if n.eta < 0 or n.steps_offset < 0:
        problems.append(f"noise.eta={n.eta} and noise.steps_offset={n.steps_offset} must be >= 0")
    if cfg.model.family == "sd3":
        problems.append("noise.kind='inversion' needs a DDIM (variance-preserving) model: sd15 or sdxl, not sd3")
    try:
        if terms_kind(cfg.loss.resolve(cfg.loss.name)) == "unpaired":
            problems.append(f"noise.kind='inversion' is not supported for the unpaired loss {cfg.loss.name!r}")
    except ConfigError:
        pass


def _check_loss_matches_data(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    resolved = check_loss_kind(cfg, problems, "offline_pref")
    if resolved is None:
        return
    kind = resolved[1]
    if kind == "unpaired":
        _check_unpaired_data(cfg, problems)
        return
    if cfg.data.positive_ratio is not None:
        problems.append(f"data.positive_ratio applies to unpaired losses (kto), not {cfg.loss.name!r}")
    formats = {"pickapic": "pair", "ranked": "list", "unpaired": "unpaired", "scored_pairs": "pair"}
    formats["video"] = kind if kind in ("pair", "list") else "pair or list"  # K = 2 videos: pairs, K > 2: lists
    wanted = formats[cfg.data.format]
    curriculum = cfg.data.curriculum
    if curriculum.chunks > 0 and curriculum.stages == "thresholds":  # ranked lists served as all their pairs
        wanted = "pair"
    if kind != wanted:
        problems.append(
            f"loss.name={cfg.loss.name!r} is a {kind} loss (TERMS={kind!r}) but data.format={cfg.data.format!r} "
            f"needs a {wanted} loss"
        )


def _check_unpaired_data(cfg: OfflinePrefConfig, problems: list[str]) -> None:
    data = cfg.data
    if data.format not in ("pickapic", "unpaired"):
        problems.append(
            f"loss.name={cfg.loss.name!r} is an unpaired loss; data.format={data.format!r} must be 'pickapic' "
            "(pairs read as unpaired images) or 'unpaired'"
        )
    if data.streaming or data.latent_cache:
        problems.append(
            f"loss.name={cfg.loss.name!r} reads map-style images: unset data.streaming / data.latent_cache"
        )
    if data.positive_ratio is not None:
        check_unit_interval(problems, data__positive_ratio=data.positive_ratio)
    if cfg.loss.params.get("reference_point") == "mismatched" and cfg.optim.batch_size < 2:
        problems.append(
            "loss.reference_point='mismatched' pairs each image with the previous row's prompt in the micro-batch: "
            "optim.batch_size must be >= 2 (1 would pair every image with its own prompt)"
        )


# ------------------------------------------------------------------------------------------- summary


def summary(cfg: OfflinePrefConfig, num_processes: int = 1) -> str:
    """Derived quantities for ``--dry-run``: effective batch, optimizer steps, images per step, schedule."""
    optim, run = cfg.optim, cfg.run
    per_step = optim.batch_size * num_processes * optim.grad_accum
    module = cfg.loss.resolve(cfg.loss.name)
    kind = terms_kind(module)
    group = {"pair": "2", "unpaired": "1"}.get(kind, "K")
    unit = {"pair": "pairs", "unpaired": "images"}.get(kind, "lists")
    images = {"pair": f"{2 * per_step}", "unpaired": f"{per_step}"}.get(
        kind, f"{per_step} x K (K = list length in the data)"
    )
    params = ", ".join(f"{k}={v}" for k, v in cfg.loss.params.items())
    shared = training_lines(cfg, num_processes, unit)
    lines = [
        f"loss: {cfg.loss.name} ({kind} terms; {params})",
        f"model: {cfg.model.family} {cfg.model.path} (weights {cfg.model.dtype}, mixed precision {run.mixed_precision})",
        shared[0],
        f"images per optimizer step: {images} ({group} per group)",
        f"optimizer steps: {run.max_steps} (warmup {optim.warmup_steps}, {optim.scheduler}, lr {optim.lr:g})",
        *shared[1:],
        f"{unit} seen: {run.max_steps * per_step}",
    ]
    if cfg.data.max_rows:
        lines.append(
            f"epochs over data.max_rows={cfg.data.max_rows}: {run.max_steps * per_step / cfg.data.max_rows:.2f}"
        )
    lines.append(
        f"checkpoints: every {run.save_every} steps ({run.max_steps // run.save_every} total, keep last {run.keep_last})"
    )
    m = cfg.model
    if m.family in FLOW_FAMILIES:
        guidance = f", guidance {m.guidance if m.guidance is not None else 'default (3.5 on FLUX.1-dev)'}"
        lines.append(
            f"flow process: {m.timestep_sampling} timesteps, shift {m.flow_shift}{guidance if m.family == 'flux' else ''}"
        )
    base = m.dtype if m.quantize == "none" else f"{m.quantize} (compute {m.dtype})"
    lines.append(
        f"memory: base {base}, gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}, text encoders "
        f"{'loaded' if m.load_text_encoders else 'not loaded (cached embeddings)'}, optimizer {optim.name}"
    )
    val = cfg.validation
    lines.append(f"validation: every {val.every} steps" if val.every else "validation: off")
    return "\n".join(lines)
