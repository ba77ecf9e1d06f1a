"""Diffusion-DRO: rank expert images above the model's own samples, with online negatives from a replay buffer.

Diffusion-DRO (Denoising Ranking Optimization; Wu, Ruan, Tseng, Shuai, NeurIPS 2025, arXiv 2510.18353), as
basiclab/DiffusionDRO@b0693ec ``train.py`` trains it. Data: expert images with captions only, no pairs (each
group's FIRST image: a Pick-a-Pic winner, a ranked list's best). Each micro-step, per group (L654-714, L730-768):

1. the **policy snapshot** (the trained tensors as of the last refresh, swapped into the one denoiser: no second
   UNet) samples a trajectory for the group's prompt: ``dro.num_steps`` deterministic steps of the shared
   sampler (``diffalign.sampling.sde.rollout`` at noise level 0: DDIM on sd15/sdxl, the Euler ODE step on the flow
   grid of sd3/sd35/flux/qwenimage/zimage/flux2) at CFG ``dro.guidance_scale``, on a grid shifted by a random
   offset per trajectory (``dro.perturb_timesteps``, VP families only: ``sampling.grids.perturbed_timesteps``),
   keeping each step's input latent and the snapshot's prediction (noise, v or velocity) there;
2. the trajectory and the group's expert latent and prompt embedding go into the **replay buffer**
   (``diffalign.terms.dro.ReplayBuffer``, the newest ``dro.buffer_size`` trajectories);
3. a micro-batch of pairs is drawn from the buffer (a slot and a step each): expert latent + fresh noise at the
   step's timestep vs the buffered latent whose target is the snapshot's prediction (``terms.dro.dro_terms``);
4. ``loss.name: dro`` (``diffalign.losses.dro``): ``mean(relu(delta + margin))``, backward;

after each optimizer step the shared **EMA** of the trained weights is updated (the ``ema:`` section,
``diffalign.training.ema``: the authors' ``--use_ema``, diffusers ``EMAModel`` with its default decay 0.9999, i.e.
``min(0.9999, k / (9 + k))`` after update k, L391-393 + L797-803; the DRO configs enable it); the snapshot is
refreshed from the trained weights (never the EMA) every ``dro.snapshot_every`` micro-steps (L805-807). The
prompt dropout ``data.proportion_empty_prompts`` (authors 0.2) empties a prompt for both its sample and its pair,
as theirs does (L666, one embedding for both).

Deviations (the authors' options in brackets): a LoRA instead of the full UNet by default, the EMA then over the
LoRA factors (``train.mode: full`` trains the full UNet as theirs; the snapshot is then a full copy of it); the
buffer sampler is deterministic DDIM [DPMSolver++ 20 steps, default; DDIM is one of their ``--buffer_scheduler``
choices]; the flow families (not in the paper, which trains SD1.5 / SDXL) sample on the adapter's shifted flow
grid, the same for every trajectory (``dro.perturb_timesteps: false``: no per-trajectory grid is defined there); one trajectory per group and micro-step [``--buffer_batch_size`` / ``--buffer_batch_accumulation``
decouple them]. Each process keeps its own buffer (their ``--buffer_sync`` off).

Checkpoints hold EVERY process's buffer: each process writes its own to ``extra-rank<R>.safetensors`` in the
checkpoint (``checkpoint.save``'s ``per_rank``, written atomically with the rest, under DDP and FSDP alike), and
each process resumes its own, so a resumed multi-process run is bitwise the uninterrupted one. A resume on MORE
processes than the checkpoint has buffers is refused in one line naming the missing ``extra-rank<R>.safetensors``:
that process has no buffer of its own, and giving it an empty one or a copy of another process's would change
which pairs it trains on without the user asking (the run would no longer be the one checkpointed); resume on the
saved process count, or start a fresh run. A resume on FEWER processes keeps each remaining process's own buffer
and drops the others' with a logged warning (every process still trains on trajectories it sampled itself). A
checkpoint from before the per-process buffers holds the main process's buffer only: every process resumes it,
with a warning.

Launch:
    python recipes/dro.py --config recipes/configs/duo/dro.yaml data.path=runs/quickstart/labels/pairs
    diffalign run dro --config sd15/dro data.path=/data/pickapic_v2_top500 run.output_dir=runs/x

Outputs in ``run.output_dir``: ``config.yaml``, ``checkpoints/step-*`` (the trained weights and, with
``ema.enabled``, their EMA; the snapshot under ``dro.*``, each process's replay buffer in its
``extra-rank<R>.safetensors``; optimizer, schedule, data position;
resume with ``run.resume_from=latest``), ``lora/pytorch_lora_weights.safetensors`` (``train.mode: full``: ``unet/``;
the EMA weights when ``ema.enabled``, the authors' released weights; the trained weights themselves stay in the
last checkpoint), ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from diffalign import config as dconfig
from diffalign import errors
from diffalign.models import lora
from diffalign.sampling import seeds as seedlib
from diffalign.sampling.guidance import encode_condition
from diffalign.sampling.sde import SDESpec, make_grid, rollout
from diffalign.terms import dro as dro_terms
from diffalign.training import checkpoint, loop, zero
from diffalign.types import Batch


logger = logging.getLogger("diffalign.dro")
EXTRA = "dro."  # checkpoint prefix of everything besides the trained LoRA
SNAPSHOT, BUFFER = "snapshot.", "buffer."


@dataclass
class State:
    run: loop.Run
    params: dict[str, torch.nn.Parameter]
    snapshot: dict[str, torch.Tensor]
    buffer: dro_terms.ReplayBuffer
    objective: Any
    loss_cfg: Any
    micro: int = 0  # micro-steps done (the authors' ``step``), recomputed at each optimizer step

    @property
    def cfg(self) -> Any:
        return self.run.cfg


# ---- setup and checkpoints ----------------------------------------------------------------------------
def setup(cfg: Any, accelerator: Any) -> State:
    adapter = loop.build_adapter(cfg, accelerator.device)
    objective, loss_cfg = dconfig.loss_config(cfg.loss)
    run = loop.build_run(cfg, accelerator, adapter)
    params = lora.trainable_parameters(adapter)  # the LoRA tensors, or every denoiser weight (train.mode: full)
    state = State(
        run,
        params,
        {k: v.clone() for k, v in zero.trained_values(params, run.zero).items()},  # ZeRO-3: gathered whole
        dro_terms.ReplayBuffer(cfg.dro.buffer_size),
        objective,
        loss_cfg,
    )
    path = loop.resume_path(cfg)
    if path is not None:
        restore_extra(state, loop.restore(run, path, extra_prefix=EXTRA, extra_like=extra_tensors(state)), path)
        buffers_resumed(path, accelerator.num_processes)
    return state


def buffers_resumed(path: Any, num_processes: int) -> None:
    """Warn when the processes do not each resume their own buffer (module docstring; a resume on more processes
    than saved buffers was refused by ``checkpoint.load_per_rank``)."""
    saved = checkpoint.per_rank_ranks(path)
    if not saved and num_processes > 1:
        logger.warning(
            "%s holds the main process's replay buffer only (a checkpoint from before per-process buffers): "
            "every process resumes it, so the resume is not exact",
            path,
        )
    elif len(saved) > num_processes:
        logger.warning(
            "%s holds the replay buffers of %d processes; this run has %d: the buffers of processes %s are dropped",
            path, len(saved), num_processes, saved[num_processes:],
        )  # fmt: skip


def extra_tensors(state: State) -> dict[str, torch.Tensor]:
    """The policy snapshot, stored in checkpoints under ``dro.`` once (the same on every process; the EMA is
    ``loop.save``'s)."""
    return {EXTRA + SNAPSHOT + k: v for k, v in state.snapshot.items()}


def buffer_tensors(state: State) -> dict[str, torch.Tensor]:
    """This process's replay buffer under ``dro.buffer.``: each process saves its own (``per_rank``)."""
    return state.buffer.state_dict(EXTRA + BUFFER)


def restore_extra(state: State, extra: dict[str, torch.Tensor], path: Any) -> None:
    saved = {k.removeprefix(EXTRA + SNAPSHOT): v for k, v in extra.items() if k.startswith(EXTRA + SNAPSHOT)}
    if saved.keys() != state.snapshot.keys():
        raise KeyError(f"{path}: the checkpoint's snapshot tensors do not match the trained weights (not a dro run?)")
    with torch.no_grad():
        for key, value in saved.items():
            state.snapshot[key].copy_(value)
    state.buffer.load_state_dict(extra, EXTRA + BUFFER)


# ---- one step -----------------------------------------------------------------------------------------
def expert_latents(adapter: Any, batch: Batch) -> torch.Tensor:
    """Clean latents (B, C, h, w) of each group's first image (the winner / the best of a ranked list)."""
    if batch.latents is not None:
        return batch.latents[:, 0].to(adapter.device, torch.float32)
    return adapter.encode_images(batch.pixels[:, 0])


@torch.no_grad()
def fill_buffer(state: State, batch: Batch, seeds: list[int]) -> None:
    """Steps 1-2 of the module docstring: one snapshot trajectory per group, committed to the buffer."""
    adapter, d = state.run.adapter, state.cfg.dro
    x0 = expert_latents(adapter, batch)
    if batch.prompt_embeds is None:
        cond, uncond = encode_condition(adapter, batch.prompts, batch.info, "empty_prompt")
    elif d.guidance_scale == 1.0:  # a latent cache's prompt embeddings: no text encoder for an empty prompt
        cond, uncond = {k: v.to(adapter.device) for k, v in batch.prompt_embeds.items()}, None
    else:
        raise ValueError(
            "dro.guidance_scale != 1 needs the text encoders for the empty prompt: unset data.latent_cache"
        )
    gens = [seedlib.generator(s, seedlib.DRO_SAMPLE) for s in seeds]
    offsets = None
    if d.perturb_timesteps:
        ratio = adapter.process.num_train_timesteps // d.num_steps
        offsets = torch.stack([torch.randint(0, ratio, (), generator=g) for g in gens])
    grid = make_grid(adapter, d.num_steps, offsets=offsets)
    with zero.swapped_in(state.params, state.snapshot, state.run.zero):
        traj = rollout(
            adapter, grid, SDESpec(noise_level=0.0), cond, None if d.guidance_scale == 1.0 else uncond,
            generators=gens, latent_shape=x0.shape[1:], guidance_scale=d.guidance_scale,
            sde_steps=torch.zeros(d.num_steps, dtype=torch.bool), keep_outputs=True,
        )  # fmt: skip
    t = grid.timesteps.T if grid.timesteps.ndim == 2 else grid.timesteps.expand(len(seeds), -1)
    state.buffer.commit(x0, cond, traj.latents[:, : d.num_steps], traj.outputs, t)


def micro_step(state: State, batch: Batch, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Loss and metrics of one micro-batch; backward is done by the caller."""
    adapter, d = state.run.adapter, state.cfg.dro
    if state.micro > 0 and state.micro % d.snapshot_every == 0:  # the authors refresh after micro-step `micro`
        # from the trained weights: the shared EMA is only swapped in for validation and the export, never here
        with torch.no_grad():
            for key, value in zero.trained_values(state.params, state.run.zero).items():
                state.snapshot[key].copy_(value)
    state.micro += 1
    fill_buffer(state, batch, seeds)
    sample = state.buffer.sample(len(seeds), seedlib.generator(*seeds, seedlib.DRO_BUFFER_DRAW), adapter.device)
    eps_w = seedlib.draw_noise(
        [seedlib.generator(s, seedlib.DRO_EXPERT_NOISE) for s in seeds], sample.x0.shape[1:], adapter.device
    )
    with state.run.accelerator.autocast():
        terms = dro_terms.dro_terms(adapter, sample, eps_w)
    out = state.objective.loss(terms, state.loss_cfg)
    metrics = {f"loss/{k}": v for k, v in out.metrics.items()}
    return {
        "loss": out.loss,
        **metrics,
        "buffer/t": sample.t.float().mean(),
        "buffer/size": torch.tensor(float(len(state.buffer))),
    }


def train_step(state: State) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches (``loop.optimizer_step`` updates the EMA)."""
    state.micro = state.run.step * state.cfg.optim.grad_accum
    return loop.optimizer_step(state.run, partial(micro_step, state))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.DROConfig, __doc__.splitlines()[0], example="duo/dro")
    acc = loop.make_accelerator(cfg)
    loop.start(cfg, acc, f"dro on {acc.num_processes} processes: {dconfig.to_dict(cfg.dro)}")
    state = setup(cfg, acc)
    # loop.train exports the EMA weights when ema.enabled (the trained ones stay in the last checkpoint)
    return loop.train(
        state.run,
        partial(train_step, state),
        save_extra=partial(extra_tensors, state),
        save_per_rank=partial(buffer_tensors, state),
        desc="dro",
    )


if __name__ == "__main__":
    errors.script_main(main)
