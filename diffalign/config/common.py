"""Config sections every recipe shares (model, LoRA, data, optimizer, run, validation, loss) and their checks."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from diffalign.config.engine import ConfigError, PluginSection, to_dict


# --------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which base model to align and how its frozen weights are loaded.

    Memory options for the frozen base (the LoRA is always fp32; the reference pass is this same base with the
    adapter off, so every option keeps reference == base exactly): ``dtype: bf16``, ``quantize: nf4`` (bitsandbytes)
    or ``float8`` (torchao, CUDA >= 8.9), ``gradient_checkpointing``, ``load_text_encoders: false`` (prompt
    embeddings from ``data.latent_cache``), and ``optim.name: adamw8bit``.
    """

    # sd3 covers SD3.5 (Medium, Large); wan: Wan 2.1 T2V video
    # fluxkontext, qwenimageedit: instruction editing (a source image per row: data.source_image_column)
    family: Literal[
        "sd15", "sdxl", "sd3", "flux", "qwenimage", "zimage", "flux2", "wan", "fluxkontext", "qwenimageedit"
    ]
    path: str  # hub id or local diffusers folder
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of the frozen weights
    vae_path: str | None = None  # e.g. madebyollin/sdxl-vae-fp16-fix
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the denoiser forward (static shapes: one graph per resolution and pass)
    quantize: Literal["none", "nf4", "float8"] = "none"  # frozen denoiser weights only
    load_text_encoders: bool = True  # false: train from the latent cache's prompt embeddings
    # flow models (sd3, flux): training-timestep density (SD3 paper Sec. 3.1) and the fixed timestep shift:
    # "scheduler" = the table diffusers' scripts index (SD3: 3.0; FLUX's dynamic scheduler: unshifted, 1.0),
    # "resolution" = the shift FluxPipeline samples with at data.resolution (exp(mu); 3.16 at 1024 px), or a number
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | Literal["scheduler", "resolution"] = "scheduler"
    guidance: float | None = None  # flux / flux2 (guidance-distilled): the guidance-embedding input; None -> 3.5 / 4.0
    # qwenimageedit: the side of the pixel area the source image is conditioned at (None: the pipeline's 1024)
    source_resolution: int | None = None


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The trained LoRA adapter (the frozen base with the adapter disabled is the reference model)."""

    rank: int = 8
    alpha: float | None = None  # None -> alpha = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] | None = None  # None -> the family's defaults (models.<family>.Adapter.default_lora_targets)
    init: Literal["gaussian", "default"] = (
        "gaussian"  # peft init_lora_weights: "gaussian" or True; lora_B = 0 either way
    )
    text_encoder: bool = False
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass(frozen=True, kw_only=True)
class CurriculumConfig:
    """Curriculum-DPO's sampler (``diffalign.data.curriculum``): ``chunks`` cumulative chunks of the groups sorted by
    reward gap (largest first), the next unlocked every ``steps_per_chunk`` optimizer steps; ``chunks: 0`` is off.
    ``min_gap``: keep groups whose gap exceeds it; ``max_groups``: keep at most this many (authors: 150k).
    ``stages``: "chunks" (count-based cumulative chunks) or "thresholds" (the authors' prompts variant over ranked
    lists: all pairs, ``chunks - 1`` stages by gap value). ``score_columns``: with ``data.format: pickapic``, the two
    per-image reward columns (jpg_0's, jpg_1's) that ORDER the pairs, trained on the human winner (the authors'
    Pick-a-Pic variant), read from ``scores_path`` (row r scores row r) or the data itself. ``score_floor``: keep
    a pair only when both scores exceed it (authors: 0.1 in HPSv2.1 cosine units)."""

    chunks: int = 0
    steps_per_chunk: int = 500
    min_gap: float = 0.0
    max_groups: int | None = None
    stages: Literal["chunks", "thresholds"] = "chunks"
    score_columns: list[str] | None = None
    scores_path: str | None = None
    score_floor: float | None = None


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Preference data: Pick-a-Pic style pairs, ranked lists or unpaired labelled images, and the image transforms.

    ``format: scored_pairs`` reads K=2 ranked lists (prompt, 2 images, 2 scores) as pairs for pair losses (e.g. a
    Curriculum-DPO curriculum over their score gaps). ``format: unpaired`` is a plain (image, caption, label) table; unpaired objectives (kto) also read
    ``pickapic`` pairs as unpaired images. ``positive_ratio`` (unpaired only): draw desirable images with this
    probability (Diffusion-KTO's label-balanced sampler); None shuffles as usual.
    """

    format: Literal["pickapic", "ranked", "unpaired", "scored_pairs", "video"] = "pickapic"
    path: str
    split: str = "train"
    streaming: bool = False
    resolution: int = 512
    crop: Literal["center", "random"] = "center"
    hflip_prob: float = 0.5
    ties: Literal["drop", "keep"] = "drop"
    on_bad_row: Literal["skip", "raise"] = "skip"
    max_bad_fraction: float = 0.1  # stop when more rows than this are unusable (data.records.too_many_bad)
    labelled_by: str | None = None  # the scorer that ranked the labels (data.provenance); None: not checked
    max_rows: int | None = None
    proportion_empty_prompts: float = 0.0
    num_workers: int = 0
    latent_cache: str | None = None
    positive_ratio: float | None = None
    caption_columns: list[str] | None = None  # pickapic: one caption column per image, e.g. [caption_0, caption_1]
    num_frames: int | None = None  # video families (wan): frames per video, 4k + 1 (None: the pipeline's 81)
    # editing families (fluxkontext, qwenimageedit): the column (ranked JSONL key) holding each row's source image
    source_image_column: str | None = None
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; ``batch_size`` counts groups (pairs or lists) per device."""

    name: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"  # adamw8bit: bitsandbytes 8-bit states
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    # lr x batch_size x grad_accum x processes (the diffusers / Salesforce Diffusion-DPO ``--scale_lr``)
    scale_lr: bool = False


def effective_lr(optim: OptimConfig, num_processes: int) -> float:
    """``optim.lr``, times the global batch per optimizer step when ``optim.scale_lr`` (Salesforce DiffusionDPO
    ``train.py`` lines 662-665: ``lr * gradient_accumulation_steps * train_batch_size * num_processes``)."""
    scale = optim.batch_size * optim.grad_accum * num_processes if optim.scale_lr else 1
    return optim.lr * scale


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where outputs go, how long to train (``max_steps`` optimizer steps), logging and checkpoints."""

    output_dir: str
    max_steps: int
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    resume_from: str | None = None  # "latest" or a checkpoint folder
    # a fresh run (resume_from unset) into a folder holding another run's checkpoints, LoRA or metrics is refused;
    # overwrite: true moves that run aside to a dated sibling folder first (nothing is deleted)
    overwrite: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    allow_tf32: bool = True


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Periodic sample generation during training; ``every=0`` turns it off."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    every: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    resolution: int | None = None  # None -> data.resolution
    # sd3 only: skip-layer guidance at sampling (StableDiffusion3Pipeline skip_guidance_layers; [7, 8, 9] is the
    # pipeline's recommendation for SD3.5-Medium). A sampling option: no training forward ever skips a layer.
    skip_guidance_layers: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What trains. ``mode: lora`` (the default): a LoRA on the frozen base, the reference is the adapter off.
    ``mode: full``: every denoiser weight trains, in ``dtype`` (fp32 master weights by default; the base loads in
    ``model.dtype``); objectives that compare with a reference get a frozen copy of the base denoiser in
    ``reference_dtype`` (None: ``model.dtype``, the precision it was loaded in), the others none
    (``diffalign.models.full``). ``text_encoders: true`` trains the text encoders a text-encoder LoRA would adapt
    (the CLIP ones) fully too, with frozen copies for the reference pass."""

    mode: Literal["lora", "full"] = "lora"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # full mode: dtype of the trained weights
    reference_dtype: Literal["fp32", "fp16", "bf16"] | None = None  # full mode: the frozen copy; None: model.dtype
    text_encoders: bool = False  # full mode: train the (CLIP) text encoders too


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    """EMA of the trained weights (LoRA or full; ``diffalign.training.ema``), diffusers ``EMAModel``'s options and
    defaults. When enabled, validation images and the exported weights are the EMA weights."""

    enabled: bool = False
    offload: bool = False  # shadows in CPU memory (diffusers' --offload_ema), for full models
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Full mode writes the trained denoiser as a diffusers folder (``output_dir/<unet|transformer>``); with
    ``lora_rank`` also a LoRA (``output_dir/lora``) by truncated SVD of trained - base on the Linear layers
    (``lora_conv``: the Conv2d layers too)."""

    lora_rank: int | None = None
    lora_conv: bool = False


@dataclass(frozen=True, kw_only=True)
class LossSection(PluginSection):
    """``loss: {name: dpo, beta: 5000}``: the objective module and its ``Config`` parameters."""

    package: ClassVar[str] = "diffalign.losses"
    kind: ClassVar[str] = "loss"


# ---------------------------------------------------------------------------------- cross-field checks


def terms_kind(module: types.ModuleType) -> str:
    """``"pair"``, ``"list"`` or ``"step"`` from a loss module's ``TERMS`` (a string or a terms class)."""
    terms = getattr(module, "TERMS", None)
    if isinstance(terms, str):
        return terms
    if isinstance(terms, type):
        return terms.__name__.removesuffix("Terms").lower()
    raise ConfigError(f"loss module {module.__name__} has no TERMS")


def check_loss_kind(
    cfg: Any, problems: list[str], recipe: str, *, kind: str | None = None, examples: str = "", own: bool = False
) -> tuple[types.ModuleType, str] | None:
    """The loss module of ``cfg.loss.name`` and its terms kind if ``recipe`` can train it, else None with the reason
    appended to ``problems``: a loss that does not resolve, one of another terms ``kind`` than the recipe needs
    (``examples``: losses of that kind), one another recipe builds the terms of (its ``RECIPE``), or, with ``own``,
    one that is not ``recipe``'s own (``RECIPE = recipe``)."""
    name = cfg.loss.name
    try:
        module = cfg.loss.resolve(name)
        found = terms_kind(module)
    except ConfigError as e:
        problems.append(f"loss.name: {e}")
        return None
    builder = getattr(module, "RECIPE", None)
    if kind is not None and found != kind:
        problems.append(f"loss.name={name!r} is a {found} loss; {recipe} needs a {kind} loss ({examples})")
    elif own and builder != recipe:
        problems.append(f"loss.name={name!r}: the {recipe} recipe trains the {recipe} loss only")
    elif builder not in (None, recipe):
        problems.append(f"loss.name={name!r} builds its own pairs: train it with the {builder} recipe")
    else:
        return module, found
    return None


def check_positive(problems: list[str], **values: float | int | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            problems.append(f"{key.replace('__', '.')}={value} must be > 0")


def check_unit_interval(problems: list[str], closed: bool = True, **values: float) -> None:
    for key, value in values.items():
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            problems.append(f"{key.replace('__', '.')}={value} must be in [0, 1{']' if closed else ')'}")


def _nonfinite(value: Any, key: str = "") -> list[str]:
    """Dotted keys of NaN / infinite numbers anywhere in ``to_dict`` data (``nan <= 0`` is False: range checks miss it)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _nonfinite(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _nonfinite(v, f"{key}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value} must be a finite number"]
    return []


_MAX_SEED = 2**32 - 1  # numpy's seed range; accelerate's set_seed seeds numpy too


def check_training(cfg: Any, problems: list[str]) -> None:
    """Checks every LoRA training recipe shares: run, optim, lora, model dtype, resolutions and validation."""
    m, lora, data, optim, run, val = cfg.model, cfg.lora, cfg.data, cfg.optim, cfg.run, cfg.validation
    problems.extend(_nonfinite(to_dict(cfg)))
    if run.overwrite and run.resume_from is not None:
        problems.append(
            f"run.overwrite=true and run.resume_from={run.resume_from!r} contradict each other: resume the run, "
            "or move it aside and start afresh"
        )
    if not run.output_dir.strip():
        problems.append("run.output_dir is empty; name the folder the run writes to (e.g. run.output_dir=runs/dpo)")
    for key, seed in (("run.seed", run.seed), ("validation.seed", val.seed)):
        if not 0 <= seed <= _MAX_SEED:
            problems.append(f"{key}={seed} must be in [0, 2**32 - 1]")
    check_positive(
        problems,
        run__max_steps=run.max_steps,
        run__save_every=run.save_every,
        run__log_every=run.log_every,
        run__keep_last=run.keep_last,
        optim__batch_size=optim.batch_size,
        optim__grad_accum=optim.grad_accum,
        optim__lr=optim.lr,
        optim__eps=optim.eps,
        optim__max_grad_norm=optim.max_grad_norm,
        lora__rank=lora.rank,
        lora__alpha=lora.alpha,
        data__resolution=data.resolution,
        validation__num_inference_steps=val.num_inference_steps,
    )
    check_unit_interval(
        problems,
        closed=False,
        lora__dropout=lora.dropout,
        **{f"optim__betas[{i}]": b for i, b in enumerate(optim.betas)},
    )
    if optim.warmup_steps < 0 or optim.warmup_steps > run.max_steps:
        problems.append(f"optim.warmup_steps={optim.warmup_steps} must be in [0, run.max_steps={run.max_steps}]")
    if optim.warmup_steps > 0 and optim.scheduler == "constant":
        problems.append(
            "optim.warmup_steps > 0 has no effect with optim.scheduler='constant'; use 'constant_with_warmup'"
        )
    for key, res in (("data.resolution", data.resolution), ("validation.resolution", val.resolution)):
        if res is not None and res % 8:
            problems.append(f"{key}={res} must be a multiple of 8 (the VAE downsamples by 8)")
    if m.dtype != "fp32" and run.mixed_precision not in ("no", m.dtype):
        problems.append(f"model.dtype={m.dtype!r} and run.mixed_precision={run.mixed_precision!r} disagree")
    _check_model(cfg, problems)
    _check_train_mode(cfg, problems)
    if val.every < 0 or optim.weight_decay < 0:
        problems.append("validation.every and optim.weight_decay must be >= 0")
    if val.prompts and val.prompts_file:
        problems.append("set one of validation.prompts and validation.prompts_file, not both")
    if val.every > 0 and not (val.prompts or val.prompts_file):
        problems.append(f"validation.every={val.every} needs validation.prompts or validation.prompts_file")


FLOW_FAMILIES = ("sd3", "flux", "qwenimage", "zimage", "flux2")
GUIDANCE_EMBEDDED = (
    "flux",
    "flux2",
    "fluxkontext",
)  # families whose guidance is a model input (model.guidance), not CFG
VIDEO_FAMILIES = ("wan",)  # models.VIDEO_FAMILIES (config validates without importing models)
FLOW_FAMILIES += VIDEO_FAMILIES
EDITING_FAMILIES = ("fluxkontext", "qwenimageedit")  # models.EDITING_FAMILIES: a source image per prompt
FLOW_FAMILIES += EDITING_FAMILIES
EDITING_RECIPES = ("OfflinePrefConfig", "OnlineRLConfig")  # the schemas whose recipes pass source images through


def text_encoders_trained(cfg: Any) -> str | None:
    """The option that trains the text encoders (``lora.text_encoder=true`` or ``train.text_encoders=true``), or
    None: recipes that encode prompts once (cached embeddings, online rounds) refuse it by this name."""
    if cfg.lora.text_encoder:
        return "lora.text_encoder=true"
    train = getattr(cfg, "train", None)
    return "train.text_encoders=true" if train is not None and train.text_encoders else None


def training_lines(cfg: Any, num_processes: int, unit: str = "rows (optim.batch_size units)") -> list[str]:
    """``--dry-run`` lines every training recipe shares: the global batch of an optimizer step, the learning rate
    (scaled under ``optim.scale_lr``), what trains (``train``), the EMA and what is exported."""
    optim, train = cfg.optim, cfg.train
    per_step = optim.batch_size * num_processes * optim.grad_accum
    lr = effective_lr(optim, num_processes)
    scaled = f" = {optim.lr:g} x {per_step} (optim.scale_lr)" if optim.scale_lr else ""
    if train.mode == "full":
        ref = train.reference_dtype or cfg.model.dtype
        what = f"full denoiser in {train.dtype} (reference, if the objective needs one: a frozen copy in {ref})"
        out = "the denoiser's diffusers folder" + (
            f" + an SVD LoRA of rank {cfg.export.lora_rank}" if cfg.export.lora_rank else ""
        )
    else:
        what = f"LoRA rank {cfg.lora.rank} (reference: the base, adapter off)"
        out = "the LoRA (diffusers format)"
    ema = cfg.ema
    return [
        f"effective batch: {per_step} {unit} = {optim.batch_size} per device x {num_processes} processes "
        f"x {optim.grad_accum} accumulation (the global batch of one optimizer step)",
        f"learning rate: {lr:g}{scaled}, {optim.name}",
        f"trains: {what}",
        f"ema: decay {ema.decay:g}, from step {ema.update_after_step + 1}" if ema.enabled else "ema: off",
        f"export: {out}{' (EMA weights)' if ema.enabled else ''}",
    ]


def _check_train_mode(cfg: Any, problems: list[str]) -> None:
    """``train``, ``ema`` and ``export``: what full mode cannot combine with, and the EMA / export ranges."""
    train, ema, export, m = cfg.train, cfg.ema, cfg.export, cfg.model
    if train.mode == "full":
        if m.quantize != "none":
            problems.append(
                f"train.mode=full trains the denoiser's own weights: model.quantize={m.quantize!r} must be none"
            )
        if cfg.lora.text_encoder:
            problems.append(
                "train.mode=full trains no LoRA: unset lora.text_encoder (train.text_encoders=true trains them fully)"
            )
        if train.dtype == "fp16" and cfg.run.mixed_precision == "fp16":
            problems.append(
                "train.dtype=fp16 with run.mixed_precision=fp16: the loss scaler cannot unscale fp16 gradients; "
                "keep train.dtype=fp32 (fp32 master weights)"
            )
    else:
        for key, value, default in (
            ("train.dtype", train.dtype, "fp32"),
            ("train.reference_dtype", train.reference_dtype, None),
            ("train.text_encoders", train.text_encoders, False),
            ("export.lora_rank", export.lora_rank, None),
            ("export.lora_conv", export.lora_conv, False),
        ):
            if value != default:
                problems.append(f"{key}={value!r} applies to train.mode=full (this run trains a LoRA)")
    check_positive(problems, export__lora_rank=export.lora_rank, ema__inv_gamma=ema.inv_gamma, ema__power=ema.power)
    check_unit_interval(problems, ema__decay=ema.decay, ema__min_decay=ema.min_decay)
    if ema.min_decay > ema.decay:
        problems.append(f"ema.min_decay={ema.min_decay} must be <= ema.decay={ema.decay}")
    if ema.update_after_step < 0:
        problems.append(f"ema.update_after_step={ema.update_after_step} must be >= 0")


def _check_model(cfg: Any, problems: list[str]) -> None:
    """Model options that only some families take, and the memory options' requirements."""
    m, data, val = cfg.model, cfg.data, cfg.validation
    if m.family not in FLOW_FAMILIES:
        if m.timestep_sampling != "uniform":
            problems.append(
                f"model.timestep_sampling={m.timestep_sampling!r} applies to flow models (model.family in "
                f"{FLOW_FAMILIES}), not {m.family!r}; use 'uniform'"
            )
        if m.flow_shift != "scheduler":
            problems.append(f"model.flow_shift={m.flow_shift!r} applies to flow models, not {m.family!r}")
    if isinstance(m.flow_shift, float) and m.flow_shift <= 0:
        problems.append(f"model.flow_shift={m.flow_shift} must be > 0")
    if val.skip_guidance_layers and m.family != "sd3":
        problems.append(f"validation.skip_guidance_layers is an SD3/SD3.5 sampling option, not {m.family!r}")
    if m.guidance is not None and m.family not in GUIDANCE_EMBEDDED:
        problems.append(
            f"model.guidance applies to guidance-distilled FLUX.1 / FLUX.2 (model.family in {GUIDANCE_EMBEDDED}), "
            f"not {m.family!r}"
        )
    _check_video(cfg, problems)
    _check_editing(cfg, problems)
    if m.quantize != "none" and m.dtype == "fp32":
        problems.append(f"model.quantize={m.quantize!r} computes in model.dtype: set model.dtype to bf16 (or fp16)")
    if not m.load_text_encoders:
        if not getattr(data, "latent_cache", None):
            problems.append(
                "model.load_text_encoders=false needs data.latent_cache (prompt embeddings from the cache)"
            )
        if trained := text_encoders_trained(cfg):
            problems.append(f"model.load_text_encoders=false cannot train the text encoders ({trained})")
        if val.every:
            problems.append("model.load_text_encoders=false: validation sampling needs the text encoders; set every=0")


def _check_editing(cfg: Any, problems: list[str]) -> None:
    """Editing families need ``data.source_image_column`` (and no latent cache: it holds no source latents); the
    others take none. One line each, naming the key and the fix."""
    m, data = cfg.model, cfg.data
    column = getattr(data, "source_image_column", None)
    if m.family not in EDITING_FAMILIES:
        if column is not None:
            problems.append(
                f"data.source_image_column={column!r} applies to editing families {EDITING_FAMILIES}, not "
                f"{m.family!r}; unset it"
            )
        if m.source_resolution is not None:
            problems.append(f"model.source_resolution applies to editing families {EDITING_FAMILIES}; unset it")
        return
    if type(cfg).__name__ not in EDITING_RECIPES:
        problems.append(f"model.family={m.family!r}: editing families run offline_pref and online_rl only (for now)")
    if column is None:
        problems.append(
            f"model.family={m.family!r} edits a source image: set data.source_image_column to the column (JSONL key) "
            "that holds each row's source image, e.g. data.source_image_column=source_image"
        )
    fmt = getattr(data, "format", None)  # prompt data (online RL) has none
    if fmt is not None and fmt not in ("ranked", "scored_pairs"):
        problems.append(
            f"data.format={data.format!r}: editing rows (source image + edits) are read from ranked JSONL; use "
            "data.format=ranked or scored_pairs"
        )
    if getattr(data, "latent_cache", None):
        problems.append(f"data.latent_cache: the cache holds no source latents ({m.family}); unset it")
    if getattr(cfg.validation, "every", 0):
        problems.append(
            f"validation.every={cfg.validation.every}: validation samples from prompts alone and {m.family} needs a "
            "source image per prompt; set validation.every=0"
        )
    if m.source_resolution is not None and m.family != "qwenimageedit":
        problems.append("model.source_resolution applies to qwenimageedit (fluxkontext edits at the data resolution)")


def _check_video(cfg: Any, problems: list[str]) -> None:
    """``data.num_frames`` belongs to the video families, as 4k + 1 frames; Wan's LoRA is the transformer's only."""
    m, data = cfg.model, cfg.data
    frames = getattr(data, "num_frames", None)
    if m.family not in VIDEO_FAMILIES:
        if frames is not None:
            problems.append(f"data.num_frames applies to video families {VIDEO_FAMILIES}, not {m.family!r}")
        if getattr(data, "format", None) == "video":
            problems.append(f"data.format=video needs a video model family {VIDEO_FAMILIES}, not {m.family!r}")
        return
    if frames is not None and (frames < 1 or (frames - 1) % 4):
        problems.append(f"data.num_frames={frames}: a {m.family} video has 4k + 1 frames (e.g. 33, 81)")
    if cfg.lora.text_encoder:
        problems.append(f"lora.text_encoder=true: the {m.family} pipeline saves a transformer LoRA only; set it false")
    if getattr(data, "format", "video") != "video":
        problems.append(f"data.format={data.format!r}: {m.family} trains on videos; use data.format=video")
    if getattr(data, "latent_cache", None):
        problems.append(f"data.latent_cache: no latent cache for video families ({m.family}) yet; unset it")


@dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    """Prompts the policy samples from (stepwise_pref, online_rl, reward_grad: no images): any ``diffalign.eval.prompts``
    source.

    ``prompts``: a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file or a shipped list name;
    ``key`` names the prompt column if it is not ``prompt``/``caption``/``text``. ``resolution`` is the sampling size.
    """

    prompts: str
    key: str | None = None
    # editing families: the key of each prompt's source image (a path relative to the prompts file) in a .jsonl
    source_image_column: str | None = None
    max_prompts: int | None = None
    resolution: int = 512
    num_frames: int | None = None  # video families (wan): frames per sampled video, 4k + 1 (None: the pipeline's 81)
