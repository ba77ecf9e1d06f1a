"""Data-parallel helpers that work the same on CPU (gloo) and GPU (nccl).

The recipes do not wrap the denoiser in DDP: only the LoRA parameters train, so the gradients are reduced
explicitly once per optimizer step (after local accumulation), which also keeps the adapter's modules
unwrapped for the reference pass. Under FSDP2 (``sharding``) the backward reduces the sharded gradients itself and
``reduce_gradients`` only rescales them.

Every process calls these in the same order on every step, whatever its data (a micro-batch of bad rows only
still takes part with zeros): a collective that one process skips aborts gloo and hangs NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffalign.training.sharding import is_sharded, local


def reduce_gradients(
    params: Sequence[nn.Parameter], accelerator: object, groups: int, flag: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum the gradients of ``params``, this process's group count and ``flag`` over processes (ONE flat all-reduce,
    no host synchronisation) and divide the gradients by the global count (at least 1).

    Each process back-propagates the SUM of its per-group losses, so the result is the mean over all groups
    whatever their split over processes and micro-batches. Returns the global count and the summed ``flag``
    (0-d tensors on the device).

    Parameters sharded by FSDP2 (``DTensor``, see ``sharding``) are not all-reduced again: their backward already
    reduce-scattered the gradient as the MEAN over processes, so their local shard is multiplied by
    ``num_processes / count`` instead (exact for a power-of-two process count).
    """
    replicated = [p for p in params if not is_sharded([p])]
    sharded = [p for p in params if is_sharded([p])]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
    device = flag.device
    extra = torch.stack([torch.full((), float(groups), device=device), flag.float().reshape(())])
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), extra.to(grads[0].device if grads else device)])
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, reduction="sum")
    count, total_flag = flat[-2], flat[-1]
    flat = flat[:-2] / count.clamp(min=1.0)
    offset = 0
    for p, g in zip(replicated, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    scale = accelerator.num_processes / count.clamp(min=1.0)
    for p in sharded:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        shard = local(p.grad)
        shard.mul_(scale.to(shard.device, shard.dtype))
    return count, total_flag


def gather_rows(values: Tensor, accelerator: object) -> Tensor:
    """Concatenate ``values`` (n, ...) of every process in rank order (every process must pass the same n).

    The row counts are checked first, so a mismatch is an error on every rank rather than a hang or garbage.
    """
    if accelerator.num_processes == 1:
        return values
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([values.shape[0]], device=device))
    if int(counts.min()) != int(counts.max()):
        raise ValueError(f"gather_rows needs the same row count on every process; got {counts.tolist()}")
    return accelerator.gather(values.to(device).contiguous()).cpu()
