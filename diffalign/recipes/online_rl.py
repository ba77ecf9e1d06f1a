"""Online RL of a diffusion model as a LoRA: GRPO on SDE rollouts (Flow-GRPO, DanceGRPO, MixGRPO) and DDPO.

A round is ``online.updates_per_round`` optimizer steps (default 1; Flow-GRPO makes 2). Every process samples its block of the round's ``online.prompts_per_round x
online.group_size`` images with the current policy (LoRA on) using the stochastic sampler of
``diffalign.sampling.sde`` (flow models: Flow-GRPO's or DanceGRPO's SDE; epsilon / v models: DDIM with eta, DDPO),
in micro-batches of ``optim.batch_size``, keeping every transition and its log-probability. The final latents are
decoded and scored by the ``online.rewards`` scorers; the rewards of all processes are gathered, normalised per
prompt (``diffalign.terms.advantages``) and each process keeps its rows. Then, for every micro-batch (the same rows
as in the rollout, so the first ratio is exactly 1) and every trained step (``online.train_steps``; the last step
never), ``diffalign.terms.online.transition_log_prob`` re-evaluates the stored transition under the policy (and,
with ``loss.kl_coef > 0``, the reference: the same weights with the LoRA off) and ``diffalign.losses.grpo`` gives
the PPO-clipped loss; ``loop.optimizer_step`` accumulates ``optim.grad_accum`` of these (micro-batch, step) items
into one update (gradients averaged over the kept rows x trained steps of all processes; the NaN stop). The first
update of a round sees ratios of exactly 1 (it is plain policy gradient); later ones see the moved policy, and
the clip acts. Zero-std groups are kept in the forward (so the batch
composition stays the rollout's) but masked out of the loss. A non-finite rollout (sample, log-prob or reward, on
any process) stops the run before the advantages, like a non-finite loss (``check_rollout``).

Everything random is seeded: the prompts of round k from ``(run seed, epoch)``, each image's noises from ``(run
seed, round, global sample index)``, the trained steps from ``(run seed, round)``; so N processes reproduce one
process with the same global batch. Checkpoints fall between rounds (the config checks that ``updates_per_round``
divides ``run.save_every`` and ``run.max_steps``), so one needs only the round counter next to the LoRA and the
optimizer: a resumed run reproduces an uninterrupted one.

The peers' options (all off by default; each cited where it lives): ``online.sde_form=cps`` (CPS,
``diffusion.transition``), ``online.sde_arithmetic=flow_grpo`` (Flow-GRPO's order of the SDE mean, for the KL),
``online.same_latent`` (one initial noise per group, ``sampling.sde.rollout``), ``online.bestofn`` (DanceGRPO's
best/worst rows, ``terms.advantages``), ``online.adv_std=tracker`` (DDPO's per-prompt statistics, in the checkpoint),
``online.guidance_scale=1`` / ``online.eval_guidance_scale`` (no CFG: one conditional forward, no empty-prompt
encoding), ``online.train_steps=fast`` (Flow-GRPO-Fast's random SDE window), ``online.window_partial`` (MixGRPO's shortened
windows at the end of the grid, each update the mean over its steps), ``loss.ratio_norm`` /
``loss.grad_reweight`` (GRPO-Guard, ``losses.grpo``).

Launch:
    python recipes/online_rl.py --config recipes/configs/toy/grpo.yaml run.output_dir=runs/toy-grpo
    diffalign run online_rl --config sd3/grpo_pickscore run.output_dir=runs/grpo

Outputs in ``run.output_dir``: ``config.yaml``, ``checkpoints/step-*``, ``lora/pytorch_lora_weights.safetensors``,
``metrics.jsonl`` (reward mean / std per scorer, zero-std fraction, clip fraction, approx KL, grad norm; every
``validation.every`` steps the held-out ``heldout/<reward>`` and ``heldout/guard/<online.guard_scorers>`` of the
validation prompts), ``curves.png`` (those against rounds, redrawn at every held-out evaluation and at the end),
``validation/step-*/*.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from diffalign import config as dconfig
from diffalign import errors
from diffalign.models.base import Cond
from diffalign.sampling import seeds
from diffalign.sampling.guidance import default_info, encode_condition
from diffalign.sampling.sde import Grid, SDESpec, make_grid, rollout
from diffalign.sampling.seeds import draw_noise
from diffalign.scorers.base import score
from diffalign.terms import online, stepwise
from diffalign.terms.advantages import AdvantageSpec, PerPromptStats, gathered_advantages, tracked_advantages
from diffalign.training import curves, loop
from diffalign.training.prompts import PromptOrder, read_edit_prompts, read_prompts
from diffalign.types import PolicyTerms


logger = logging.getLogger("diffalign.online_rl")


@dataclass
class Micro:
    """One micro-batch of a round on this process: ``latents`` (b, N + 1, C, h, w), ``log_probs`` (b, N), the
    conditioning it was sampled with, and after scoring ``advantages`` / ``mask`` (b,). ``len`` = kept rows."""

    latents: Tensor
    log_probs: Tensor
    cond: Cond
    uncond: Cond | None
    prompts: list[str]
    advantages: Tensor | None = None
    mask: Tensor | None = None
    means: Tensor | None = None  # (b, N, C, h, w) rollout transition means (GRPO-Guard's RatioNorm)

    def __len__(self) -> int:
        return int(self.mask.sum()) if self.mask is not None else self.latents.shape[0]


@dataclass
class RoundBuffer:
    """The run's data source (``Run.loader``): the prompts, the round counter and the current round's
    (micro-batch, trained step) work items, consumed by ``next_batch`` during the round's one optimizer step."""

    prompts: list[str]
    seed: int
    rank: int = 0
    world_size: int = 1
    round: int = 0
    items: list[tuple[Micro, int]] | None = None
    tracker: PerPromptStats | None = None  # online.adv_std=tracker: DDPO's per-prompt reward buffers
    sources: list[Tensor] | None = None  # editing families: each prompt's source image (3, R, R) in [-1, 1]

    def __post_init__(self) -> None:
        self.order = PromptOrder(self.prompts, self.seed, seeds.PROMPT_ORDER)

    def prompt_at(self, position: int) -> str:
        return self.order[position]

    def sources_at(self, positions: Tensor) -> Tensor | None:
        """The source images (n, 3, R, R) of the prompts at ``positions``; None for text-to-image prompts."""
        if self.sources is None:
            return None
        return torch.stack([self.sources[self.order.index(int(p))] for p in positions])

    def next_batch(self) -> tuple[Micro, int]:
        if not self.items:
            raise RuntimeError("online_rl: the round's work items ran out (optim.grad_accum does not fit the round)")
        return self.items.pop(0)

    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None:
            return {"round": self.round}
        return {"round": self.round, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "round" not in state:
            raise KeyError(f"the checkpoint's data state {sorted(state)} has no round counter (not an online_rl run?)")
        self.round = int(state["round"])
        if self.tracker is not None:
            if "tracker" not in state and self.round:
                raise KeyError("online.adv_std=tracker but the checkpoint has no per-prompt reward buffers")
            self.tracker.load_state_dict(state.get("tracker", {}))

    def stats_summary(self) -> str:
        return f"{self.round} rollout rounds"


@dataclass
class State:
    run: loop.Run
    buffer: RoundBuffer
    objective: Any
    loss_cfg: Any
    grid: Grid
    spec: SDESpec
    adv_spec: AdvantageSpec
    scorers: dict[str, Any]
    guards: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Any:
        return self.run.cfg


# ---- setup --------------------------------------------------------------------------------------------
def build_scorers(cfg: Any, device: torch.device) -> dict[str, Any]:
    """The reward scorers; on a video family each scores frames, reduced per ``frame_reduction`` (``PerFrame``)."""
    from diffalign import scorers
    from diffalign.scorers.base import PerFrame

    out: dict[str, Any] = {}
    for name, r in cfg.online.rewards.items():
        if name == "toy_pixel":
            out[name] = stepwise.PixelLinearScorer(seed=r.seed, scale=r.scale)
        else:
            out[name] = scorers.load(name, device=device, **({"path": r.path} if r.path else {}), **r.options)
        if cfg.model.family in dconfig.VIDEO_FAMILIES:
            out[name] = PerFrame(out[name], r.frame_reduction, r.frame_stride)
    return out


def build_guards(cfg: Any, device: torch.device) -> dict[str, Any]:
    from diffalign import scorers
    from diffalign.scorers.base import PerFrame

    guards = {name: scorers.load(name, device=device) for name in cfg.online.guard_scorers}
    if cfg.model.family in dconfig.VIDEO_FAMILIES:
        guards = {name: PerFrame(g) for name, g in guards.items()}
    return guards


def setup(cfg: Any, accelerator: Any) -> State:
    """Model, LoRA, rewards and the round buffer; ``loop.start`` has checked that ``optim.grad_accum`` fits one round
    on ``accelerator.num_processes`` processes (``config.launch_problems``)."""
    objective, loss_cfg = dconfig.loss_config(cfg.loss)
    adapter = loop.build_adapter(cfg, accelerator.device, need_reference=loss_cfg.kl_coef > 0)
    adapter.denoiser.eval()  # rollout and update see the same policy (no LoRA dropout; checked by the config)
    o = cfg.online
    if getattr(cfg.data, "source_image_column", None):  # editing: a source image per prompt
        prompts, sources = read_edit_prompts(cfg.data)
    else:
        prompts, sources = read_prompts(cfg.data), None
    buffer = RoundBuffer(prompts, cfg.run.seed, accelerator.process_index, accelerator.num_processes)
    buffer.sources = sources
    if o.adv_std == "tracker":
        buffer.tracker = PerPromptStats(o.tracker_buffer, o.tracker_min_count)
    state = State(
        loop.build_run(cfg, accelerator, adapter, loader=buffer),
        buffer,
        objective,
        loss_cfg,
        make_grid(adapter, o.num_steps, spacing=o.spacing),
        SDESpec(form=o.sde_form, noise_level=o.noise_level, arithmetic=o.sde_arithmetic),
        AdvantageSpec(
            std=o.adv_std,
            eps=o.adv_eps,
            unbiased=o.adv_unbiased,
            clip=o.adv_clip,
            per_reward=o.per_reward,
            bestofn=o.bestofn,
        ),
        build_scorers(cfg, accelerator.device),
        build_guards(cfg, accelerator.device),
    )
    if getattr(loss_cfg, "grad_reweight", False) and not state.grid.is_flow:
        raise ValueError(f"loss.grad_reweight (GRPO-Guard's 1 / |dt|) needs a flow model; {cfg.model.family} is not")
    if o.sde_form == "cps" and not state.grid.is_flow:
        raise ValueError(f"online.sde_form=cps needs a flow model; {cfg.model.family} steps DDIM (already CPS-like)")
    path = loop.resume_path(cfg)
    if path is not None:
        loop.restore(state.run, path)
    return state


# ---- one round ----------------------------------------------------------------------------------------
def round_steps(state: State) -> tuple[Tensor, Tensor]:
    """(trained steps, SDE-step mask (N,)) of the current round; the same on every process."""
    o, n, k = state.cfg.online, state.grid.num_steps, state.buffer.round
    if o.train_steps == "window":
        start = online.window_start(
            k,
            num_steps=n,
            stride=o.window_stride,
            interval=o.window_interval,
            init=o.window_init,
            size=o.window_size,
            partial=o.window_partial,
        )
        steps = online.train_steps(n, mode="window", window=(start, o.window_size))
        sde = torch.zeros(n, dtype=torch.bool)
        sde[steps] = True  # MixGRPO: SDE inside the window, ODE elsewhere
        return steps, sde
    gen = seeds.generator(state.buffer.seed, k, seeds.ROUND_DRAW)
    if o.train_steps == "fast":  # Flow-GRPO-Fast: one random SDE window per round, the same on every process
        lo, size = o.fast_window_lo, o.fast_window_size
        start = lo + int(torch.randint(o.fast_window_hi - size - lo + 1, (), generator=gen))
        steps = online.train_steps(n, mode="window", window=(start, size))
        sde = torch.zeros(n, dtype=torch.bool)
        sde[steps] = True
        return steps, sde
    steps = online.train_steps(n, fraction=o.timestep_fraction, shuffle=o.shuffle_steps, generator=gen)
    return steps, torch.ones(n, dtype=torch.bool)


def sample_round(state: State, sde: Tensor) -> tuple[list[Micro], Tensor, dict[str, Tensor], float]:
    """This process's rollouts in micro-batches, their global prompt positions (n,), rewards per scorer and the
    seconds spent scoring."""
    cfg, adapter, buf = state.cfg, state.run.adapter, state.buffer
    o, b = cfg.online, cfg.optim.batch_size
    per_process = o.prompts_per_round * o.group_size // buf.world_size
    first = buf.rank * per_process
    index = torch.arange(first, first + per_process)
    positions = buf.round * o.prompts_per_round + index // o.group_size
    shape = adapter.latent_shape(cfg.data.resolution)
    micros, rewards = [], {name: [] for name in state.scorers}
    scoring = 0.0
    for start in range(0, per_process, b):
        rows = index[start : start + b]
        prompts = [buf.prompt_at(int(p)) for p in positions[start : start + b]]
        info = [default_info(adapter, shape[-2:])] * len(prompts)
        gens = [seeds.generator(buf.seed, buf.round, int(g), seeds.SAMPLE_NOISE) for g in rows]
        initial = None
        if o.same_latent:  # one initial noise per prompt position: a group shares it (its SDE noises differ)
            group_gens = [seeds.generator(buf.seed, int(p), seeds.GROUP_NOISE) for p in positions[start : start + b]]
            initial = draw_noise(group_gens, shape, adapter.device)
        with torch.no_grad(), state.run.accelerator.autocast():
            # guidance_scale 1 (no CFG): no unconditional encoding and one conditional forward per step (Flow-GRPO
            # train.cfg=False, scripts/train_sd3.py:196-203)
            sources = buf.sources_at(positions[start : start + b])
            cond, uncond = encode_condition(
                adapter, prompts, info, o.uncond, with_uncond=o.guidance_scale != 1.0, sources=sources
            )
            traj = rollout(
                adapter, state.grid, state.spec, cond, uncond, generators=gens, latent_shape=shape,
                guidance_scale=o.guidance_scale, sde_steps=sde, initial=initial,
                keep_means=bool(getattr(state.loss_cfg, "ratio_norm", False)),
            )  # fmt: skip
            images = (adapter.decode_latents(traj.final) + 1.0) / 2.0
        t0 = time.perf_counter()
        for name, scorer in state.scorers.items():
            rewards[name].append(score(scorer, images, prompts, sources).float().cpu())
        scoring += time.perf_counter() - t0
        micros.append(Micro(traj.latents, traj.log_probs, cond, uncond, prompts, means=traj.means))
    return micros, positions, {name: torch.cat(v) for name, v in rewards.items()}, scoring


def check_rollout(state: State, micros: list[Micro], rewards: dict[str, Tensor], sde: Tensor) -> None:
    """The NaN stop for the rollout: a non-finite sample, log-probability or reward on any process stops the run
    (``loop``'s ``FloatingPointError``; the checkpoint of the weights that sampled it is set aside) before the
    advantages see it."""
    bad = sum(int((~torch.isfinite(r)).sum()) for r in rewards.values())
    for m in micros:  # deterministic (ODE) steps store a NaN log-prob by design: only the SDE steps count
        bad += int((~torch.isfinite(m.latents)).any()) + int(
            (~torch.isfinite(m.log_probs[:, sde.to(m.log_probs.device)])).any()
        )
    acc = state.run.accelerator  # once per round, every process: the rollout already synchronises for the rewards
    total = torch.tensor(float(bad), device=acc.device)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    if total.item():
        what = f"non-finite rollout (samples, log-probs or rewards) before step {state.run.step + 1}"
        raise loop.non_finite(state.run, state.run.step + 1, what, weights_bad=True)


def fill_round(state: State) -> dict[str, Tensor]:
    """Roll out, score and normalise one round; queue its (micro-batch, step) items; round statistics."""
    o, buf, acc = state.cfg.online, state.buffer, state.run.accelerator
    steps, sde = round_steps(state)
    t0 = time.perf_counter()
    micros, positions, rewards, scoring = sample_round(state, sde)
    t1 = time.perf_counter()
    check_rollout(state, micros, rewards, sde)
    weights = {name: r.weight for name, r in o.rewards.items()}
    if buf.tracker is not None:
        adv = tracked_advantages(rewards, positions, state.adv_spec, buf.tracker, buf.prompt_at, acc, weights)
    else:
        adv = gathered_advantages(rewards, positions, state.adv_spec, acc, weights)
    offset = 0
    for micro in micros:
        n = micro.latents.shape[0]
        micro.advantages = adv.values[offset : offset + n].to(micro.latents.device)
        micro.mask = adv.mask[offset : offset + n].to(micro.latents.device)
        offset += n
    buf.items = [(micro, int(j)) for micro in micros for j in steps]
    if len(steps) < o.trained_steps_per_round():  # MixGRPO's shortened end window: its update is the mean over its
        # steps, so the missing items are empty (no forward; optimizer_step averages over the rows it saw)
        empty = [dataclasses.replace(m, mask=torch.zeros_like(m.mask)) for m in micros]
        buf.items += [(m, int(steps[-1])) for m in empty for _ in range(o.trained_steps_per_round() - len(steps))]
    buf.round += 1
    stats = {k: torch.tensor(v) for k, v in adv.metrics.items()}
    stats["time/rollout"] = torch.tensor(t1 - t0 - scoring)
    stats["time/scoring"] = torch.tensor(scoring)
    stats["round/trained_steps"] = torch.tensor(float(len(steps)))
    return stats


def micro_step(state: State, micro: Micro, step: int) -> dict[str, Tensor]:
    """GRPO loss of one micro-batch at one trained step (mean over its kept rows); backward by the caller."""
    o, adapter = state.cfg.online, state.run.adapter
    args = (adapter, state.grid, state.spec, micro.latents[:, step], micro.latents[:, step + 1], step)
    kw = {"guidance_scale": o.guidance_scale}
    with state.run.accelerator.autocast():
        now = online.transition_log_prob(*args, micro.cond, micro.uncond, detach_uncond=o.detach_uncond, **kw)
        ref = None
        if state.loss_cfg.kl_coef > 0:
            with torch.no_grad(), adapter.reference():
                ref = online.transition_log_prob(*args, micro.cond, micro.uncond, **kw)
    terms = PolicyTerms(
        policy=now.log_prob,
        old=micro.log_probs[:, step],
        advantages=micro.advantages,
        mask=micro.mask,
        policy_mean=now.mean,
        ref_mean=ref.mean if ref is not None else None,
        kl_scale=now.kl_scale,
    )
    if getattr(state.loss_cfg, "ratio_norm", False) or getattr(state.loss_cfg, "grad_reweight", False):
        delta = None  # GRPO-Guard: the rollout mean, the step's std and (flow) |dt|
        if getattr(state.loss_cfg, "grad_reweight", False):
            levels = state.grid.levels.to(now.mean.device)
            delta = (levels[step] - levels[step + 1]).expand(now.mean.shape[0])
        old_mean = micro.means[:, step] if micro.means is not None else None
        terms = dataclasses.replace(terms, old_mean=old_mean, step_std=now.std, step_dt=delta)
    out = state.objective.loss(terms, state.loss_cfg)
    return {"loss": out.loss, **{f"loss/{k}": v for k, v in out.metrics.items()}}


def train_step(state: State) -> dict[str, float]:
    """One optimizer step; a new round first when the last one's items are used up (``updates_per_round`` steps)."""
    stats = fill_round(state) if not state.buffer.items else {}
    t0 = time.perf_counter()
    shown = loop.optimizer_step(state.run, partial(micro_step, state), metrics=stats)
    shown["time/update"] = time.perf_counter() - t0
    see_it_learn(state, shown)
    return shown


# ---- held-out scores and curves -----------------------------------------------------------------------
@torch.no_grad()
def heldout_scores(state: State) -> dict[str, float]:
    """Mean reward (``heldout/<reward>``) and guard score (``heldout/guard/<name>``) of the policy's samples of the
    validation prompts: the rollout grid and CFG (``online.eval_guidance_scale``; 1: none), sampled as an ODE (no SDE noise), image i from seed
    ``validation.seed + i``. Every process scores the whole set (no collective; the same numbers everywhere)."""
    cfg, adapter = state.cfg, state.run.adapter
    o, prompts = cfg.online, loop.validation_prompts(cfg)
    shape = adapter.latent_shape(cfg.data.resolution)
    named = {f"heldout/{k}": v for k, v in state.scorers.items()} | {
        f"heldout/guard/{k}": v for k, v in state.guards.items()
    }
    scores: dict[str, list[Tensor]] = {k: [] for k in named}
    scale = o.guidance_scale if o.eval_guidance_scale is None else o.eval_guidance_scale
    for start in range(0, len(prompts), cfg.optim.batch_size):
        batch = prompts[start : start + cfg.optim.batch_size]
        gens = [torch.Generator().manual_seed(cfg.validation.seed + start + i) for i in range(len(batch))]
        info = [default_info(adapter, shape[-2:])] * len(batch)
        with state.run.accelerator.autocast():
            cond, uncond = encode_condition(adapter, batch, info, o.uncond, with_uncond=scale != 1.0)
            traj = rollout(
                adapter, state.grid, state.spec, cond, uncond, generators=gens,
                latent_shape=shape, guidance_scale=scale, sde_steps=torch.zeros(state.grid.num_steps),
            )  # fmt: skip
            images = (adapter.decode_latents(traj.final) + 1.0) / 2.0
        for key, scorer in named.items():
            scores[key].append(scorer(images, batch).float().cpu())
    return {k: float(torch.cat(v).mean()) for k, v in scores.items()}


def curve_keys(state: State) -> list[str]:
    """What ``curves.png`` draws: training reward per scorer, held-out rewards and guards, KL, clip fraction."""
    o = state.cfg.online
    keys = [f"reward/{name}/mean" for name in o.rewards]
    if state.cfg.validation.every:
        keys += [f"heldout/{name}" for name in o.rewards] + [f"heldout/guard/{g}" for g in o.guard_scorers]
    return [*keys, "loss/kl", "loss/approx_kl", "loss/clip_frac"]


def see_it_learn(state: State, shown: dict[str, float]) -> None:
    """Every ``validation.every`` steps: held-out scores into this step's metrics (logged now if this is not a
    logging step); then ``curves.png`` of the reward, held-out and guard scores, KL and clip fraction next to
    ``metrics.jsonl`` (main process; at the end of the run ``loop.train`` draws every metric there)."""
    cfg, run = state.cfg, state.run
    every, step = cfg.validation.every, run.step
    due = bool(every) and step % every == 0
    if due:
        held = heldout_scores(state)
        shown.update(held)
        if not loop.log_step(cfg, step):  # else loop.train logs them with the step's row
            loop.log(run, held)
    if due and step < cfg.run.max_steps and run.accelerator.is_main_process:  # the last: loop.train's curves.png
        logged = curves.read_metrics(run.output_dir) if (run.output_dir / curves.METRICS_FILE).is_file() else []
        rows = [*logged, {"step": step, **shown}]
        curves.draw({run.output_dir.name: rows}, run.output_dir / curves.CURVES_FILE, keys=curve_keys(state))


def progress(metrics: dict[str, float]) -> dict[str, str]:
    reward = next((v for k, v in metrics.items() if k.startswith("reward/") and k.endswith("/mean")), float("nan"))
    return {"loss": f"{metrics['loss']:.4f}", "reward": f"{reward:.3f}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.OnlineRLConfig, __doc__.splitlines()[0], example="toy/grpo")
    acc = loop.make_accelerator(cfg)
    loop.start(
        cfg, acc, f"online_rl ({cfg.loss.name}) on {acc.num_processes} processes: {dconfig.to_dict(cfg.online)}"
    )
    state = setup(cfg, acc)
    result = loop.train(state.run, partial(train_step, state), postfix=progress)
    return {**result, "rounds": state.buffer.round}


if __name__ == "__main__":
    errors.script_main(main)
