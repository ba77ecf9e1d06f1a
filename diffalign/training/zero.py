"""DeepSpeed ZeRO-2 / ZeRO-3, driven by the accelerate config a run was launched with.

``accelerate launch --config_file diffalign/recipes/accelerate/zero2.yaml`` (what ``diffalign run --distributed
zero2`` does; ``zero3`` alike) exports ``ACCELERATE_USE_DEEPSPEED=true`` and the config's ``deepspeed_config`` as
``ACCELERATE_DEEPSPEED_*`` variables. accelerate's own DeepSpeed path needs CUDA (without it every process is process
0 of 1) and would run the backward, clipping and step inside its wrappers. So, as with FSDP2 (``sharding``), diffalign
takes the launch over: ``sharding.take_over`` moves the flag to ``DIFFALIGN_DEEPSPEED`` before the ``Accelerator`` is
built (accelerate then sets up plain data parallelism: ranks, device, collectives), and ``loop.build_run`` hands the
denoiser and the optimizer to ``deepspeed.initialize`` (``Engine``). The same code runs on CPU/gloo (DeepSpeed's cpu
accelerator) and GPU/nccl. Stage 2 partitions the gradients and the optimizer state; stage 3 the weights too (full
mode's frozen reference copy as well: ``partition_frozen``).

One optimizer step (``loop.optimizer_step``):

- every micro-batch of the step is drawn first, so the global count of usable groups is known before the first
  backward. Each backward is of ``loss * n * W / count`` (n groups here, W processes) with DeepSpeed's own division
  by the accumulation steps off (``scale_wrt_gas=False``); DeepSpeed's reduction averages over the W processes, so the
  applied gradient is the mean over the global batch's groups: N processes with batch b equal one with batch N*b,
  as without DeepSpeed.
- the engine's ``gradient_accumulation_steps`` is 1 and the boundary is set by hand on the last micro-batch
  (``set_gradient_accumulation_boundary``): a micro-batch with no usable row on some process is skipped on all of them
  (stage 3 gathers the weights in every forward, so every process must run the same forwards).
- the adapters call the denoiser itself, not ``engine.forward``; ``Engine.backward`` first calls
  ``clear_backward_seen_flag()``, what ``engine.forward`` does for ZeRO's gradient hooks at each forward (without it a
  second micro-batch's gradient is wrong under stage 3: checked on 2 processes against one).
- clipping is DeepSpeed's (``gradient_clipping`` = ``optim.max_grad_norm``), the norm ``get_global_grad_norm()``
  (before clipping).

Checkpoints are consolidated in the unsharded layout (the trained tensors whole, the optimizer state in torch's
``state_dict`` layout by parameter order) through DeepSpeed's public ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` (collectives; the main process writes). So a ZeRO checkpoint resumes on any
process count, under ZeRO, DDP or on one process, and an unsharded checkpoint resumes under ZeRO. The main process
holds the trained weights and AdamW's two moments in fp32 while it writes (12 bytes per trained parameter): for full
fine-tunes of the largest models, FSDP2 (``--distributed fsdp``) writes sharded checkpoints.

Recipes (``cli.run.ZERO_RECIPES``): offline_pref, online_rl, reward_grad, selfnpo, dro and stepwise_pref, under both
stages. Under stage 3 every process runs the same forwards (``Run.lockstep``, as FSDP2). A recipe's own copy of the
trained weights (Self-NPO's EMA teacher, DRO's policy snapshot) is read with ``trained_values`` (stage 3: gathered
whole from the fp32 partitions) and put in the module for its no-grad rollouts with ``swapped_in`` (stage 3: written
into the module's partitions through ``GatheredParameters`` and the trained weights written back after; stage 2 and
DDP point the parameters' storage at it). Under stage 3 those copies are whole on every process (a LoRA's size; DRO's
snapshot in ``train.mode: full`` is the whole denoiser: FSDP2 shards it instead).

Refused before anything loads (``config_problem``, one line each): fp16 mixed precision (DeepSpeed's fp16 needs its
own loss scaler), optimizers other than AdamW (ZeRO flattens the parameters, which breaks Adafactor's factored
moments; 8-bit AdamW's quantized state has no whole-tensor form for the checkpoint), ``train.text_encoders`` (the
engine wraps the denoiser; ``lora.text_encoder`` alike), and under stage 3 ``ema.enabled`` (the shared
``training.ema``, e.g. DRO's: its swap and update use the parameters' storage) and ``export.lora_rank`` (both need
whole weights).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.errors import UserError


FLAG = "DIFFALIGN_DEEPSPEED"  # set by ``sharding.take_over`` from accelerate's ACCELERATE_USE_DEEPSPEED
STATES = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state, whole in a checkpoint


@dataclass(frozen=True)
class Spec:
    """The ZeRO settings of a launch, from the ``ACCELERATE_DEEPSPEED_*`` variables (or the user's DeepSpeed JSON)."""

    stage: int = 2
    offload_optimizer: str = "none"  # none | cpu: optimizer state (and its step) in CPU RAM
    offload_param: str = "none"  # none | cpu (stage 3): the weights' partitions in CPU RAM
    zero_optimization: tuple[tuple[str, Any], ...] = ()  # a user JSON's whole ``zero_optimization`` section

    def zero_section(self) -> dict[str, Any]:
        if self.zero_optimization:
            return dict(self.zero_optimization)
        section: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer != "none":
            section["offload_optimizer"] = {"device": self.offload_optimizer}
        if self.offload_param != "none" and self.stage == 3:
            section["offload_param"] = {"device": self.offload_param}
        return section


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def take_over(environ: MutableMapping[str, str]) -> None:
    """A DeepSpeed launch becomes diffalign's (``DIFFALIGN_DEEPSPEED=1``); accelerate's flag is cleared."""
    if _true(environ.get("ACCELERATE_USE_DEEPSPEED")):
        environ[FLAG] = "1"
        environ["ACCELERATE_USE_DEEPSPEED"] = "false"


def plan(environ: Mapping[str, str] = os.environ) -> Spec | None:
    """The ZeRO settings of this process, or None when the run is not a DeepSpeed launch."""
    if not _true(environ.get(FLAG)):
        return None
    file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if file and file.lower() != "none":
        try:
            raw = json.loads(Path(file).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"deepspeed_config_file {file}: cannot read it as JSON ({e})") from e
        section = raw.get("zero_optimization")
        if not isinstance(section, dict) or section.get("stage") not in (2, 3):
            raise UserError(
                f"deepspeed_config_file {file}: zero_optimization.stage must be 2 or 3 (diffalign runs ZeRO-2/3)"
            )
        return Spec(stage=int(section["stage"]), zero_optimization=tuple(sorted(section.items())))
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("2", "3"):
        raise UserError(f"deepspeed_config.zero_stage={stage}: diffalign runs ZeRO stage 2 or 3")
    return Spec(
        stage=int(stage),
        offload_optimizer=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
        offload_param=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
    )


def config_problem(cfg: Any, stage: int) -> str | None:
    """What a ZeRO-``stage`` run of ``cfg`` cannot do, as one line (checked before any model loads), or None."""
    run, optim = cfg.run, getattr(cfg, "optim", None)
    if run.mixed_precision == "fp16":
        return "run.mixed_precision=fp16 under DeepSpeed: use bf16 or no (DeepSpeed's fp16 needs its own loss scaler)"
    if optim is not None and optim.name != "adamw":
        return (
            f"optim.name={optim.name} under DeepSpeed: use adamw (ZeRO flattens the weights, which breaks Adafactor's "
            "factored moments, and 8-bit AdamW's state has no whole form for checkpoints), or --distributed fsdp"
        )
    train, lora_cfg = getattr(cfg, "train", None), getattr(cfg, "lora", None)
    for key, on in (
        ("train.text_encoders", getattr(train, "text_encoders", False)),
        ("lora.text_encoder", getattr(lora_cfg, "text_encoder", False)),
    ):
        if on:
            return f"{key}=true under DeepSpeed: the engine wraps the denoiser only; use --distributed fsdp or ddp"
    if stage == 3:
        if getattr(getattr(cfg, "ema", None), "enabled", False):
            return "ema.enabled=true under ZeRO-3: the EMA needs whole weights; use zero2 or --distributed fsdp"
        export = getattr(cfg, "export", None)
        if export is not None and getattr(export, "lora_rank", None):
            return (
                f"export.lora_rank={export.lora_rank} under ZeRO-3: the SVD LoRA export needs the whole denoiser on "
                "one process; drop it (the full denoiser folder is exported) or use zero2"
            )
    return None


def _deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise UserError("--distributed zero2/zero3 needs DeepSpeed: pip install 'diffalign[deepspeed]'") from e
    return deepspeed


def ds_config(spec: Spec, cfg: Any) -> dict[str, Any]:
    """The DeepSpeed config the engine runs with: ZeRO from ``spec``; accumulation, clipping and precision are
    diffalign's (see the module docstring)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0),
        "zero_optimization": spec.zero_section(),
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW, stepped on the partitions
        "zero_force_ds_cpu_optimizer": False,  # offload keeps that optimizer (DeepSpeedCPUAdam needs compiled ops)
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},  # bf16 compute is accelerate's autocast; weights and moments stay fp32
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Engine:
    """The DeepSpeed engine over the denoiser, in the place of the loop's prepared optimizer (``run.optimizer``).

    ``optimizer`` is the client torch optimizer, whose ``param_groups`` the ZeRO optimizer shares (the LR schedule
    is built on it); ``zero`` the ZeRO optimizer that steps it on the fp32 partitions."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, spec: Spec, cfg: Any) -> None:
        deepspeed = _deepspeed()
        self.spec = spec
        self.optimizer = optimizer
        if "offload_optimizer" in spec.zero_section():  # the partitions step in CPU RAM: no fused CUDA kernel
            for group in optimizer.param_groups:
                group["fused"] = False
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config(spec, cfg), dist_init_required=False
        )

    @property
    def stage(self) -> int:
        return self.spec.stage

    def backward(self, loss: Tensor, boundary: bool) -> None:
        """One micro-batch's backward (``loss`` already scaled, see the module docstring); ``boundary``: the last of
        the optimizer step, whose ``step`` updates the weights."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def before_forward(self) -> None:
        """What ``engine.forward`` does before the module runs: reset ZeRO's per-backward hook bookkeeping."""
        self.zero.clear_backward_seen_flag()

    def grad_norm(self) -> Tensor:
        """The global gradient norm of the last step, before clipping."""
        return torch.as_tensor(self.engine.get_global_grad_norm(), dtype=torch.float32)

    def step(self) -> None:  # the update happened in the boundary ``backward``
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:  # the engine clears its gradients after its step
        pass

    def any_nonfinite(self, params: list[nn.Parameter], accelerator: Any) -> Tensor:
        """0-d bool, the same on every process: some updated weight of ``params`` is not finite (stage 2: the weights,
        whole and alike on every process; stage 3: each process's fp32 partitions, one all-reduce)."""
        from deepspeed.utils import safe_get_local_fp32_param

        if self.stage == 2:
            return ~torch.stack([p.detach().isfinite().all() for p in params]).all()
        bad = torch.zeros((), device=accelerator.device)
        for p in params:
            part = safe_get_local_fp32_param(p)
            if part is not None and part.numel():
                bad = bad + (~part.detach().isfinite().all()).float().to(bad.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        return bad > 0

    # ---- whole tensors (collectives: every process calls these, in the same order) ----
    def whole_params(self, params: Mapping[str, nn.Parameter], keep: bool = True) -> dict[str, Tensor]:
        """Every trained parameter whole, fp32, on the CPU of the processes with ``keep`` (the main one, which writes);
        the others take part in the gathers and get an empty dict."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for k, p in params.items():
            whole = safe_get_full_fp32_param(p)
            if keep:
                out[k] = whole.detach().cpu().clone()
        return out

    def optimizer_state(self, params: Mapping[str, nn.Parameter], keep: bool = True) -> dict[str, Any]:
        """The optimizer's state whole, in torch's ``state_dict`` layout (ids in ``params`` order): what an unsharded
        run's checkpoint holds, so either loads into the other. ``keep``: as ``whole_params`` (else no tensors)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        step = steps[0].detach().cpu().clone() if steps else torch.tensor(0.0)
        state = {}
        for i, p in enumerate(params.values()):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in STATES}
            if keep:
                state[i] = {"step": step.clone(), **{k: v.detach().cpu().clone() for k, v in moments.items()}}
        (group,) = self.optimizer.param_groups  # optim.build_optimizer makes one group
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(range(len(params)))}]
        return {"state": state, "param_groups": groups}

    def load(
        self, params: Mapping[str, nn.Parameter], tensors: Mapping[str, Tensor], optim: Mapping[str, Any]
    ) -> None:
        """Load whole trained tensors and an optimizer ``state_dict`` (``optimizer_state``'s layout) into the
        engine: the fp32 partitions, the moments and the step, and the module's own weights."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        missing = [k for k in params if k not in tensors]
        if missing:
            raise UserError(f"the checkpoint has no tensors for {missing[:3]} (another train.mode or LoRA?)")
        self._ensure_optimizer_state()
        for i, (k, p) in enumerate(params.items()):
            value = tensors[k].to(torch.float32)
            safe_set_full_fp32_param(p, value)
            saved = optim["state"].get(i, {})
            for key in STATES:
                if key in saved:
                    safe_set_full_optimizer_state(p, saved[key].to(torch.float32), key)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage == 3):
                p.data.copy_(value.to(p.device, p.dtype))
        step = next((s["step"] for s in optim["state"].values() if "step" in s), None)
        for s in self.optimizer.state.values():
            if step is not None and "step" in s:
                s["step"] = torch.as_tensor(step, dtype=s["step"].dtype, device=s["step"].device).clone()
        for group, saved in zip(self.optimizer.param_groups, optim["param_groups"], strict=False):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _ensure_optimizer_state(self) -> None:
        """torch's AdamW makes its state at its first step (``step`` 0, both moments zero, as its ``_init_group``), and
        ZeRO-2 links each parameter's view of it then: a resume or save before any step makes both now."""
        flats = (
            self.zero.single_partition_of_fp32_groups if self.stage == 2 else self.zero.fp32_partitioned_groups_flat
        )
        for flat in flats:
            state = self.optimizer.state[flat]
            if STATES[0] not in state:
                state["step"] = torch.tensor(0.0)
                state.update({k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in STATES})
        if self.stage == 2:
            from deepspeed.utils import lazy_init_hp_params_optimizer_state

            for lp, flat in zip(self.zero.bit16_groups, flats, strict=True):
                lazy_init_hp_params_optimizer_state(lp, flat, self.optimizer.state)


def partition_frozen(module: nn.Module, spec: Spec, cfg: Any) -> nn.Module:
    """Stage 3: full mode's frozen reference copy partitioned over the processes like the trained weights (a
    DeepSpeed engine without an optimizer; its forward gathers them). Stage 2 keeps it whole. Returns the module."""
    if spec.stage != 3:
        return module
    deepspeed = _deepspeed()
    config = {k: v for k, v in ds_config(spec, cfg).items() if k != "gradient_clipping"}
    config["zero_optimization"] = {**config["zero_optimization"]}
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=module, config=config, dist_init_required=False)
    return engine.module


def full_state_dict(module: nn.Module, main: bool) -> dict[str, Tensor]:
    """Every weight and buffer of a stage-3 ``module`` whole, on the CPU of the main process (``main``); an empty dict
    on the others. Gathered one parameter at a time (collectives: every process calls it)."""
    deepspeed = _deepspeed()
    out: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if main:
                out[name] = p.detach().cpu().clone()
    if main:
        out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
    return out


# ---- a recipe's own copies of the trained weights (Self-NPO's EMA teacher, DRO's policy snapshot) ----
def trained_values(params: Mapping[str, nn.Parameter], engine: Engine | None) -> dict[str, Tensor]:
    """The trained tensors as a recipe's extra state holds them, detached (not copied): the parameters themselves
    (DDP, ZeRO-2: whole; FSDP2: this process's ``DTensor`` shards), or under ZeRO-3 each gathered whole from the
    fp32 partitions onto the parameter's device (``safe_get_full_fp32_param``; collectives: every process calls it).
    """
    if engine is None or engine.stage != 3:
        return {k: p.detach() for k, p in params.items()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {k: safe_get_full_fp32_param(p).detach().to(p.device, p.dtype) for k, p in params.items()}


@contextlib.contextmanager
def swapped_in(
    params: Mapping[str, nn.Parameter], values: Mapping[str, Tensor], engine: Engine | None
) -> Iterator[None]:
    """The module's trained weights replaced by ``values`` (whole tensors, by name) for the forwards inside, restored
    exactly on exit (the weights are fp32 under ZeRO). Without ZeRO-3 the parameters' storage is pointed at
    ``values`` (``terms.selfnpo.swapped_in``, no copy). Under ZeRO-3 the module's partitions are overwritten through
    ``deepspeed.zero.GatheredParameters`` (gathered, written, re-partitioned; collectives) and the trained weights
    written back the same way; the optimizer's fp32 partitions are not touched. Use under ``torch.no_grad()``."""
    from diffalign.terms.selfnpo import swapped_in as pointed

    if engine is None or engine.stage != 3:
        with pointed(params, values):
            yield
        return
    deepspeed = _deepspeed()
    if params.keys() != values.keys():
        raise KeyError(f"swapped tensors differ from the parameters: {sorted(set(params) ^ set(values))[:5]}")
    plist = list(params.values())
    saved: dict[str, Tensor] = {}
    with deepspeed.zero.GatheredParameters(plist, modifier_rank=0):
        for k, p in params.items():
            saved[k] = p.data.clone()
            p.data.copy_(values[k].to(p.device, p.dtype))
    try:
        yield
    finally:
        with deepspeed.zero.GatheredParameters(plist, modifier_rank=0):
            for k, p in params.items():
                p.data.copy_(saved[k])
