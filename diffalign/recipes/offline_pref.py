"""Offline preference optimisation of a diffusion model as a LoRA: Diffusion-DPO, MaPO and any pair/list objective.

Each step: a batch of groups (winner/loser pairs, or ranked lists) -> VAE latents -> ONE policy forward and
ONE no-grad reference forward (the LoRA switched off) with shared noise and timestep per group -> per-sample
errors -> ``diffalign.losses.<name>.loss`` -> backward. The objective is chosen by ``loss.name`` in the YAML.

Launch:
    python recipes/offline_pref.py --config recipes/configs/toy/dpo.yaml run.output_dir=runs/toy
    accelerate launch recipes/offline_pref.py --config recipes/configs/sdxl/dpo_lora.yaml run.output_dir=runs/x
    diffalign run offline_pref --config sdxl/dpo_lora run.output_dir=runs/x

Outputs in ``run.output_dir``: ``config.yaml`` (resolved), ``checkpoints/step-*`` (atomic; resume with
``run.resume_from=latest``), ``lora/pytorch_lora_weights.safetensors`` (diffusers format:
``pipe.load_lora_weights(dir)``), ``metrics.jsonl`` (step 1, every ``run.log_every`` steps and the last),
``curves.png`` (drawn from it at the end), ``validation/step-*/*.png``, and tensorboard logs. With
``train.mode: full`` the whole denoiser trains and the export is ``unet/`` (or ``transformer/``), a diffusers folder
(``from_pretrained``), plus ``lora/`` only with ``export.lora_rank`` (``models.full``). On the logged steps
the tensorboard logs also get histograms ``hist/loss/<name>`` of the objective's per-sample values
(``LossOutput.samples``: implicit reward margins, KTO's z, DSPO's c, SmPO's scale) from the main process's micro-batches;
``metrics.jsonl`` holds their means (``loss/<name>``) over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from diffalign import config as dconfig
from diffalign import errors, losses
from diffalign.data.loader import build_loader
from diffalign.terms import inversion, offline, unpaired
from diffalign.training import loop
from diffalign.types import Batch


@dataclass
class State:
    run: loop.Run
    objective: Any
    loss_cfg: Any
    noise_fn: Any = None
    samples: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # this log step's per-sample values


def setup(cfg: Any, accelerator: Any) -> State:
    objective, loss_cfg = dconfig.loss_config(cfg.loss)
    adapter = loop.build_adapter(cfg, accelerator.device, need_reference="ref" in losses.required(objective, loss_cfg))
    loader = None
    unpaired = objective.TERMS == "unpaired"  # single labelled images, each with its own noise and timestep (KTO)
    if unpaired or cfg.data.curriculum.chunks > 0:  # the curriculum's stages count optimizer steps
        loader = build_loader(
            cfg.data,
            batch_size=cfg.optim.batch_size,
            seed=cfg.run.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            unpaired=unpaired,
            grad_accum=cfg.optim.grad_accum,
        )
    run = loop.build_run(cfg, accelerator, adapter, loader)
    path = loop.resume_path(cfg)
    if path is not None:
        loop.restore(run, path)
    return State(run, objective, loss_cfg, noise_fn(cfg, adapter))


def noise_fn(cfg: Any, adapter: Any) -> Any:
    """None (random shared noise) or the policy's DDIM-inversion noise (InPO / SmPO) per ``cfg.noise``."""
    n = cfg.noise
    if n.kind == "random":
        return None
    spec = inversion.InversionSpec(num_steps=n.num_steps, eta=n.eta, renoise=n.renoise, steps_offset=n.steps_offset)
    return partial(_invert, adapter, spec)


def _invert(adapter: Any, spec: Any, x0: torch.Tensor, t: torch.Tensor, cond: Any, seeds: list[int]) -> torch.Tensor:
    return inversion.inversion_noise(adapter.predict, adapter.process, x0, t, cond, seeds, spec)


def micro_step(state: State, batch: Batch, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Loss and metrics of one micro-batch: shared-noise group errors -> the objective."""
    adapter, objective = state.run.adapter, state.objective
    latents = batch.latents
    if latents is None:
        b, k = batch.pixels.shape[:2]
        latents = adapter.encode_images(batch.pixels.flatten(0, 1))
        latents = latents.view(b, k, *latents.shape[1:])
    if objective.TERMS == "unpaired":
        return _unpaired_step(state, batch, latents, seeds)
    needs = losses.required(objective, state.loss_cfg)
    with state.run.accelerator.autocast():
        errors = offline.group_errors(
            adapter,
            latents,
            seeds,
            prompts=batch.prompts,
            info=batch.info,
            cond=batch.prompt_embeds,
            need_ref="ref" in needs,
            need_pred="pred" in needs,
            need_gap="gap" in needs,
            need_ref_pred="ref_pred" in needs,
            noise_fn=state.noise_fn,
            image_prompts=batch.image_prompts,
            sources=batch.source_pixels,
        )
    num_t = adapter.process.num_train_timesteps
    if objective.TERMS == "pair":
        terms = offline.pair_terms(errors, num_t)
    else:
        terms = offline.list_terms(errors, batch.scores, num_t)
    out = objective.loss(terms, state.loss_cfg)
    _keep_samples(state, out.samples)
    return {"loss": out.loss, **{f"loss/{k}": v for k, v in out.metrics.items()}}


def _histogram_writer(state: State) -> Any:
    """The main process's tensorboard ``SummaryWriter``, or None (another process, or no tensorboard tracker)."""
    acc = state.run.accelerator
    if not acc.is_main_process:
        return None
    return next((t.tracker for t in acc.trackers if t.name == "tensorboard"), None)


def _keep_samples(state: State, samples: dict[str, torch.Tensor]) -> None:
    """Keep the per-sample values of the step now computed when ``loop.train`` will log it (on the device)."""
    run = state.run
    step = run.step + 1
    logged = step % run.cfg.run.log_every == 0 or step in (1, run.cfg.run.max_steps)
    if samples and logged and _histogram_writer(state) is not None:
        for k, v in samples.items():
            state.samples.setdefault(k, []).append(v.detach().float().reshape(-1))


def step_with_histograms(state: State, train_step: Any) -> dict[str, Any]:
    """``train_step()``, then the kept per-sample values as tensorboard histograms at the step just taken."""
    metrics = train_step()
    writer = _histogram_writer(state)
    if state.samples and writer is not None:
        for k, parts in state.samples.items():
            values = torch.cat(parts).cpu()
            if values.numel() and torch.isfinite(values).all():
                writer.add_histogram(f"hist/loss/{k}", values, state.run.step)
    state.samples.clear()
    return metrics


def _unpaired_step(state: State, batch: Batch, latents: torch.Tensor, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Unpaired objectives: one image per row with its own noise and timestep; batch statistics are global."""
    acc, objective = state.run.accelerator, state.objective
    reduce_sum = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
    needs = losses.required(objective, state.loss_cfg)
    with acc.autocast():
        terms = unpaired.unpaired_terms(
            state.run.adapter,
            latents,
            unpaired.labels_from_scores(batch.scores),
            seeds,
            prompts=batch.prompts,
            info=batch.info,
            cond=batch.prompt_embeds,
            need_ref="ref" in needs,
            reduce_sum=reduce_sum,
            need_mismatched="mismatched" in needs,
        )
    out = objective.loss(terms, state.loss_cfg)
    _keep_samples(state, out.samples)
    return {"loss": out.loss, **{f"loss/{k}": v for k, v in out.metrics.items()}}


def progress(metrics: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics.get('loss/implicit_acc', float('nan')):.2f}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = loop.parse_config(argv, dconfig.OfflinePrefConfig, __doc__.splitlines()[0], example="toy/dpo")
    acc = loop.make_accelerator(cfg)
    loop.start(cfg, acc, dconfig.summary(cfg, num_processes=acc.num_processes))
    state = setup(cfg, acc)
    step = partial(loop.optimizer_step, state.run, partial(micro_step, state))
    return loop.train(state.run, partial(step_with_histograms, state, step), postfix=progress)


if __name__ == "__main__":
    errors.script_main(main)
