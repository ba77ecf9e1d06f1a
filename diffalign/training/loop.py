"""The pieces every training recipe shares, as plain functions over a small ``Run`` record.

A recipe keeps what makes it different (its forward pass and loss, extra state such as an EMA teacher) and
calls these for the rest: accelerator set-up, model + LoRA loading, optimizer and schedule, the resumable data
source (the offline ``PlannedLoader``, or a recipe's own ``Source``, e.g. stepwise_pref's queue of mined pairs),
one optimizer step over gradient accumulation with the non-finite-loss stop, logging, validation images, atomic
checkpoints with exact resume, and the export. No Trainer class: the loop in ``train`` is twenty lines a recipe can
copy and change.

What trains is ``cfg.train.mode``: a LoRA (``lora``), or every denoiser weight (``full``, ``models.full``); either
way the trained parameters are ``lora.trainable_parameters(adapter)`` (the parameters with ``requires_grad``, by
``<component>.<name>``), which the optimizer, the gradient all-reduce, the checkpoints and the EMA
(``cfg.ema``, ``training.ema``) all use, and the reference pass is ``adapter.reference()`` in both modes.

Launched with an FSDP accelerate config (``diffalign run --distributed fsdp``), ``build_adapter`` shards the denoiser
(and full mode's reference copy) with FSDP2 (``training.sharding``): the trained parameters are then ``DTensor``
shards, their gradients are reduced by FSDP's reduce-scatter (``distributed.reduce_gradients`` only rescales them),
clipping and the non-finite checks use collectives over the shards, checkpoints are sharded
(``checkpoint.save_sharded``) and the export is gathered whole. Every micro-step reduce-scatters (gradients stay
sharded between micro-steps, the memory-lean choice), and a micro-batch that is empty on any process is skipped on
all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from tqdm.auto import tqdm

from diffalign import config as dconfig
from diffalign import models
from diffalign.data.latent_cache import LatentCache
from diffalign.data.loader import build_loader
from diffalign.data.records import too_many_bad
from diffalign.errors import InterruptedRun, UserError
from diffalign.fileio import FolderLock, append_jsonl, keep_jsonl, replace_dir
from diffalign.models import full, lora
from diffalign.models.base import compile_denoiser
from diffalign.training import checkpoint, curves, distributed, ema, optim, preflight, rundir, sharding, zero


logger = logging.getLogger("diffalign.train")
MicroStep = Callable[..., dict[str, torch.Tensor]]


class Source(Protocol):
    """A run's data source, as the shared steps use it (``PlannedLoader`` is one).

    ``next_batch()`` returns the arguments of one ``micro_step`` call (``PlannedLoader``: a batch and its seeds);
    a call whose first argument has no rows is skipped. ``state_dict`` goes into every checkpoint and
    ``load_state_dict`` gets it back on resume; ``stats_summary`` is logged at the end of the run.
    """

    def next_batch(self) -> tuple[Any, ...]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def stats_summary(self) -> str: ...


@dataclass
class Run:
    """What the shared steps need; recipes keep their own extra state next to it."""

    cfg: Any
    accelerator: Accelerator
    adapter: Any
    optimizer: Any
    scheduler: Any
    loader: Source
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)  # steps whose figures are still on the device
    ema: ema.EMA | None = None  # EMA of the trained weights (``cfg.ema.enabled``), updated after each step

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(lora.trainable_parameters(self.adapter).values())

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def sharded(self) -> bool:
        """Whether the trained parameters are FSDP2 shards (``sharding``)."""
        return sharding.is_sharded(self.params)

    @property
    def zero(self) -> zero.Engine | None:
        """The DeepSpeed engine of a ZeRO run (``training.zero``), else None."""
        return self.optimizer if isinstance(self.optimizer, zero.Engine) else None

    @property
    def lockstep(self) -> bool:
        """Whether every process must run the same forwards (FSDP2, ZeRO-3: the weights are gathered in them)."""
        return self.sharded or (self.zero is not None and self.zero.stage == 3)

    @property
    def trained_modules(self) -> torch.nn.ModuleDict:
        """The adapter's components that carry trained parameters, by component name (the checkpoint's names)."""
        modules = self.adapter.named_modules()
        return torch.nn.ModuleDict({k: m for k, m in modules.items() if any(p.requires_grad for p in m.parameters())})


# ---- set-up -------------------------------------------------------------------------------------------
def parse_config(argv: list[str] | None, schema: type, description: str, example: str) -> Any:
    """A recipe's command line (``--config NAME_OR_YAML`` + dotted overrides) -> its validated config.

    Also sets up INFO logging to stderr. ``example``: a shipped config name for the help text (e.g. ``toy/dpo``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML path or shipped config name (e.g. {example})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 run.max_steps=10")
    args = parser.parse_args(argv)
    cfg = dconfig.load(args.config, args.overrides, schema=schema)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return cfg


def make_accelerator(cfg: Any) -> Accelerator:
    """Accelerator for ``cfg.run`` (mixed precision, trackers, logging dir); CPU when there is no CUDA.

    An FSDP launch (``--distributed fsdp``, an accelerate config with ``distributed_type: FSDP``) is taken over by
    ``sharding``: the denoiser is sharded in ``build_adapter``, accelerate wraps nothing."""
    run = cfg.run
    sharding.take_over()
    torch.backends.cuda.matmul.allow_tf32 = run.allow_tf32
    torch.backends.cudnn.allow_tf32 = run.allow_tf32
    return Accelerator(
        mixed_precision=run.mixed_precision,
        log_with=list(run.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs")
        ),
        cpu=not torch.cuda.is_available(),
    )


def start(cfg: Any, accelerator: Accelerator, description: str) -> None:
    """Check the run (``preflight``), lock the output folder, save the resolved config, log, start the trackers.

    Every process runs the cheap checks of ``preflight`` first (paths, data columns, batch arithmetic, trackers,
    another run in the output folder, a resume that changes the training config), so a mistake stops the run in
    one line before any model loads, and before anything is written. The main process then holds
    ``output_dir/.lock`` (``fileio.FolderLock``) until ``train`` returns: a second trainer on the same folder is
    refused, naming the holder. ``run.overwrite=true`` moves an earlier run aside (``rundir``), what killed runs left
    in ``checkpoints/`` is removed (``checkpoint.clean_incomplete``), then the resolved config is written.
    """
    out = Path(cfg.run.output_dir)
    preflight.check(cfg, accelerator.num_processes)
    if sharding.plan() is not None and (problem := sharding.config_problem(cfg)):
        raise dconfig.ConfigError(problem)
    if (spec := zero.plan()) is not None and (problem := zero.config_problem(cfg, spec.stage)):
        raise dconfig.ConfigError(problem)
    if accelerator.is_main_process:
        _lock_output(out)
        rundir.clear_for_fresh_run(cfg)
        for leftover in checkpoint.clean_incomplete(out / "checkpoints"):
            logger.info("removed %s: an unfinished checkpoint deletion or write of a killed run", leftover)
        dconfig.dump(cfg, out / "config.yaml")
        logger.info("%s", description)
    accelerator.init_trackers("diffalign", config=rundir.flat(dconfig.to_dict(cfg)))
    set_seed(cfg.run.seed)  # same LoRA init on every process and in every (resumed) run


_LOCKS: dict[Path, FolderLock] = {}  # output folders this process trains into


def _lock_output(out: Path) -> None:
    key = out.resolve()
    if key not in _LOCKS:  # a second in-process run on the same folder (tests, notebooks) keeps the lock it has
        _LOCKS[key] = FolderLock(out, f"training ({Path(sys.argv[0]).name})")


def _unlock_output(out: Path) -> None:
    lock = _LOCKS.pop(out.resolve(), None)
    if lock is not None:
        lock.release()


def build_adapter(cfg: Any, device: torch.device, *, need_reference: bool = True) -> Any:
    """Load the base model and set up what trains (``cfg.train.mode``).

    ``lora``: add the LoRA; the reference is the same model with the LoRA off. ``full``: every denoiser weight
    trains (``models.full.make_full``); with ``need_reference`` (the objective compares with the reference model) a
    frozen copy of the base is kept for ``adapter.reference()``, else none.
    """
    m = cfg.model
    kwargs: dict[str, Any] = {}
    if m.family in dconfig.FLOW_FAMILIES:
        kwargs = {"weighting": m.timestep_sampling, "logit_mean": m.logit_mean, "logit_std": m.logit_std}
        kwargs["mode_scale"] = m.mode_scale
        if isinstance(m.flow_shift, float):
            kwargs["shift"] = m.flow_shift
    if m.family in dconfig.GUIDANCE_EMBEDDED:
        kwargs["adapter_kwargs"] = {"guidance": m.guidance}
    if m.family in dconfig.VIDEO_FAMILIES:  # frames per video: the data's (None: the pipeline's default)
        kwargs["adapter_kwargs"] = {"num_frames": cfg.data.num_frames}
    if m.family == "qwenimageedit":  # the side of the area the source is conditioned at (None: the pipeline's)
        kwargs["adapter_kwargs"] = {"source_resolution": m.source_resolution}
    adapter = models.load(
        m.family,
        m.path,
        dtype=m.dtype,
        variant=m.variant,
        revision=m.revision,
        vae_path=m.vae_path,
        quantize=m.quantize,
        load_text_encoders=m.load_text_encoders,
        **kwargs,
    )
    if m.flow_shift == "resolution":
        adapter.process = dataclasses.replace(adapter.process, shift=adapter.resolution_shift(cfg.data.resolution))
    if m.family in dconfig.FLOW_FAMILIES:
        logger.info(
            "flow process: shift %.4f (model.flow_shift=%s), %s timesteps%s",
            adapter.process.shift,
            m.flow_shift,
            adapter.process.weighting,
            f", guidance {adapter.guidance}" if getattr(adapter, "guidance", None) is not None else "",
        )
    if cfg.train.mode == "full":
        ref_dtype = (cfg.train.reference_dtype or m.dtype) if need_reference else None
        handle = full.make_full(
            adapter, dtype=cfg.train.dtype, reference_dtype=ref_dtype, text_encoders=cfg.train.text_encoders
        )
        n = sum(p.numel() for p in adapter.denoiser.parameters())
        logger.info(
            "full fine-tuning: %d denoiser parameters in %s; reference %s",
            n,
            handle.dtype,
            f"a frozen copy in {ref_dtype}" if ref_dtype else "none (the objective needs none)",
        )
    else:
        handle = lora.add_lora(adapter, lora.LoraSpec(**dconfig.to_dict(cfg.lora)))
        logger.info("LoRA on %s, denoiser targets %s", handle.modules, list(handle.targets))
    if m.gradient_checkpointing:
        adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()  # LoRA dropout; the SD denoisers have no other dropout by default
    adapter = adapter.to(device)
    spec = sharding.plan()
    if spec is not None:
        sharding.shard(adapter.denoiser, adapter.shard_blocks, spec)
        if adapter.reference_denoiser is not None:  # full mode's frozen copy: sharded the same way
            sharding.shard(adapter.reference_denoiser, adapter.shard_blocks, spec)
        ref = " and its frozen reference copy" if adapter.reference_denoiser is not None else ""
        logger.info("FSDP2: %s%s sharded over the processes (%s)", adapter.denoiser_name, ref, spec)
    zspec = zero.plan()
    if zspec is not None and adapter.reference_denoiser is not None:  # full mode's frozen copy: ZeRO-3 partitions it
        adapter.reference_denoiser = zero.partition_frozen(adapter.reference_denoiser, zspec, cfg)
        if zspec.stage == 3:
            logger.info("ZeRO-3: the frozen reference copy is partitioned over the processes")
    if m.compile:
        compile_denoiser(adapter.denoiser)
        if adapter.reference_denoiser is not None:  # full mode's frozen copy: its own (no-grad) graphs
            compile_denoiser(adapter.reference_denoiser)
    return adapter


def build_run(cfg: Any, accelerator: Accelerator, adapter: Any, loader: Source | None = None) -> Run:
    """Optimizer (prepared for fp16 loss scaling only), LR schedule and the data source of this process.

    ``loader``: a recipe's own data source; without one, the offline ``PlannedLoader`` over ``cfg.data``.
    """
    named = lora.trainable_parameters(adapter)
    lr = dconfig.effective_lr(cfg.optim, accelerator.num_processes)
    spec = zero.plan()
    if spec is not None:  # DeepSpeed: the engine owns the optimizer (``training.zero``)
        optimizer = zero.Engine(adapter.denoiser, optim.build_optimizer(named.values(), cfg.optim, lr=lr), spec, cfg)
        logger.info("DeepSpeed ZeRO-%d over the %s (%s)", spec.stage, adapter.denoiser_name, spec.zero_section())
    else:
        optimizer = accelerator.prepare(optim.build_optimizer(named.values(), cfg.optim, lr=lr))
    scheduler = optim.build_scheduler(optimizer.optimizer, cfg.optim, cfg.run.max_steps)
    if loader is None:
        if cfg.data.latent_cache:
            LatentCache(cfg.data.latent_cache).check(cfg)
        loader = build_loader(
            cfg.data,
            batch_size=cfg.optim.batch_size,
            seed=cfg.run.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
    run = Run(cfg, accelerator, adapter, optimizer, scheduler, loader)
    if cfg.ema.enabled:
        spec = ema.EmaSpec(**{k: v for k, v in dconfig.to_dict(cfg.ema).items() if k not in ("enabled", "offload")})
        run.ema = ema.EMA(named, spec, offload=cfg.ema.offload)
    return run


# ---- checkpoints --------------------------------------------------------------------------------------
def save(
    run: Run, extra: dict[str, torch.Tensor] | None = None, per_rank: dict[str, torch.Tensor] | None = None
) -> Path:
    """Atomic checkpoint of LoRA (+ ``extra`` tensors, e.g. an EMA), optimizer, schedule, data position, RNG.

    ``extra``: the same on every process (the main process's are written); ``per_rank``: this process's own tensors
    (e.g. a replay buffer), written by every process to its ``extra-rank<R>.safetensors`` (``checkpoint.save``)."""
    acc = run.accelerator
    state = {
        "step": run.step,
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "config": dconfig.to_dict(run.cfg),
        "num_processes": acc.num_processes,
    }
    if run.sharded:
        return checkpoint.save_sharded(
            run.output_dir / "checkpoints",
            run.step,
            model=run.trained_modules,
            optimizer=run.optimizer.optimizer,
            state=state,
            extra={**(extra or {}), **(_ema_tensors(run) if run.ema is not None else {})},
            per_rank=per_rank,
            rank=acc.process_index,
            barrier=acc.wait_for_everyone,
            keep_last=run.cfg.run.keep_last,
        )
    if run.zero is not None:  # consolidated in the unsharded layout (collectives), see ``training.zero``
        params = lora.trainable_parameters(run.adapter)
        main = acc.is_main_process  # the others take part in the gathers only
        tensors, optimizer = run.zero.whole_params(params, main), run.zero.optimizer_state(params, main)
    else:
        tensors, optimizer = lora.trainable_state(run.adapter), run.optimizer.optimizer.state_dict()
    tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    if run.ema is not None:
        tensors.update(run.ema.state_tensors(EMA_PREFIX))
    return checkpoint.save(
        run.output_dir / "checkpoints",
        run.step,
        trainable=tensors,
        optimizer=optimizer,
        state=state,
        per_rank=per_rank,
        rank=acc.process_index,
        barrier=acc.wait_for_everyone,
        keep_last=run.cfg.run.keep_last,
    )


def _ema_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The EMA's own shadow tensors (``DTensor`` shards in a sharded run) and step, under ``EMA_PREFIX``: what a
    sharded checkpoint writes, and the templates it loads into in place."""
    out = {EMA_PREFIX + k: v for k, v in run.ema.shadow.items()}
    out[EMA_PREFIX + "#step"] = torch.tensor(run.ema.step, dtype=torch.int64)
    return out


def restore(
    run: Run, path: Path, extra_prefix: str | None = None, extra_like: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Load checkpoint ``path`` into ``run``; returns the ``extra`` tensors (keys starting ``extra_prefix``), this
    process's own ``per_rank`` tensors among them (``checkpoint.load_per_rank``: they win over an ``extra`` tensor of
    the same key; a process with no file of its own in a checkpoint that has them is refused in one line).

    A sharded run's checkpoint (``checkpoint.save_sharded``) loads into this run whatever its process count, sharded
    or not; a checkpoint of an unsharded run does not load into a sharded one (one line saying so). ``extra_like``:
    the recipe's extra tensors by checkpoint key (e.g. ``DTensor`` shards of its own EMA), which a sharded checkpoint
    loads in place (the others come back whole)."""
    if checkpoint.is_sharded(path) and run.zero is not None:
        raise UserError(f"run.resume_from: {path} was written by an FSDP2 run; resume it with --distributed fsdp")
    if checkpoint.is_sharded(path):
        templates = {**(extra_like or {}), **(_ema_tensors(run) if run.ema is not None else {})}
        ckpt = checkpoint.load_sharded(
            path,
            model=run.trained_modules,
            optimizer=run.optimizer.optimizer,
            rank=run.accelerator.process_index,
            extra_like=templates,
        )
        tensors = dict(ckpt["extra"])
        own = ckpt["per_rank"] or {}
    else:
        if run.sharded:
            raise UserError(
                f"run.resume_from: {path} was written by an unsharded run; resume it without --distributed fsdp"
            )
        ckpt = checkpoint.load(path, rank=run.accelerator.process_index)
        tensors = dict(ckpt["trainable"])
        own = ckpt["per_rank"] or {}
    saved_ema = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(EMA_PREFIX)]}
    if (run.ema is not None) != bool(saved_ema):
        raise UserError(
            f"{path}: ema.enabled={run.ema is not None} but the checkpoint {'has no' if not saved_ema else 'has an'} EMA"
        )
    if run.ema is not None:
        run.ema.load_state_tensors(saved_ema, EMA_PREFIX)
    extra = {k: v for k, v in tensors.items() if extra_prefix and k.startswith(extra_prefix)}
    extra.update({k: v for k, v in own.items() if extra_prefix and k.startswith(extra_prefix)})
    if run.zero is not None:
        run.zero.load(lora.trainable_parameters(run.adapter), tensors, ckpt["optimizer"])
    elif not checkpoint.is_sharded(path):
        lora.load_trainable_state(run.adapter, {k: v for k, v in tensors.items() if k not in extra})
        run.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["state"]["scheduler"])
    run.loader.load_state_dict(ckpt["state"]["loader"])
    if ckpt["state"]["scaler"] is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(ckpt["state"]["scaler"])
    run.step = ckpt["state"]["step"]
    logger.info("resumed from %s at step %d", path, run.step)
    return extra


EMA_PREFIX = "train_ema."  # the EMA shadows' keys in a checkpoint's trainable tensors


def resume_path(cfg: Any) -> Path | None:
    """The checkpoint ``run.resume_from`` points at (``latest`` with no checkpoint yet gives None)."""
    path = checkpoint.resolve(cfg.run.resume_from, Path(cfg.run.output_dir) / "checkpoints")
    if path is None and cfg.run.resume_from == "latest":
        logger.info("run.resume_from=latest: no checkpoint yet, starting from step 0")
    return path


def export_lora(run: Run) -> Path:
    """Write the diffusers-format LoRA to ``output_dir/lora`` atomically (temp folder, then rename)."""
    out = run.output_dir / "lora"
    params = lora.trainable_parameters(run.adapter)
    whole = {k: sharding.full(p.detach()) for k, p in params.items()} if run.sharded else None  # collectives
    if run.zero is not None and run.zero.stage == 3:  # the weights are partitions: gathered (collectives)
        whole = run.zero.whole_params(params, run.accelerator.is_main_process)
    if run.accelerator.is_main_process:
        replace_dir(out, lambda tmp: lora.save_lora(run.adapter, tmp, whole))
    run.accelerator.wait_for_everyone()
    return out


def export(run: Run) -> dict[str, Path]:
    """The trained weights (the EMA weights when ``ema.enabled``), atomically, by ``train.mode``.

    ``lora``: ``{"lora": output_dir/lora}``. ``full``: ``{"model": output_dir/<unet|transformer>}`` (the denoiser's
    ``save_pretrained`` folder) and, with ``export.lora_rank``, ``"lora"``: the SVD LoRA of trained - base.
    """
    with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
        if run.cfg.train.mode != "full":
            return {"lora": export_lora(run)}
        return export_full(run)


def export_full(run: Run) -> dict[str, Path]:
    """Full mode's export (see ``export``): a diffusers folder of the denoiser (and of each trained text encoder,
    ``output_dir/text_encoder*``), and the optional SVD LoRA of the denoiser."""
    cfg, adapter, acc = run.cfg, run.adapter, run.accelerator
    out = {"model": run.output_dir / adapter.denoiser_name}
    trained = {n: m for n, m in adapter.named_modules().items() if any(p.requires_grad for p in m.parameters())}
    if cfg.export.lora_rank:
        out["lora"] = run.output_dir / "lora"
    # a sharded denoiser is gathered whole on the main process (collectives) and written as one safetensors file
    whole = sharding.full_state_dict(adapter.denoiser, acc.is_main_process) if run.sharded else None
    if run.zero is not None and run.zero.stage == 3:
        whole = zero.full_state_dict(adapter.denoiser, acc.is_main_process)
    if acc.is_main_process:
        for name, module in trained.items():  # the denoiser, and the text encoders under train.text_encoders
            if whole is not None and module is adapter.denoiser:
                replace_dir(run.output_dir / name, partial(sharding.save_pretrained, module, whole))
            else:
                replace_dir(run.output_dir / name, partial(_save_pretrained, module))
        if "lora" in out:
            m = cfg.model
            base = full.base_state_dict(adapter, m.path, revision=m.revision, variant=m.variant)
            layers, ranks, kept = full.extract_lora(adapter.denoiser, base, cfg.export.lora_rank, cfg.export.lora_conv)
            config = full.lora_config(ranks, cfg.export.lora_rank)
            replace_dir(
                out["lora"], lambda tmp: lora.save_lora_layers(adapter, tmp, {adapter.denoiser_name: (layers, config)})
            )
            logger.info(
                "SVD LoRA (rank %d, %d layers) keeps %.4f of the squared norm of trained - base",
                cfg.export.lora_rank,
                len(ranks),
                kept,
            )
    acc.wait_for_everyone()
    return out


def _save_pretrained(module: torch.nn.Module, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


# ---- one optimizer step -------------------------------------------------------------------------------
def sync_step(cfg: Any, step: int) -> bool:
    """Whether ``train`` logs, validates or saves after optimizer step ``step`` (1-based).

    Only these steps read values back from the device: the NaN stop and the metrics of the steps in between wait
    for the next one, so a steady-state step never blocks the host on the accelerator.
    """
    run, every = cfg.run, cfg.validation.every
    return (
        step == 1
        or step >= run.max_steps
        or step % run.log_every == 0
        or step % run.save_every == 0
        or bool(every and step % every == 0)
    )


@dataclass
class _Pending:
    """A step whose figures are still on the device: ``shown`` (the dict the step returned) is filled in place.

    ``local``: this process's sums, summed over processes when resolved; ``same``: values already equal on every
    process (gradient norm, non-finite flags of the loss, gradient norm and updated weights).
    """

    step: int
    shown: dict[str, Any]
    local: dict[str, torch.Tensor | float]
    same: dict[str, torch.Tensor]


_BAD = {
    "bad/loss": "non-finite loss at step {step}",
    "bad/norm": "non-finite gradient norm at step {step}",
    "bad/weights": "non-finite weights after the update of step {step}",
}


def optimizer_step(
    run: Run, micro_step: MicroStep, *, metrics: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """``grad_accum`` micro-batches -> gradients averaged over the step's groups -> clip -> step, with the NaN stop.

    ``micro_step(*run.loader.next_batch())`` (offline: ``micro_step(batch, seeds)``) returns
    ``{"loss": scalar, **metrics}``, the loss and metrics being means over the micro-batch's groups; the backward is
    done here. The gradient and the reported metrics are means over the GLOBAL count of usable groups of the step
    (bad rows skipped on any process change no weighting), so N processes with batch b equal one with batch N*b.
    ``metrics``: more of this process's scalars (any device) to average over processes, e.g. data statistics.

    Every process makes the same collectives in the same order whatever its data (``distributed``). The run stops
    (``FloatingPointError``) before anything is saved when the loss, the gradient norm (without fp16 loss
    scaling, which skips such steps itself) or the updated weights are not finite.

    No host-device synchronisation on a step that is not a ``sync_step``: its checks are kept on the device and
    its returned dict holds only ``lr`` until the next sync step resolves them (in place). A sync step first
    stops on the earliest non-finite step since the last one (naming it; its update never reaches a checkpoint,
    a validation or the LoRA export), then checks itself before its update as each step used to.
    """
    cfg, acc = run.cfg, run.accelerator
    step, sync = run.step + 1, sync_step(cfg, run.step + 1)
    local: dict[str, torch.Tensor | float] = {f"mean/{k}": v.detach().float() for k, v in (metrics or {}).items()}
    sharded, engine = run.sharded, run.zero
    groups, count, bad_loss = (_zero_backward if engine is not None else _accumulate)(run, micro_step, local, step)
    local["groups"] = float(groups)
    row_counts = getattr(run.loader, "row_counts", None)  # PlannedLoader: rows drawn and unusable, see _check_rows
    if row_counts is not None:
        local.update({f"rows/{k}": float(v) for k, v in row_counts().items()})
    params = run.params
    shown: dict[str, Any] = {}
    pending = _Pending(step, shown, local, {"bad/loss": bad_loss > 0})
    run.pending.append(pending)
    if sync:
        _resolve(run)
    # the global count is 0 only if this process's is: only such a process asks the device
    if groups == 0 and float(count) == 0:
        logger.warning("step %d: every row of the global batch was a skipped bad row; no update", step)
        run.optimizer.zero_grad(set_to_none=True)
        shown["loss"] = float("nan")
    else:
        if engine is not None:  # the update happened in the last backward; clipped by DeepSpeed (``zero``)
            norm = engine.grad_norm()
        elif sharded:  # DTensor shards: the norm is summed over processes
            acc.unscale_gradients()
            if cfg.optim.max_grad_norm is not None:
                norm = sharding.clip_grad_norm_(params, cfg.optim.max_grad_norm, acc)
            else:
                norm = sharding.grad_norm(params, acc)
        elif cfg.optim.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        else:
            acc.unscale_gradients()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = torch.as_tensor(norm)
        if acc.scaler is None:
            pending.same["bad/norm"] = ~torch.isfinite(norm)
        if sync:
            shown["grad_norm"] = float(norm)
            if "bad/norm" in pending.same and bool(pending.same["bad/norm"]):
                raise non_finite(run, step, f"{_BAD['bad/norm'].format(step=step)} (metrics {shown})")
        else:
            pending.same["grad_norm"] = norm.detach()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update()
        # replicated weights are updated identically on every process: the same answer everywhere; shards are not
        if engine is not None:
            weights_bad = engine.any_nonfinite(params, acc)
        elif sharded:
            weights_bad = sharding.any_nonfinite(params, acc)
        else:
            weights_bad = ~torch.stack([p.detach().isfinite().all() for p in params]).all()
        if sync and bool(weights_bad):
            raise non_finite(run, step, f"{_BAD['bad/weights'].format(step=step)} (metrics {shown})")
        pending.same["bad/weights"] = weights_bad
    if sync:
        run.pending.clear()
    run.scheduler.step()
    run.step = step
    shown["lr"] = run.scheduler.get_last_lr()[0]
    return shown


def _accumulate(
    run: Run, micro_step: MicroStep, local: dict[str, torch.Tensor | float], step: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A step's micro-batches, drawn one at a time: each backward is of the sum over its groups, then
    ``distributed.reduce_gradients`` averages over the global count. Adds the metric sums to ``local``; returns this
    process's group count, the global count and the summed non-finite-loss flag (0-d tensors)."""
    cfg, acc, sharded = run.cfg, run.accelerator, run.sharded
    groups, nonfinite = 0, torch.zeros((), device=acc.device)
    for _ in range(cfg.optim.grad_accum):
        args = run.loader.next_batch()
        n = len(args[0])
        if sharded and _empty_anywhere(acc, n, step):  # FSDP: every process runs the same forwards and backwards
            continue
        if n == 0:  # every row of this micro-batch was a skipped bad row
            continue
        out = micro_step(*args)
        loss = out["loss"]
        nonfinite = nonfinite + (~torch.isfinite(loss.detach())).to(nonfinite.device, nonfinite.dtype)
        acc.backward(loss * n)  # the sum over its groups; reduce_gradients divides by the global count
        groups += n
        for k, v in out.items():
            local[f"sum/{k}"] = local.get(f"sum/{k}", 0.0) + v.detach().float() * n
    count, bad_loss = distributed.reduce_gradients(run.params, acc, groups, nonfinite)
    return groups, count, bad_loss


def _zero_backward(
    run: Run, micro_step: MicroStep, local: dict[str, torch.Tensor | float], step: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A DeepSpeed step's micro-batches (``training.zero``): all drawn first, one all-reduce gives the global group
    count and which micro-batches are empty on some process (skipped on all), then each backward is of
    ``loss * n * W / count`` and the last one updates the weights. Adds the metric sums to ``local``; returns this
    process's group count, the global count and the summed non-finite-loss flag (0-d tensors)."""
    cfg, acc, engine = run.cfg, run.accelerator, run.zero
    batches = [run.loader.next_batch() for _ in range(cfg.optim.grad_accum)]
    sizes = [len(args[0]) for args in batches]
    table = torch.tensor([float(n == 0) for n in sizes] + [float(n) for n in sizes], device=acc.device)
    if acc.num_processes > 1:
        table = acc.reduce(table, reduction="sum")
    empty, totals = table[: len(sizes)].tolist(), table[len(sizes) :].tolist()
    keep = [i for i, e in enumerate(empty) if e == 0]
    if any(e > 0 and totals[i] > 0 for i, e in enumerate(empty)):
        logger.warning("step %d: a process's micro-batch had only skipped bad rows; every process skips it", step)
    count = sum(totals[i] for i in keep)
    groups, nonfinite = 0, torch.zeros((), device=acc.device)
    for j, i in enumerate(keep):
        n = sizes[i]
        engine.before_forward()
        out = micro_step(*batches[i])
        loss = out["loss"]
        nonfinite = nonfinite + (~torch.isfinite(loss.detach())).to(nonfinite.device, nonfinite.dtype)
        engine.backward(loss * (n * acc.num_processes / count), boundary=j == len(keep) - 1)
        groups += n
        for k, v in out.items():
            local[f"sum/{k}"] = local.get(f"sum/{k}", 0.0) + v.detach().float() * n
    if acc.num_processes > 1:
        nonfinite = acc.reduce(nonfinite, reduction="sum")
    return groups, torch.tensor(float(count), device=acc.device), nonfinite


def _empty_anywhere(acc: Accelerator, n: int, step: int) -> bool:
    """Sharded runs: whether some process's micro-batch has no usable row (one all-reduce). Then every process skips
    it (its other processes' rows too, warned): FSDP's collectives need the same forwards on every process."""
    empty = acc.reduce(torch.tensor(float(n == 0), device=acc.device), reduction="sum")
    if float(empty) == 0:
        return False
    logger.warning("step %d: a process's micro-batch had only skipped bad rows; every process skips it (FSDP)", step)
    return True


def _resolve(run: Run) -> None:
    """Bring the pending steps' figures to the host (one all-reduce, two transfers), fill their ``shown`` dicts,
    and stop on the earliest non-finite one. The current step (last pending) is checked for its loss only."""
    acc, pending = run.accelerator, run.pending
    keys = sorted({k for p in pending for k in p.local})
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(keys)))
    table = _stack([p.local for p in pending], keys, acc.device)
    if acc.num_processes > 1:
        table = acc.reduce(table, reduction="sum")
    same_keys = sorted({k for p in pending for k in p.same})
    same = _stack([p.same for p in pending], same_keys, acc.device)
    totals, flags = table.tolist(), same.tolist()
    nproc = acc.num_processes
    _check_rows(run, dict(zip(keys, totals[-1], strict=True)))
    for p, row, srow in zip(pending, totals, flags, strict=True):
        total = dict(zip(keys, row, strict=True))
        extra = dict(zip(same_keys, srow, strict=True))
        count = total.pop("groups")
        p.shown.update({k[4:]: v / max(count, 1.0) for k, v in total.items() if k.startswith("sum/")})
        p.shown.update({k[5:]: v / nproc for k, v in total.items() if k.startswith("mean/")})
        p.shown["groups"] = count
        if count == 0:
            p.shown["loss"] = float("nan")
        elif "grad_norm" in extra:
            p.shown["grad_norm"] = extra["grad_norm"]
        for key, what in _BAD.items():
            if extra.get(key):
                shown = {k: v for k, v in p.shown.items() if k != "lr"}
                raise non_finite(
                    run, p.step, f"{what.format(step=p.step)} (metrics {shown})", weights_bad=key == "bad/loss"
                )


def _check_rows(run: Run, total: dict[str, float]) -> None:
    """Stop on a source whose unusable rows exceed ``data.max_bad_fraction`` (``PlannedLoader.check_bad_rows``),
    from the counts summed over processes in ``_resolve``'s all-reduce: every process decides alike, and only
    then gathers the reasons (a collective all of them make)."""
    if "rows/seen" not in total:
        return
    seen, bad = int(total["rows/seen"]), int(total["rows/bad"])
    if not too_many_bad(bad, seen, run.cfg.data.max_bad_fraction):
        return
    tallies = [run.loader.bad_row_tally()]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        tallies = gather_object(tallies)
    run.pending.clear()
    run.loader.check_bad_rows(seen, bad, tallies)


def _stack(rows: list[dict[str, Any]], keys: list[str], device: torch.device) -> torch.Tensor:
    """(len(rows), len(keys)) fp32 on ``device``, a key missing from a row counting as 0."""
    zero = torch.zeros((), device=device)
    return torch.stack(
        [torch.stack([torch.as_tensor(r.get(k, zero), device=device).float().reshape(()) for k in keys]) for r in rows]
    )


class NonFiniteError(UserError, FloatingPointError):
    """The NaN stop: a non-finite loss, gradient norm or update; the message names the step and the last good
    checkpoint."""


def interrupted(run: Run) -> InterruptedRun:
    """The error of a run stopped by Ctrl-C / SIGTERM at ``run.step`` (the lock is released: the run is over)."""
    last = checkpoint.latest(run.output_dir / "checkpoints")
    _unlock_output(run.output_dir)
    where = f"last checkpoint {last.name}; resume with run.resume_from=latest" if last else "no checkpoint was saved"
    return InterruptedRun(f"interrupted at step {run.step}; {where}")


def non_finite(run: Run, step: int, what: str, weights_bad: bool = False) -> NonFiniteError:
    """The NaN stop's error for a problem found at optimizer step ``step``. ``weights_bad``: the weights before
    that step gave it, so a checkpoint of them (step ``step - 1``, if saved) is set aside as ``step-N.nonfinite``,
    and ``latest`` no longer resumes into it."""
    run.pending.clear()  # reported here; a caller that goes on (a test, a notebook) starts afresh
    root = run.output_dir / "checkpoints"
    note = ""
    current = checkpoint.step_dir(root, step - 1)
    if weights_bad and run.accelerator.is_main_process and checkpoint.is_complete(current):
        note = (
            f" {current.name} holds the weights that gave it: moved to {checkpoint.set_aside(current, 'nonfinite')}."
        )
    good = checkpoint.latest(root)
    return NonFiniteError(
        f"{what}; nothing was saved for this step.{note} Last good checkpoint: {good or 'none'}. "
        "Lower optim.lr or loss.beta, or use mixed_precision=no."
    )


# ---- logging and validation ---------------------------------------------------------------------------
def log(run: Run, metrics: dict[str, float]) -> None:
    """To the trackers and to ``output_dir/metrics.jsonl`` (main process)."""
    run.accelerator.log(metrics, step=run.step)
    if run.accelerator.is_main_process:
        append_jsonl(run.output_dir / "metrics.jsonl", {"step": run.step, **metrics})


def validation_prompts(cfg: Any) -> list[str]:
    prompts = list(cfg.validation.prompts)
    if cfg.validation.prompts_file:
        lines = Path(cfg.validation.prompts_file).read_text(encoding="utf-8-sig").splitlines()  # no BOM in prompt 1
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


@torch.no_grad()
def validate(run: Run) -> None:
    """Sample the validation prompts with the trained weights (the EMA weights when ``ema.enabled``); PNGs to
    ``validation/step-N`` and the trackers.

    The denoiser samples in eval mode (no LoRA dropout) and is put back in the mode it was in. A sharded run samples
    on every process (the denoiser's forward gathers shards from all of them); the main process saves.
    """
    cfg, acc = run.cfg, run.accelerator
    prompts = validation_prompts(cfg)
    if prompts and (acc.is_main_process or run.lockstep):
        with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
            _validate(run, prompts)
    acc.wait_for_everyone()


def _validate(run: Run, prompts: list[str]) -> None:
    """Sample ``prompts`` with the weights in the model now (main process; every process of a sharded run, the main
    one saving)."""
    cfg, acc = run.cfg, run.accelerator
    res = cfg.validation.resolution or cfg.data.resolution
    pipe = run.adapter.pipeline()
    training = run.adapter.denoiser.training
    run.adapter.denoiser.eval()
    out_dir = run.output_dir / "validation" / f"step-{run.step:08d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    extra = {"skip_guidance_layers": list(skip)} if (skip := cfg.validation.skip_guidance_layers) else {}
    if run.adapter.is_video:
        extra["num_frames"] = run.adapter.num_frames
    # full mode trains fp32 weights beside text encoders loaded in model.dtype: the pipeline runs in that dtype
    low = next((e.dtype for e in run.adapter.text_encoders if e.dtype != run.adapter.dtype), None)
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(cfg.validation.seed + i)
        with torch.autocast(acc.device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            out = _eager(pipe)(
                prompt=prompt,  # by keyword: Flux2Pipeline's first parameter is the reference image
                num_inference_steps=cfg.validation.num_inference_steps,
                **run.adapter.pipeline_guidance(cfg.validation.guidance_scale, None, 1),
                height=res,
                width=res,
                generator=gen,
                **extra,
            )
        if not acc.is_main_process:  # a sharded run's other processes took part in the forwards only
            continue
        image = _save_video(out.frames[0], out_dir / f"{i:03d}.gif") if run.adapter.is_video else out.images[0]
        if not run.adapter.is_video:
            image.save(out_dir / f"{i:03d}.png")
        images.append(np.asarray(image))
    run.adapter.denoiser.train(training)
    for tracker in acc.trackers if acc.is_main_process else []:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.stack(images)}, step=run.step, dataformats="NHWC")


def _save_video(frames: np.ndarray, path: Path, fps: int = 16) -> Image.Image:
    """A pipeline's video (F, H, W, 3) floats in [0, 1] as an animated GIF at ``fps`` (WanPipeline's example exports
    16 fps); returns the first frame (what the trackers show)."""
    pil = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=round(1000 / fps), loop=0)
    return pil[0]


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with a compiled denoiser's eager forward: sampling shapes would compile graphs of their own."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return call


# ---- the loop -----------------------------------------------------------------------------------------
def log_step(cfg: Any, step: int) -> bool:
    """Whether ``train`` writes the ``metrics.jsonl`` row of optimizer step ``step``: step 1, every
    ``run.log_every`` steps and the last."""
    return step % cfg.run.log_every == 0 or step in (1, cfg.run.max_steps)


def train(
    run: Run,
    train_step: Callable[[], dict[str, float]],
    *,
    save_extra: Callable[[], dict[str, torch.Tensor]] | None = None,
    save_per_rank: Callable[[], dict[str, torch.Tensor]] | None = None,
    desc: str = "train",
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Steps until ``run.max_steps`` with logging, validation and checkpoints; then the LoRA export, ``curves.png``
    and the end-of-run summary (``finish``).

    ``metrics.jsonl`` gets a row for step 1, every ``run.log_every`` steps and the last step (once). Each
    checkpoint gets ``save_extra()`` (one set, the main process's) and every process's ``save_per_rank()``.
    """
    cfg, acc = run.cfg, run.accelerator
    started, first_step = time.monotonic(), run.step
    if acc.is_main_process:  # rows past the resume point were logged by the interrupted run: logged again below
        keep_jsonl(run.output_dir / "metrics.jsonl", lambda row: row.get("step", 0) <= run.step)
    bar = tqdm(total=cfg.run.max_steps, initial=run.step, disable=not acc.is_main_process, desc=desc)
    try:
        while run.step < cfg.run.max_steps:
            metrics = train_step()
            run.history.append(metrics)
            bar.update(1)
            if "loss" in metrics:  # resolved (a sync step): steady-state steps never wait for the device
                bar.set_postfix(**(postfix(metrics) if postfix else {"loss": f"{metrics['loss']:.4f}"}))
            if log_step(cfg, run.step):
                log(run, metrics)
            if cfg.validation.every and run.step % cfg.validation.every == 0:
                validate(run)
            if run.step % cfg.run.save_every == 0 or run.step == cfg.run.max_steps:
                save(run, save_extra() if save_extra else None, save_per_rank() if save_per_rank else None)
    except KeyboardInterrupt:
        raise interrupted(run) from None
    finally:
        bar.close()  # before any error line: a bar redrawn at exit would follow it
    exported = export(run)
    if acc.is_main_process:
        logger.info("data: %s", run.loader.stats_summary())
        finish(run, exported, first_step, time.monotonic() - started)
    acc.end_training()
    _unlock_output(run.output_dir)
    result = {"step": run.step, "history": run.history, "lora_dir": exported.get("lora")}
    if "model" in exported:
        result["model_dir"] = exported["model"]
    return result


# what the end-of-run summary shows of the metrics rows: these keys, and every key of these ``/`` families (the
# rewards, reward_grad's held-out guard scores, validation scores)
SUMMARY_KEYS = ("loss", "loss/implicit_acc", "kl")
SUMMARY_FAMILIES = ("reward", "guard", "val", "validation")


def finish(run: Run, exported: dict[str, Path], first_step: int, seconds: float) -> str:
    """Draw ``curves.png`` from ``metrics.jsonl`` and log the end-of-run summary block (main process); returns it.

    The block gives the wall time of the training loop, the steps this invocation ran, the last value of the
    loss, rewards and guard / validation scores (``SUMMARY_KEYS``, ``SUMMARY_FAMILIES``), and where the LoRA, the
    metrics, the tensorboard logs and the curves are. A failure to draw the curves is a warning: the trained LoRA
    is saved either way.
    """
    out = run.output_dir
    metrics_file = out / curves.METRICS_FILE
    rows = curves.read_metrics(out) if metrics_file.is_file() else []
    try:
        curves_line = str(curves.write_run_curves(out))
    except Exception as e:  # a plotting problem must not fail a finished run
        logger.warning("could not draw %s: %s: %s", out / curves.CURVES_FILE, type(e).__name__, e)
        curves_line = f"not drawn ({type(e).__name__}; `diffalign plot {out}` retries)"
    ran = run.step - first_step
    lines = [
        f"run summary: {out}",
        f"  wall time    {_duration(seconds)} for {ran} step{'s' * (ran != 1)} ({first_step} -> {run.step}"
        f"{f', {seconds / ran:.3g} s/step' if ran else ''})",
    ]
    final = final_values(rows)
    if final:
        lines.append(f"  final        {final}")
    ema_note = " (EMA weights)" if run.ema is not None else ""
    if "model" in exported:
        lines.append(f"  model        {exported['model']} (from_pretrained; the full denoiser){ema_note}")
    if "lora" in exported:
        lines.append(f"  LoRA         {exported['lora']} (pipe.load_lora_weights){ema_note}")
    lines.append(f"  metrics      {metrics_file}")
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            lines.append(f"  tensorboard  tensorboard --logdir {out / 'logs'}")
        else:
            lines.append(f"  tracker      {tracker.name}")
    lines.append(f"  curves       {curves_line}")
    text = "\n".join(lines)
    logger.info("%s", text)
    return text


def final_values(rows: list[dict]) -> str:
    """``loss 0.6931, reward/x/mean 0.52 (step 18)``: each summary key's last logged value (its step if earlier)."""
    last: dict[str, tuple[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            shown = k in SUMMARY_KEYS or k.split("/", 1)[0] in SUMMARY_FAMILIES
            if shown and isinstance(v, int | float) and not isinstance(v, bool):
                last[k] = (row.get("step", 0), v)
    if not last:
        return ""

    def order(key: str) -> tuple[int, int, str]:
        if key in SUMMARY_KEYS:
            return 0, SUMMARY_KEYS.index(key), key
        return 1, SUMMARY_FAMILIES.index(key.split("/", 1)[0]), key

    end = rows[-1].get("step", 0)
    parts = [
        f"{k} {v:.4g}" + (f" (step {s})" if s != end else "")
        for k, (s, v) in sorted(last.items(), key=lambda kv: order(kv[0]))
    ]
    return f"at step {end}: " + ", ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"
