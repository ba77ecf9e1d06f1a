"""FSDP2 sharding of the denoiser, driven by the accelerate config a run was launched with.

``accelerate launch --config_file diffalign/recipes/accelerate/fsdp.yaml`` (what ``diffalign run --distributed fsdp``
does) exports the config's ``fsdp_config`` as ``FSDP_*`` environment variables and ``ACCELERATE_USE_FSDP=true``.
diffalign shards the denoiser itself with torch's ``fully_shard`` (one unit per family block, ``Adapter.shard_blocks``,
then the root): the same code on CPU/gloo, where accelerate ignores its FSDP plugin, and on GPU/nccl. So that
accelerate does not wrap anything a second time, ``take_over`` moves the flag to ``DIFFALIGN_FSDP`` before the
``Accelerator`` is built; the recipes never call ``accelerator.prepare`` on the model.

Under FSDP2 the trained parameters are ``DTensor`` shards: the backward reduce-scatters their gradients (the mean over
processes), the optimizer steps on the local shards, and checkpoints are written shard by shard through
``torch.distributed.checkpoint`` (``checkpoint.save_sharded``). Every process must run the same forwards and
backwards in the same order: a process that skips one leaves the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.errors import UserError
from diffalign.training import zero


FLAG = "DIFFALIGN_FSDP"  # set by ``take_over`` from accelerate's ACCELERATE_USE_FSDP


@dataclass(frozen=True)
class Plan:
    """How to shard: read from the ``FSDP_*`` variables accelerate launch exports from ``fsdp_config``."""

    offload: bool = False  # fsdp_offload_params: parameters, gradients and optimizer state in CPU RAM
    reshard_after_forward: bool = (
        True  # fsdp_reshard_after_forward (FULL_SHARD); false keeps them gathered (SHARD_GRAD_OP)
    )
    wrap_classes: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap; empty: the family's blocks


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def take_over(environ: MutableMapping[str, str] = os.environ) -> None:
    """Before ``Accelerator()``: an FSDP launch becomes diffalign's (``DIFFALIGN_FSDP=1``), accelerate's flag is cleared.

    Refuses (one line) an ``fsdp_version`` other than 2 (FSDP1 is not supported). A DeepSpeed launch is taken over
    the same way (``zero.take_over``: ``DIFFALIGN_DEEPSPEED``).
    """
    zero.take_over(environ)
    if _true(environ.get("ACCELERATE_USE_FSDP")):
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(
                f"the accelerate config asks for FSDP version {version}; diffalign shards with FSDP2: set "
                "fsdp_config.fsdp_version: 2 (or use --distributed fsdp, which ships that config)"
            )
        environ[FLAG] = "1"
        environ["ACCELERATE_USE_FSDP"] = "false"


def plan(environ: MutableMapping[str, str] = os.environ) -> Plan | None:
    """The sharding plan of this process, or None when the run is not sharded (one process, DDP)."""
    if not _true(environ.get(FLAG)):
        return None
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    classes = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return Plan(
        offload=_true(environ.get("FSDP_OFFLOAD_PARAMS")),
        reshard_after_forward=reshard not in ("false", "shard_grad_op", "2"),
        wrap_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )


def config_problem(cfg: object) -> str | None:
    """What a sharded run of ``cfg`` cannot do, as one line (checked before any model loads), or None."""
    export = getattr(cfg, "export", None)
    if export is not None and getattr(export, "lora_rank", None):
        return (
            f"export.lora_rank={export.lora_rank}: the SVD LoRA export needs the whole denoiser on one process, not "
            "available in a sharded run; drop it (the full denoiser folder is exported) and extract the LoRA afterwards"
        )
    return None


def wrap_units(module: nn.Module, classes: Sequence[str], *, explicit: bool) -> list[nn.Module]:
    """The submodules of ``module`` whose class name is in ``classes`` (outermost first).

    ``explicit`` (names from the user's config): a name that matches nothing is an error naming the classes there are.
    """
    units = [m for m in module.modules() if m is not module and type(m).__name__ in classes]
    if explicit:
        found = {type(m).__name__ for m in units}
        missing = [c for c in classes if c not in found]
        if missing:
            names = sorted({type(m).__name__ for m in module.modules()})
            raise UserError(
                f"fsdp_transformer_layer_cls_to_wrap names {missing}, not classes of the {type(module).__name__}; "
                f"its classes: {names[:40]}"
            )
    return units


def shard(module: nn.Module, block_classes: Sequence[str], spec: Plan) -> nn.Module:
    """``fully_shard`` each wrap unit of ``module``, then ``module`` itself (in place; returns it).

    The parameters become ``DTensor`` shards over all processes: build the optimizer AFTER this. Frozen and trained
    parameters may share a unit (LoRA mode: the base weights are sharded too, and the reference forward with the
    adapter switched off gathers them like the policy's).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return module  # one process without a process group: nothing to shard over
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    classes = spec.wrap_classes or tuple(block_classes)
    kwargs = {
        "reshard_after_forward": spec.reshard_after_forward,
        "offload_policy": CPUOffloadPolicy() if spec.offload else OffloadPolicy(),
    }
    for unit in reversed(wrap_units(module, classes, explicit=bool(spec.wrap_classes))):  # innermost first
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def is_sharded(params: Iterable[Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def local(t: Tensor) -> Tensor:
    """This process's shard of a ``DTensor`` (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor on every process (a collective for a ``DTensor``: every process calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm(params: Sequence[nn.Parameter], accelerator: object) -> Tensor:
    """The global L2 norm of the gradients of ``params``, sharded (``DTensor``) or replicated: the squares of the local
    shards are summed over processes (one all-reduce), the replicated ones counted once."""
    device = accelerator.device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        squares = local(p.grad).float().pow(2).sum().to(device)
        if is_sharded([p.grad]):
            sharded = sharded + squares
        else:
            replicated = replicated + squares
    if accelerator.num_processes > 1:
        sharded = accelerator.reduce(sharded, reduction="sum")
    return (sharded + replicated).sqrt()


def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float, accelerator: object) -> Tensor:
    """Clip the gradients of ``params`` (``DTensor`` or not) to the global norm ``max_norm``; returns the norm before."""
    norm = grad_norm(params, accelerator)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            local(p.grad).mul_(scale.to(local(p.grad).device, local(p.grad).dtype))
    return norm


def any_nonfinite(params: Sequence[nn.Parameter], accelerator: object) -> Tensor:
    """0-d bool, the same on every process: some process holds a non-finite value of ``params`` (one all-reduce)."""
    bad = torch.stack([~local(p.detach()).isfinite().all() for p in params]).any().float().to(accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad > 0


def max_over_processes(value: int, accelerator: object) -> int:
    """The largest ``value`` of all processes (one collective every process makes): how many forwards a sharded step
    makes where each process's data asks for its own number, so that all of them make the same calls."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def full_state_dict(module: nn.Module, main: bool) -> dict[str, Tensor]:
    """Every tensor of the sharded ``module`` gathered whole, on the CPU of the main process (``main``); an empty dict
    on the others. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return whole if main else {}


def save_pretrained(module: nn.Module, whole: dict[str, Tensor], out_dir: Path) -> Path:
    """What ``module.save_pretrained(out_dir)`` writes (its config and ``diffusion_pytorch_model.safetensors``), from
    the gathered tensors ``whole``: ``from_pretrained`` loads it like any diffusers folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module.save_config(out)
    save_file({k: v.contiguous() for k, v in whole.items()}, str(out / "diffusion_pytorch_model.safetensors"))
    return out
