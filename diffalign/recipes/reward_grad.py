"""Reward-gradient fine-tuning of a diffusion model as a LoRA: ReFL, DRaFT-K, DRaFT-LV and AlignProp.

Each micro-batch takes ``optim.batch_size`` prompts, samples them with the policy (LoRA on) on the family's sampler,
keeping the graph where the method says (``diffalign.terms.reward_grad``: ReFL's one late step on the predicted x0,
DRaFT's last K steps or LV's re-noised last step, AlignProp's randomly truncated, checkpointed chain), decodes with
the VAE, scores the images with ``reward_grad.scorer`` through its differentiable path (``grad=True``) and
backpropagates ``loss_scale * relu(margin - r)`` (or the linear form) plus ``kl_coeff`` x the policy-reference
distance. The ``guard_scorers`` score the same images without grad; they are only logged (``guard/<name>``), the
reward-hacking guard: the trained reward going up while a held-out one goes down.

Everything random is seeded: prompt order from ``(run seed, epoch)``, each prompt's sampling noise from ``(run seed,
global prompt position)``, the method's per-batch draws (ReFL step, AlignProp truncation, LV noise) from ``(run
seed, micro-batch index)``. N processes with batch b see the same prompts as one with N * b, and a resumed run
reproduces an uninterrupted one (checkpoints hold the LoRA, optimizer and the micro-batch counter).

Launch:
    python recipes/reward_grad.py --config recipes/configs/toy/refl_world.yaml run.output_dir=runs/toy-refl
    diffalign run reward_grad --config sd15/refl_lora data.prompts=/data/prompts.txt run.output_dir=runs/refl

Outputs in ``run.output_dir``: ``config.yaml``, ``checkpoints/step-*``, ``lora/pytorch_lora_weights.safetensors``
(diffusers format), ``metrics.jsonl`` (``reward/<scorer>``, ``guard/<name>``, ``kl``), ``validation/step-*/*.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from diffalign import config as dconfig
from diffalign import errors, scorers
from diffalign.sampling import seeds
from diffalign.terms import reward_grad
from diffalign.training import loop
from diffalign.training.prompts import PromptOrder, read_prompts


logger = logging.getLogger("diffalign.reward_grad")


@dataclass
class PromptSource:
    """The recipe's data source (``Run.loader``): micro-batch ``m`` of process ``r`` holds global prompt positions
    ``(m * world_size + r) * batch_size ...``; a fresh permutation of the prompts per epoch."""

    prompts: list[str]
    seed: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    batch: int = 0

    def __post_init__(self) -> None:
        self.order = PromptOrder(self.prompts, self.seed, seeds.PROMPT_ORDER)

    def prompt_at(self, position: int) -> str:
        return self.order[position]

    def next_batch(self) -> tuple[list[str], list[int], int]:
        """(prompts, one sampling seed per prompt, the micro-batch's seed): the arguments of ``micro_step``."""
        first = (self.batch * self.world_size + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        noise_seeds = [seeds.mixed_seed(self.seed, p, seeds.SAMPLE_NOISE) for p in positions]
        batch_seed = seeds.mixed_seed(self.seed, self.batch, seeds.ROUND_DRAW)
        self.batch += 1
        return [self.prompt_at(p) for p in positions], noise_seeds, batch_seed

    def state_dict(self) -> dict[str, int]:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batch" not in state:
            raise KeyError(
                f"the checkpoint's data state {sorted(state)} has no micro-batch counter (not reward_grad?)"
            )
        self.batch = int(state["batch"])

    def stats_summary(self) -> str:
        return f"{self.batch} micro-batches of {self.batch_size} prompts per process"


@dataclass
class State:
    run: loop.Run
    spec: reward_grad.GradSpec
    scorer: Any
    guards: dict[str, Any]

    @property
    def cfg(self) -> Any:
        return self.run.cfg


def grad_spec(cfg: Any) -> reward_grad.GradSpec:
    r = cfg.reward_grad
    return reward_grad.GradSpec(
        method=r.method,
        num_steps=r.num_steps,
        guidance_scale=r.guidance_scale,
        eta=r.eta,
        uncond=r.uncond,
        resolution=cfg.data.resolution,
        refl_steps=tuple(r.refl_steps),
        k=r.k,
        lv_samples=r.lv_samples,
        truncation=r.truncation,
        truncation_args=tuple(r.truncation_args),
        checkpointing=r.checkpointing,
    )


def load_scorer(name: str, device: torch.device, path: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"device": device}
    if path:
        kwargs["path"] = path
    return scorers.load(name, **kwargs)


def setup(cfg: Any, accelerator: Any) -> State:
    r = cfg.reward_grad
    adapter = loop.build_adapter(cfg, accelerator.device, need_reference=r.kl_coeff > 0)
    scorer = load_scorer(r.scorer, accelerator.device, r.scorer_path)
    if r.scorer_checkpointing:
        scorer.gradient_checkpointing(True)
    guards = {name: load_scorer(name, accelerator.device) for name in r.guard_scorers}
    source = PromptSource(
        read_prompts(cfg.data),
        cfg.run.seed,
        cfg.optim.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    state = State(loop.build_run(cfg, accelerator, adapter, loader=source), grad_spec(cfg), scorer, guards)
    path = loop.resume_path(cfg)
    if path is not None:
        loop.restore(state.run, path)
    return state


def micro_step(state: State, prompts: list[str], seeds: list[int], batch_seed: int) -> dict[str, torch.Tensor]:
    """Loss and metrics of one micro-batch of prompts; backward is done by the caller."""
    r = state.cfg.reward_grad
    with state.run.accelerator.autocast():
        ro = reward_grad.rollout(
            state.run.adapter, prompts, seeds, state.spec, batch_seed=batch_seed, kl=r.kl_coeff > 0
        )
    rewards = reward_grad.group_mean(state.scorer(ro.images, ro.prompts, grad=True), ro.n)
    loss = reward_grad.reward_loss(rewards, r.loss, r.margin, r.loss_scale).mean() + r.kl_coeff * ro.kl
    metrics = {
        "loss": loss,
        f"reward/{r.scorer}": rewards.detach().mean(),
        "kl": ro.kl.detach(),
        "rollout/grad_start": torch.tensor(float(ro.grad_start)),
    }
    with torch.no_grad():
        for name, guard in state.guards.items():
            metrics[f"guard/{name}"] = guard(ro.images.detach(), ro.prompts).float().mean()
    return metrics


def progress(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k.split("/", 1)[1]: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("reward/", "guard/"))}
    return {"loss": f"{metrics['loss']:.5f}", **shown}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.RewardGradConfig, __doc__.splitlines()[0], example="toy/refl_world")
    acc = loop.make_accelerator(cfg)
    r = dconfig.to_dict(cfg.reward_grad)
    loop.start(cfg, acc, f"reward_grad ({cfg.reward_grad.method}) on {acc.num_processes} processes: {r}")
    state = setup(cfg, acc)
    step = partial(loop.optimizer_step, state.run, partial(micro_step, state))
    return loop.train(state.run, step, desc=cfg.reward_grad.method, postfix=progress)


if __name__ == "__main__":
    errors.script_main(main)
