"""Online step-level preference optimisation of a diffusion model as a LoRA: SPO, LPO and any step objective.

Each optimizer step needs ``optim.batch_size x processes x optim.grad_accum`` step pairs. While the pair queue holds
fewer, a mining round runs: every process samples ``stepwise.sample_batch_size`` prompts with the current policy
(DDIM eta=1 + CFG, LoRA on), branches K children per step, scores them with the step-aware scorer and keeps the
pairs whose preference gap passes the threshold (``diffalign.terms.stepwise.mine``); the kept pairs of all
processes are gathered, shuffled with a seed shared by all processes and appended to the queue (identical on every
process). The step then takes the queue's head: per micro-batch ONE guided policy forward on the parents (LoRA on)
and ONE no-grad reference forward (LoRA off) -> transition log-densities of both children
(``stepwise.step_terms``) -> ``diffalign.losses.<name>.loss`` (``spo``: beta 10, ``lpo``: beta 500) -> backward.
Pairs left over from a round are used by the next step (as SPO's code trains every pair of a round once).

Everything random is seeded: prompt order from ``(run seed, epoch)``, each prompt's sampling noise from
``(run seed, global prompt position)``, the queue shuffle from ``(run seed, round)``; so N processes with
``sample_batch_size`` b mine the same rounds as one process with N * b. Checkpoints hold the LoRA, the
optimizer, the round counter and the pair queue, so a resumed run reproduces an uninterrupted one bitwise.
The queue and the round counter are global (the same on every process), so a checkpoint resumes on another process
count when the global batch (``optim.batch_size x optim.grad_accum x processes``) and the global mining round
(``stepwise.sample_batch_size x processes``) stay the same; otherwise the resume is refused in one line naming the
values to set (``rundir.PER_PROCESS_BATCHES``). 2 processes x 2 pairs -> 1 process x 2 pairs x 2 accumulation trains
the same micro-batches (bitwise on CPU in ``tests/recipes/test_stepwise_pref.py``).

Launch:
    python recipes/stepwise_pref.py --config recipes/configs/toy/spo.yaml run.output_dir=runs/toy-spo
    diffalign run stepwise_pref --config sdxl/lpo_lora stepwise.scorer.path=/models/lrm_sdxl run.output_dir=runs/x

Outputs in ``run.output_dir``: ``config.yaml``, ``checkpoints/step-*`` (atomic; resume with
``run.resume_from=latest``), ``lora/pytorch_lora_weights.safetensors`` (diffusers format), ``metrics.jsonl``,
``pairs/round-*.safetensors`` (with ``stepwise.save_pairs``; ``MinedPairs.load``), ``validation/step-*/*.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffalign import config as dconfig
from diffalign import errors
from diffalign.sampling import seeds
from diffalign.terms import stepwise
from diffalign.terms.stepwise import MinedPairs
from diffalign.training import loop
from diffalign.training.prompts import PromptOrder, read_prompts


logger = logging.getLogger("diffalign.stepwise_pref")
QUEUE_PREFIX = "queue."


@dataclass
class PairQueue:
    """The recipe's data source (``Run.loader``): the prompts, the mining round counter and the mined pairs not
    trained on yet. Checkpoints hold the round (``state_dict``) and the pairs (``tensors``, as ``queue.*``).

    ``next_batch()`` takes the queue's next ``batch_size x world_size`` pairs (one micro-batch of every process)
    and returns this process's block: micro-batch m of process r holds the head's pairs from
    ``(m * world_size + r) * batch_size`` on, the same split for any number of processes.
    """

    prompts: list[str]
    seed: int
    pairs: MinedPairs
    batch_size: int
    rank: int = 0
    world_size: int = 1
    round: int = 0

    def __post_init__(self) -> None:
        self.order = PromptOrder(self.prompts, self.seed, seeds.PAIR_PROMPT_ORDER)

    def __len__(self) -> int:
        return len(self.pairs)

    def prompt_index(self, position: int) -> int:
        """The dataset index of global prompt ``position``: a fresh permutation of the prompts per epoch."""
        return self.order.index(position)

    def prompts_at(self, positions: torch.Tensor) -> list[str]:
        return [self.prompts[self.prompt_index(int(p))] for p in positions]

    def append(self, pairs: MinedPairs) -> None:
        self.pairs = MinedPairs.cat([self.pairs, pairs])

    def next_batch(self) -> tuple[MinedPairs]:
        """This process's pairs of the next micro-batch (the argument of ``micro_step``)."""
        n = self.batch_size * self.world_size
        head, self.pairs = self.pairs.select(slice(0, n)), self.pairs.select(slice(n, None))
        start = self.rank * self.batch_size
        return (head.select(slice(start, start + self.batch_size)),)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The queued pairs as checkpoint tensors ``queue.<field>``."""
        return {QUEUE_PREFIX + k: v for k, v in self.pairs.tensors().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        queue = {k.removeprefix(QUEUE_PREFIX): v for k, v in tensors.items()}
        if queue.keys() != self.pairs.tensors().keys():
            raise KeyError(f"{path}: no pair queue in this checkpoint (not a stepwise_pref run?)")
        self.pairs = MinedPairs(**queue, prompts=self.prompts_at(queue["prompt_ids"]))

    def state_dict(self) -> dict[str, int]:
        return {"round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "round" not in state:
            raise KeyError(
                f"the checkpoint's data state {sorted(state)} has no mining round (not a stepwise_pref run?)"
            )
        self.round = int(state["round"])

    def stats_summary(self) -> str:
        return f"{self.round} mining rounds, {len(self)} mined pairs not trained on"


@dataclass
class State:
    run: loop.Run
    queue: PairQueue  # the run's loader
    objective: Any
    loss_cfg: Any
    spec: stepwise.MiningSpec
    scorer: Any

    @property
    def cfg(self) -> Any:
        return self.run.cfg


# ---- setup --------------------------------------------------------------------------------------------
def mining_spec(cfg: Any) -> stepwise.MiningSpec:
    s = cfg.stepwise
    return stepwise.MiningSpec(
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        num_children=s.num_children,
        branch_start=s.branch_start,
        threshold=s.threshold,
        threshold_schedule=s.threshold_schedule,
        threshold_min=s.threshold_min,
        threshold_max=s.threshold_max,
        score_timestep=s.score_timestep,
        uncond=s.uncond,
        resolution=cfg.data.resolution,
    )


def build_scorer(cfg: Any, adapter: Any, spec: stepwise.MiningSpec) -> Any:
    sc = cfg.stepwise.scorer
    return stepwise.build_scorer(
        sc.name,
        adapter=adapter,
        path=sc.path,
        pixel_scorer=sc.pixel_scorer,
        guidance_scale=sc.guidance_scale if sc.guidance_scale is not None else spec.guidance_scale,
        uncond=spec.uncond,
        seed=sc.seed,
        scale=sc.scale,
    )


def setup(cfg: Any, accelerator: Any) -> State:
    objective, loss_cfg = dconfig.loss_config(cfg.loss)
    adapter = loop.build_adapter(cfg, accelerator.device, need_reference="ref" in objective.REQUIRES)
    # Eval mode, as models.load gives it: pairs are mined, and their log-densities taken, without LoRA dropout.
    adapter.denoiser.eval()
    spec = mining_spec(cfg)
    scorer = build_scorer(cfg, adapter, spec)
    queue = PairQueue(
        read_prompts(cfg.data),
        cfg.run.seed,
        MinedPairs.empty(adapter.latent_shape(cfg.data.resolution)),
        cfg.optim.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    state = State(loop.build_run(cfg, accelerator, adapter, loader=queue), queue, objective, loss_cfg, spec, scorer)
    path = loop.resume_path(cfg)
    if path is not None:
        queue.load_tensors(loop.restore(state.run, path, extra_prefix=QUEUE_PREFIX), path)
        logger.info("pair queue: round %d, %d queued pairs", queue.round, len(queue))
    return state


# ---- mining -------------------------------------------------------------------------------------------
def round_positions(state: State) -> tuple[list[int], list[int]]:
    """This process's global prompt positions in the current round and one sampling seed per position.

    Positions run over all processes (process r of W takes the r-th block of ``sample_batch_size``), and the seed
    depends on the position only, so W processes with batch b mine the same pairs as one process with W * b.
    """
    q, s = state.queue, state.cfg.stepwise.sample_batch_size
    first = (q.round * q.world_size + q.rank) * s
    positions = list(range(first, first + s))
    return positions, [seeds.mixed_seed(q.seed, pos, seeds.PAIR_NOISE) for pos in positions]


def gather_pairs(state: State, local: MinedPairs) -> MinedPairs:
    """Every process's pairs, in process order, on every process (padded all-gather of the tensors)."""
    acc = state.run.accelerator
    if acc.num_processes == 1:
        return local
    counts = acc.gather(torch.tensor([len(local)], device=acc.device)).cpu().tolist()
    width = max(counts)
    out: dict[str, torch.Tensor] = {}
    for key, value in local.tensors().items():
        padded = torch.zeros((width, *value.shape[1:]), dtype=value.dtype)
        padded[: len(local)] = value.cpu()
        stacked = acc.gather(padded.to(acc.device)).cpu().view(acc.num_processes, width, *value.shape[1:])
        out[key] = torch.cat([stacked[r, :c] for r, c in enumerate(counts)])
    return MinedPairs(**out, prompts=state.queue.prompts_at(out["prompt_ids"]))


def mine_round(state: State) -> tuple[MinedPairs, dict[str, torch.Tensor]]:
    """One round on every process -> the gathered, shuffled pairs (CPU) and this process's mining statistics.

    Pairs carry their global prompt position as ``prompt_ids``; before the shared shuffle they are put in
    (position, step) order, which does not depend on the number of processes.
    """
    run, q = state.run, state.queue
    positions, noise_seeds = round_positions(state)
    prompts = q.prompts_at(torch.tensor(positions))
    with run.accelerator.autocast():
        result = stepwise.mine(run.adapter, prompts, noise_seeds, state.spec, state.scorer, prompt_ids=positions)
    pairs = gather_pairs(state, result.pairs.to("cpu"))
    key = pairs.prompt_ids * state.spec.num_steps + pairs.step_index
    pairs = pairs.select(torch.argsort(key, stable=True))
    gen = seeds.generator(q.seed, q.round, seeds.PAIR_SHUFFLE)
    pairs = pairs.select(torch.randperm(len(pairs), generator=gen))
    if state.cfg.stepwise.save_pairs and run.accelerator.is_main_process:
        pairs.save(run.output_dir / "pairs" / f"round-{q.round:08d}.safetensors")
    q.round += 1
    return pairs, {f"mining/{k}": torch.tensor(v) for k, v in result.stats.items()}


def fill_queue(state: State, need: int) -> dict[str, torch.Tensor]:
    """Mine rounds until the queue holds ``need`` pairs; summed statistics of the rounds run."""
    stats: dict[str, torch.Tensor] = {"mining/rounds": torch.tensor(0.0)}
    empty = 0
    while len(state.queue) < need:
        pairs, round_stats = mine_round(state)
        stats["mining/rounds"] += 1
        for k, v in round_stats.items():
            stats[k] = stats.get(k, torch.tensor(0.0)) + v
        empty = empty + 1 if len(pairs) == 0 else 0
        if empty >= state.cfg.stepwise.max_empty_rounds:
            raise RuntimeError(
                f"{empty} mining rounds in a row kept no pair (last round {state.queue.round - 1}); the preference "
                f"gaps never pass the threshold: lower stepwise.threshold / threshold_min / threshold_max, raise "
                f"stepwise.num_children, or check the scorer ({state.cfg.stepwise.scorer.name})"
            )
        state.queue.append(pairs)
    rounds = float(stats["mining/rounds"])
    for key in ("mining/score_mean", "mining/gap_mean"):
        if key in stats:
            stats[key] = stats[key] / max(rounds, 1.0)
    return stats


# ---- one step -----------------------------------------------------------------------------------------
def micro_step(state: State, pairs: MinedPairs) -> dict[str, torch.Tensor]:
    """Loss and metrics of one micro-batch of pairs; backward is done by the caller."""
    s = state.cfg.stepwise
    with state.run.accelerator.autocast():
        terms = stepwise.step_terms(
            state.run.adapter,
            pairs,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            uncond=s.uncond,
            need_ref="ref" in state.objective.REQUIRES,
        )
    out = state.objective.loss(terms, state.loss_cfg)
    t = pairs.timesteps.float()
    return {"loss": out.loss, **{f"loss/{k}": v for k, v in out.metrics.items()}, "pairs/timestep": t.mean()}


def train_step(state: State) -> dict[str, float]:
    """Mine until the queue holds this step's pairs (``grad_accum`` micro-batches of every process), then one
    optimizer step on them (``loop.optimizer_step``, which stops on a non-finite loss)."""
    optim, q = state.cfg.optim, state.queue
    need = optim.batch_size * q.world_size * optim.grad_accum
    stats = fill_queue(state, need)
    stats["queue/size"] = torch.tensor(float(len(q) - need))  # the pairs this step leaves to the next
    return loop.optimizer_step(state.run, partial(micro_step, state), metrics=stats)


def progress(metrics: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics.get('loss/implicit_acc', float('nan')):.2f}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.StepwisePrefConfig, __doc__.splitlines()[0], example="toy/spo")
    acc = loop.make_accelerator(cfg)
    s = dconfig.to_dict(cfg.stepwise)
    loop.start(cfg, acc, f"stepwise_pref ({cfg.loss.name}) on {acc.num_processes} processes: {s}")
    state = setup(cfg, acc)
    result = loop.train(state.run, partial(train_step, state), save_extra=state.queue.tensors, postfix=progress)
    return {**result, "rounds": state.queue.round}


if __name__ == "__main__":
    errors.script_main(main)
