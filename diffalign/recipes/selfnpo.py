"""Self-NPO: train a negative LoRA from images + captions alone (no preference labels), for NPO guidance.

Self-NPO ("truncated diffusion fine-tuning", Wang et al., arXiv 2505.11777). Each step: the first image of every
group (the Pick-a-Pic winner, or a ranked list's best; the other images are ignored) -> VAE latent -> noised at
a random DDIM grid timestep -> the EMA teacher (the base + an EMA copy of the LoRA tensors, swapped into the one
denoiser; no second UNet) runs up to ``selfnpo.max_teacher_steps`` DDIM steps with the negatively guided output
``cond + w (cond - uncond)`` -> the truncated state is re-noised to a later timestep -> the student (LoRA on,
real prompt) predicts x0 there -> pseudo-Huber (or L2) to the teacher's x0 -> backward -> optimizer step ->
EMA update of the teacher's LoRA tensors. The math is in ``diffalign.terms.selfnpo``.

SD1.5 (w = -1, i.e. the unconditional prediction, with the empty prompt) and SDXL (w = -5 with zero
unconditional embeddings) are supported, epsilon- or v-prediction; SD3 is not (the rollout is DDIM on a VP
process). The LoRA written to ``lora/`` is the student: a NEGATIVE LoRA, meant for the unconditional branch of
classifier-free guidance (``diffalign.sampling.npo.npo_guidance(pipe, negative=<output_dir>/lora)``), not for
sampling on its own. Validation images (if enabled) show the negative model alone, as the authors' script does.

Launch:
    python recipes/selfnpo.py --config recipes/configs/toy/selfnpo.yaml run.output_dir=runs/toy-selfnpo
    diffalign run selfnpo --config sdxl/selfnpo_lora data.path=/data/pickapic_v2 run.output_dir=runs/x

Outputs in ``run.output_dir``: ``config.yaml``, ``checkpoints/step-*`` (atomic; LoRA, its EMA under ``ema.<name>``,
optimizer, scheduler, data position and RNG; resume with ``run.resume_from=latest``),
``lora/pytorch_lora_weights.safetensors`` (diffusers format), ``metrics.jsonl``, ``validation/step-*/*.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from diffalign import config as dconfig
from diffalign import errors
from diffalign.diffusion import VPProcess
from diffalign.models import lora
from diffalign.terms import selfnpo
from diffalign.training import loop, sharding, zero
from diffalign.types import Batch, SampleInfo


logger = logging.getLogger("diffalign.selfnpo")
EMA_PREFIX = "ema."


@dataclass
class State:
    run: loop.Run
    params: dict[str, torch.nn.Parameter]
    ema: dict[str, torch.Tensor]
    empty: dict[str, torch.Tensor] | None
    grid: torch.Tensor

    @property
    def cfg(self) -> Any:
        return self.run.cfg


# ---- setup --------------------------------------------------------------------------------------------
@torch.no_grad()
def empty_prompt(cfg: Any, adapter: Any) -> dict[str, torch.Tensor] | None:
    """The encoded empty prompt (batch 1) for ``uncond: empty_prompt``; None for ``zeros``."""
    if cfg.selfnpo.uncond == "zeros":
        return None
    res = (cfg.data.resolution, cfg.data.resolution)
    return adapter.encode_prompts([""], [SampleInfo(res, (0, 0), res)])


def setup(cfg: Any, accelerator: Any) -> State:
    adapter = loop.build_adapter(cfg, accelerator.device, need_reference=False)  # the teacher is an EMA, not the base
    process = adapter.process
    if not isinstance(process, VPProcess):
        raise dconfig.ConfigError(f"selfnpo needs a DDPM-family (VP) scheduler; {cfg.model.path} has a flow one")
    grid = selfnpo.ddim_grid(process.num_train_timesteps, cfg.selfnpo.num_ddim_steps).to(accelerator.device)
    run = loop.build_run(cfg, accelerator, adapter)
    params = lora.trainable_parameters(adapter)
    # the teacher starts at the LoRA init (= the base); ZeRO-3: gathered whole from the partitions
    ema = {k: v.clone() for k, v in zero.trained_values(params, run.zero).items()}
    state = State(run, params, ema, empty_prompt(cfg, adapter), grid)
    path = loop.resume_path(cfg)
    if path is not None:
        restore_ema(state, loop.restore(run, path, extra_prefix=EMA_PREFIX, extra_like=ema_tensors(state)), path)
    return state


def ema_tensors(state: State) -> dict[str, torch.Tensor]:
    """The teacher's EMA LoRA tensors, stored in checkpoints under ``ema.<name>``."""
    return {EMA_PREFIX + k: v for k, v in state.ema.items()}


def restore_ema(state: State, extra: dict[str, torch.Tensor], path: Any) -> None:
    ema = {k.removeprefix(EMA_PREFIX): v for k, v in extra.items()}
    if ema.keys() != state.ema.keys():
        raise KeyError(f"{path}: the checkpoint's EMA tensors do not match the LoRA layout (not a selfnpo run?)")
    with torch.no_grad():
        for key, value in ema.items():
            state.ema[key].copy_(value)


# ---- one step -----------------------------------------------------------------------------------------
def first_latents(adapter: Any, batch: Batch) -> torch.Tensor:
    """Clean latents (B, C, h, w) of each group's first image (the winner / the best of a ranked list)."""
    if batch.latents is not None:
        return batch.latents[:, 0].to(adapter.device, torch.float32)
    return adapter.encode_images(batch.pixels[:, 0])


def micro_step(state: State, batch: Batch, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Loss and metrics of one micro-batch; backward is done by the caller."""
    adapter, s = state.run.adapter, state.cfg.selfnpo
    x0 = first_latents(adapter, batch)
    with torch.no_grad():
        cond = batch.prompt_embeds or adapter.encode_prompts(batch.prompts, batch.info)
    cond = {k: v.to(adapter.device) for k, v in cond.items()}
    uncond = None if s.guidance_scale == 0 else selfnpo.uncond_like(cond, state.empty)
    draws = selfnpo.draw(seeds, x0.shape[1:], s.num_ddim_steps)
    with state.run.accelerator.autocast():
        terms = selfnpo.selfnpo_terms(
            adapter.predict,
            adapter.process,
            x0,
            draws,
            cond,
            uncond,
            guidance_scale=s.guidance_scale,
            max_teacher_steps=s.max_teacher_steps,
            grid=state.grid,
            teacher=lambda: zero.swapped_in(state.params, state.ema, state.run.zero),
            teacher_calls=partial(sharding.max_over_processes, accelerator=state.run.accelerator)
            if state.run.lockstep
            else None,
        )
    per_sample = selfnpo.x0_loss(terms.student_x0, terms.target_x0, s.loss_type, s.huber_c)
    mse = (terms.student_x0.detach() - terms.target_x0).pow(2).mean()
    return {
        "loss": per_sample.mean(),
        "loss/x0_mse": mse,
        "teacher/t_start": terms.t_start.float().mean(),
        "teacher/t_end": terms.t_end.float().mean(),
        "teacher/steps": terms.steps.float().mean(),
        "student/u": terms.u.float().mean(),
    }


def train_step(state: State) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches, then the EMA update of the teacher."""
    metrics = loop.optimizer_step(state.run, partial(micro_step, state))
    selfnpo.ema_update(state.ema, zero.trained_values(state.params, state.run.zero), state.cfg.selfnpo.ema_decay)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.SelfNPOConfig, __doc__.splitlines()[0], example="toy/selfnpo")
    acc = loop.make_accelerator(cfg)
    loop.start(cfg, acc, f"selfnpo on {acc.num_processes} processes: {dconfig.to_dict(cfg.selfnpo)}")
    state = setup(cfg, acc)
    result = loop.train(state.run, partial(train_step, state), save_extra=partial(ema_tensors, state), desc="selfnpo")
    logger.info("the LoRA is a NEGATIVE model: use it with diffalign.sampling.npo.npo_guidance")
    return result


if __name__ == "__main__":
    errors.script_main(main)
