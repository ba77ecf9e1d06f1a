"""Schema and cross-field checks of ``recipes/online_rl.py`` (GRPO on SDE rollouts: Flow-GRPO, DanceGRPO, MixGRPO,
DDPO)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign import registry
from diffalign.config.common import (
    VIDEO_FAMILIES,
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
    text_encoders_trained,
)
from diffalign.config.engine import register_launch_check, register_recipe, register_validator


TOY_REWARDS = ("toy_pixel",)


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """One reward scorer (keyed by its ``diffalign.scorers`` name, or ``toy_pixel``: a fixed random linear map of
    pooled pixels) and its weight in the combined reward. ``path``: the scorer's weights (None: its default)."""

    weight: float = 1.0
    path: str | None = None
    seed: int = 0  # toy_pixel
    scale: float = 1.0  # toy_pixel
    options: dict[str, Any] = field(default_factory=dict)  # more keyword options of the scorer's load()
    # video families (wan): the image scorer on every frame_stride-th frame, reduced over frames (scorers.base.PerFrame)
    frame_reduction: Literal["mean", "min"] = "mean"
    frame_stride: int = 1


@dataclass(frozen=True, kw_only=True)
class OnlineSection:
    """Rollouts, advantages and trained steps (``diffalign.terms.online``, ``diffalign.terms.advantages``).

    A round samples ``prompts_per_round`` prompts x ``group_size`` images over all processes (each process an equal
    block), scores them, normalises the rewards per prompt and makes ``updates_per_round`` optimizer steps, each
    over its share of the micro-batches at every trained step: ``optim.grad_accum`` must be (samples per process /
    ``optim.batch_size`` / ``updates_per_round``) x trained steps per round.
    """

    num_steps: int = 10
    # flow models; VP models step DDIM. cps: Coefficients-Preserving Sampling (arXiv 2509.05952; Flow-GRPO
    # sde_type="cps", sd3_sde_with_logprob.py:70-86): noise_level in (0, 1] (authors 0.8), unnormalised log-prob
    # -(x' - mean)^2, so use their clip_range 1e-5 (config/grpo.py geneval_sd3_fast_nocfg)
    # flow_grpo_wan: flow_grpo's Wan2.1 SDE (scripts/train_wan2_1.py), its KL over the full step std
    sde_form: Literal["flow_grpo", "dance_grpo", "cps", "flow_grpo_wan"] = "flow_grpo"
    noise_level: float = 0.7  # Flow-GRPO a 0.7; DanceGRPO eta 0.3; CPS a 0.8; DDPO eta 1.0
    # the flow_grpo mean's order: "flow_grpo" = the authors' x (1 + ..) + v (..) dt (sd3_sde_with_logprob.py:50),
    # where x cancels exactly in the KL's mean difference (more precise in fp32); "diffalign" = this library's order
    sde_arithmetic: Literal["diffalign", "flow_grpo"] = "diffalign"
    spacing: Literal["diffusers", "linear", "unipc"] = "diffusers"  # flow grid (linear: DanceGRPO; unipc: Wan's UniPC)
    # 1.0: no CFG, in rollout and update: one conditional forward, the empty prompt never encoded (Flow-GRPO's
    # *_nocfg configs, config/grpo.py:172-174: RL distils CFG away). FLUX.1-dev uses its guidance embedding.
    guidance_scale: float = 4.5
    # the held-out evaluation's CFG scale (None: guidance_scale; Flow-GRPO sample.eval_guidance_scale)
    eval_guidance_scale: float | None = None
    uncond: Literal["empty_prompt", "zeros"] = "empty_prompt"
    detach_uncond: bool = True  # Flow-GRPO; DDPO trains through both branches
    prompts_per_round: int = 2
    group_size: int = 4
    # one initial noise per group (its SDE step noises still differ): Flow-GRPO sample.same_latent
    # (scripts/train_sd3.py:170-178, 637-640 at 9745241), DanceGRPO --init_same_noise (train_grpo_flux.py:333-347)
    same_latent: bool = False
    # train only bestofn of each group: the bestofn/2 best and bestofn/2 worst by advantage, the others masked out of
    # the loss (0: all). DanceGRPO --bestofn (fastvideo/train_grpo_hunyuan.py:394-410)
    bestofn: int = 0
    updates_per_round: int = 1  # Flow-GRPO: 2 (the second sees ratios != 1); checkpoints only between rounds
    # fraction: the first int(N timestep_fraction) steps (or a random set with shuffle_steps); window: MixGRPO's sliding
    # SDE window (ODE elsewhere); fast: Flow-GRPO-Fast, an SDE window of fast_window_size steps at a random start in
    # [fast_window_lo, fast_window_hi - size] each round, ODE elsewhere, only the window trained (Flow-GRPO
    # sd3_pipeline_with_logprob_fast.py:136-142, train_sd3_fast.py:348-351, config/base.py:65-67). With same_latent
    # the group shares one ODE trajectory up to the window and branches there (the README's Flow-GRPO-Fast).
    train_steps: Literal["fraction", "window", "fast"] = "fraction"
    fast_window_size: int = 2
    fast_window_lo: int = 0
    fast_window_hi: int = 5  # exclusive end; Flow-GRPO's SD3 Fast configs: range (0, num_steps // 2)
    timestep_fraction: float = 0.99  # Flow-GRPO int(10 * 0.99) = 9; DanceGRPO 0.6 with shuffle_steps
    shuffle_steps: bool = False
    window_size: int = 4  # MixGRPO
    window_stride: int = 1
    window_interval: int = 25
    window_init: int = 0
    # MixGRPO's walk into the shortened windows at the end of the grid (grpo_states.py:138-148) before rolling back;
    # false: only full windows. A shortened window's update is the mean over its steps (train_grpo_flux.py:582)
    window_partial: bool = False
    # group: the group's std; global: the round's (Flow-GRPO); tracker: DDPO's PerPromptStatTracker
    # (ddpo_pytorch/stat_tracking.py:5-30, config/base.py:104-111): per-prompt buffers of the last tracker_buffer
    # rewards across rounds, the round's mean/std while a prompt has < tracker_min_count; kept in the checkpoint
    adv_std: Literal["global", "group", "tracker"] = "global"
    tracker_buffer: int = 16
    tracker_min_count: int = 16
    adv_eps: float = 1.0e-4
    adv_unbiased: bool = False
    adv_clip: float = 5.0
    per_reward: bool = False
    rewards: dict[str, RewardConfig] = field(default_factory=lambda: {"toy_pixel": RewardConfig()})
    # held-out scorers (diffalign.scorers names): scored with the rewards on the validation prompts every
    # validation.every steps (heldout/guard/<name>), never trained on: a reward rising while a guard falls is hacking
    guard_scorers: list[str] = field(default_factory=list)

    def trained_steps_per_round(self) -> int:
        if self.train_steps == "window":
            return min(self.window_size, self.num_steps - 1)
        if self.train_steps == "fast":
            return self.fast_window_size
        return max(1, min(int(self.num_steps * self.timestep_fraction), self.num_steps - 1))


@dataclass(frozen=True, kw_only=True)
class OnlineRLConfig:
    """Schema of ``recipes/online_rl.py``: online RL with group-relative advantages on SDE rollouts."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: PromptDataConfig
    online: OnlineSection = field(default_factory=OnlineSection)
    loss: LossSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


register_recipe("online_rl", OnlineRLConfig)


def grad_accum_for(cfg: OnlineRLConfig, num_processes: int) -> int:
    """The ``optim.grad_accum`` one update needs on ``num_processes`` processes (0 if the split is not even): the
    process's micro-batches of a round / ``updates_per_round``, x trained steps."""
    o = cfg.online
    samples = o.prompts_per_round * o.group_size
    if samples % num_processes or (samples // num_processes) % cfg.optim.batch_size:
        return 0
    micro = samples // num_processes // cfg.optim.batch_size
    if micro % o.updates_per_round:
        return 0
    return micro // o.updates_per_round * o.trained_steps_per_round()


@register_launch_check(OnlineRLConfig)
def check_launch(cfg: OnlineRLConfig, num_processes: int) -> list[str]:
    """``optim.grad_accum`` must make one optimizer step of each process's share of a round."""
    need = grad_accum_for(cfg, num_processes)
    if need == cfg.optim.grad_accum:
        return []
    what = f"set optim.grad_accum={need}" if need else "change online.prompts_per_round or optim.batch_size"
    return [
        f"optim.grad_accum={cfg.optim.grad_accum} does not fit one round on {num_processes} "
        f"process{'es' if num_processes > 1 else ''} (samples per process / optim.batch_size x trained steps): {what}"
    ]


@register_validator(OnlineRLConfig)
def _check_online(cfg: OnlineRLConfig) -> list[str]:
    problems: list[str] = []
    o = cfg.online
    check_training(cfg, problems)
    check_loss_kind(cfg, problems, "online_rl", kind="policy", examples="grpo")
    check_positive(
        problems,
        online__prompts_per_round=o.prompts_per_round,
        online__window_size=o.window_size,
        online__window_stride=o.window_stride,
        online__window_interval=o.window_interval,
        online__adv_eps=o.adv_eps,
        online__adv_clip=o.adv_clip,
        online__guidance_scale=o.guidance_scale,
    )
    if o.num_steps < 2:
        problems.append(f"online.num_steps={o.num_steps} must be >= 2 (the last step is never trained)")
    if o.group_size < 2:
        problems.append(f"online.group_size={o.group_size} must be >= 2 (advantages are relative to the group)")
    if o.noise_level <= 0:
        problems.append(f"online.noise_level={o.noise_level} must be > 0 (a deterministic sampler has no log-prob)")
    if o.bestofn and (o.bestofn % 2 or not 2 <= o.bestofn < o.group_size):
        problems.append(f"online.bestofn={o.bestofn} must be 0 (all) or even and in [2, online.group_size)")
    if o.eval_guidance_scale is not None and not (o.eval_guidance_scale > 0 and math.isfinite(o.eval_guidance_scale)):
        problems.append(f"online.eval_guidance_scale={o.eval_guidance_scale} must be finite and > 0 (1: no CFG)")
    guard = [k for k in ("ratio_norm", "grad_reweight") if cfg.loss.params.get(k)]
    if guard and o.sde_form == "cps":
        problems.append(
            f"loss.{guard[0]} (GRPO-Guard) needs the Gaussian flow_grpo / dance_grpo SDE, not online.sde_form=cps"
        )
    if o.adv_std == "tracker":
        if not 1 <= o.tracker_min_count <= o.tracker_buffer:
            problems.append(
                f"online.tracker_min_count={o.tracker_min_count} must be in [1, online.tracker_buffer="
                f"{o.tracker_buffer}]"
            )
        for key, value in (("per_reward", o.per_reward), ("adv_unbiased", o.adv_unbiased), ("bestofn", o.bestofn)):
            if value:
                problems.append(f"online.{key}={value} is not supported with online.adv_std=tracker")
    if o.sde_form == "cps" and o.noise_level > 1:
        problems.append(f"online.noise_level={o.noise_level} must be in (0, 1] with online.sde_form=cps (sin(a pi/2))")
    if o.sde_arithmetic == "flow_grpo" and o.sde_form != "flow_grpo":
        problems.append(f"online.sde_arithmetic=flow_grpo orders the flow_grpo mean; online.sde_form={o.sde_form!r}")
    if not 0 < o.timestep_fraction <= 1:
        problems.append(f"online.timestep_fraction={o.timestep_fraction} must be in (0, 1]")
    if o.train_steps == "fast" and not (
        o.fast_window_size >= 1 and 0 <= o.fast_window_lo <= o.fast_window_hi - o.fast_window_size
        and o.fast_window_hi <= o.num_steps - 1
    ):  # fmt: skip
        problems.append(
            f"online.fast_window_size={o.fast_window_size} must be >= 1 and fit in [online.fast_window_lo="
            f"{o.fast_window_lo}, online.fast_window_hi={o.fast_window_hi}), with fast_window_hi <= num_steps - 1"
        )
    if o.train_steps == "window" and o.window_partial and not 0 <= o.window_init <= o.num_steps - 2:
        problems.append(
            f"online.window_init={o.window_init} must be in [0, online.num_steps - 2] (at least one trainable step "
            "in the window)"
        )
    elif (
        o.train_steps == "window"
        and not o.window_partial
        and not 0 <= o.window_init <= o.num_steps - 1 - o.window_size
    ):
        problems.append(
            f"online.window_init={o.window_init} must be in [0, online.num_steps - 1 - window_size] (a full window "
            "inside the trainable steps), or set online.window_partial=true"
        )
    u = o.updates_per_round
    if u < 1 or cfg.run.max_steps % u or cfg.run.save_every % u:
        problems.append(
            f"online.updates_per_round={u} must be >= 1 and divide run.max_steps={cfg.run.max_steps} and "
            f"run.save_every={cfg.run.save_every} (checkpoints fall between rounds)"
        )
    if o.guard_scorers:
        from diffalign import scorers

        for name in o.guard_scorers:
            if name not in scorers.available():
                problems.append(f"online.guard_scorers: {name!r}: {registry.suggest(name, scorers.available())}")
        if not cfg.validation.every:
            problems.append("online.guard_scorers are scored on the validation prompts: set validation.every > 0")
    if cfg.validation.every and not (cfg.validation.prompts or cfg.validation.prompts_file):
        problems.append("validation.every > 0 needs held-out prompts: validation.prompts or validation.prompts_file")
    _check_frame_options(cfg, problems)
    if not o.rewards:
        problems.append("online.rewards is empty; name at least one reward scorer (e.g. {pickscore: {weight: 1}})")
    if cfg.lora.dropout > 0:
        problems.append(
            f"lora.dropout={cfg.lora.dropout}: rollout and update must see the same policy for the first ratio to be "
            "exactly 1; use lora.dropout=0"
        )
    if trained := text_encoders_trained(cfg):
        problems.append(f"{trained} is not supported by online_rl (prompts are encoded once per round)")
    samples = o.prompts_per_round * o.group_size
    if samples % cfg.optim.batch_size:
        problems.append(
            f"online.prompts_per_round x group_size = {samples} samples must split into optim.batch_size="
            f"{cfg.optim.batch_size} micro-batches"
        )
    elif cfg.optim.grad_accum % o.trained_steps_per_round() or grad_accum_for(cfg, 1) % cfg.optim.grad_accum:
        problems.append(
            f"optim.grad_accum={cfg.optim.grad_accum}: an optimizer step covers 1 / updates_per_round of a round's "
            f"samples at every trained step; on N processes it must be {samples // cfg.optim.batch_size} / N "
            f"micro-batches / {o.updates_per_round} x {o.trained_steps_per_round()} trained steps (1 process: "
            f"{grad_accum_for(cfg, 1)})"
        )
    return problems


def _check_frame_options(cfg: OnlineRLConfig, problems: list[str]) -> None:
    """``frame_reduction`` / ``frame_stride`` of a reward: video families only, stride >= 1."""
    for name, r in cfg.online.rewards.items():
        if r.frame_stride < 1:
            problems.append(f"online.rewards.{name}.frame_stride={r.frame_stride} must be >= 1")
        if cfg.model.family not in VIDEO_FAMILIES and (r.frame_reduction != "mean" or r.frame_stride != 1):
            problems.append(
                f"online.rewards.{name}.frame_reduction / frame_stride apply to video families {VIDEO_FAMILIES}, "
                f"not {cfg.model.family!r}"
            )
