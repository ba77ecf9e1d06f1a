"""Diffusion-DRO terms: a replay buffer of the policy's own sampling trajectories, and the (expert, sample) errors.

Diffusion-DRO (Wu et al., NeurIPS 2025, arXiv 2510.18353; ``diffalign.losses.dro`` has the loss) pairs an expert
image with a latent from the policy's own sampling trajectory. What follows reads basiclab/DiffusionDRO@b0693ec:

* **Buffer** (``misc/buffer.py``). Each sampled trajectory is one slot: its expert latent ``x0`` and prompt
  embedding (not time-dependent; the row of the data batch the sample was drawn for, ``train.py`` L666-678), and
  per sampler step the latent before the step, its timestep and the sampler's noise prediction (L144-146; with
  ``x_T`` pushed first, L684-685, and the stacked latents cut to the T steps, L56, so ``x[j]`` is the input of
  step ``j``). ``commit`` appends and keeps the newest ``size`` slots (L76-90). ``sample(n)`` takes ``n`` slots
  (a random permutation when ``n <= len``, else with replacement) and one uniform step of each (L105-118).
* **Terms** (``train.py`` L744-763). The expert side is ``x0`` noised with FRESH noise at the sample's timestep
  (target: that noise); the sample side is the buffered ``x_t`` whose target is the buffered prediction of the
  snapshot that sampled it; both in one batch, expert first, under the slot's prompt embedding; the reference
  pass (LoRA off, no grad) then the policy pass, per-sample mean-over-C,H,W squared errors in fp32.

The targets are in the model's output space: the noise for epsilon-prediction (the authors' SD1.5 / SDXL), the
velocity for v-prediction and for the flow families (SD3, FLUX, ...: ``eps - x0``) (the process's training target
on the expert side, the snapshot's raw output on the sample side). Shapes: latents ``(B, C, h, w)``; buffer tensors
slot-first; timesteps ``(B,)``, long (VP) or fp32 model units ``sigma * T`` (flow).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.models.base import Adapter, Cond
from diffalign.terms.offline import per_sample_error
from diffalign.types import PairTerms


STEP_KEYS = ("x", "target", "t")  # time-dependent: (slots, T, ...)


@dataclass(frozen=True)
class BufferSample:
    """``n`` pairs drawn from the buffer: expert ``x0`` (n, C, h, w), ``cond`` (n, ...), and per pair one step of
    its trajectory: ``x_t`` / ``target`` (n, C, h, w) and ``t`` (n,)."""

    x0: Tensor
    cond: Cond
    x_t: Tensor
    target: Tensor
    t: Tensor


class ReplayBuffer:
    """The authors' replay buffer (module docstring) over whole trajectories; tensors kept on the CPU (their
    ``cpu_offload=True`` default). ``size``: how many trajectories it keeps (authors' ``--buffer_size`` 4)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"replay buffer size must be >= 1, got {size}")
        self.size = size
        self.tensors: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.tensors else int(self.tensors["x0"].shape[0])

    def commit(self, x0: Tensor, cond: Mapping[str, Tensor], x: Tensor, target: Tensor, t: Tensor) -> None:
        """Append B trajectories: ``x0`` (B, C, h, w), ``cond`` entries (B, ...), ``x`` / ``target`` (B, T, C, h, w)
        (the latent before each step and the sampler's output there), ``t`` (B, T) (long, or fp32 on a flow grid);
        keep the newest ``size``."""
        b, steps = x.shape[:2]
        if target.shape != x.shape or tuple(t.shape) != (b, steps) or x0.shape[0] != b:
            raise ValueError(
                f"buffer commit: x {tuple(x.shape)}, target {tuple(target.shape)}, t {tuple(t.shape)}, "
                f"x0 {tuple(x0.shape)} do not describe {b} trajectories of {steps} steps"
            )
        t = t if t.is_floating_point() else t.long()  # flow grids: fp32 model-unit timesteps ``sigma * T``
        new = {"x0": x0, "x": x, "target": target, "t": t, **{f"cond.{k}": v for k, v in cond.items()}}
        if self.tensors and new.keys() != self.tensors.keys():
            raise ValueError(f"buffer commit: keys {sorted(new)} differ from the buffer's {sorted(self.tensors)}")
        for key, value in new.items():
            value = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
            old = self.tensors.get(key)
            self.tensors[key] = (value if old is None else torch.cat([old, value]))[-self.size :].clone()

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> BufferSample:
        """``n`` pairs: slots by ``randperm(len)[:n]`` (``n <= len``) or ``randint`` (with replacement), then one
        uniform step of each (``misc/buffer.py`` L105-110); the draws come from ``generator`` in that order."""
        if not self.tensors:
            raise ValueError("the replay buffer is empty: commit trajectories before sampling")
        count, steps = len(self), int(self.tensors["t"].shape[1])
        slots = (
            torch.randperm(count, generator=generator)[:n]
            if n <= count
            else torch.randint(0, count, (n,), generator=generator)
        )
        step = torch.randint(0, steps, (n,), generator=generator)
        pick = {k: (v[slots, step] if k in STEP_KEYS else v[slots]).to(device) for k, v in self.tensors.items()}
        cond = {k.removeprefix("cond."): v for k, v in pick.items() if k.startswith("cond.")}
        return BufferSample(pick["x0"], cond, pick["x"], pick["target"], pick["t"])

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The buffer's tensors under ``prefix`` (a checkpoint's extra tensors)."""
        return {prefix + k: v for k, v in self.tensors.items()}

    def load_state_dict(self, tensors: Mapping[str, Tensor], prefix: str) -> None:
        self.tensors = {k.removeprefix(prefix): v.clone() for k, v in tensors.items() if k.startswith(prefix)}
        if self.tensors and len(self) > self.size:
            raise ValueError(
                f"the checkpoint's replay buffer holds {len(self)} trajectories, more than size={self.size}"
            )


def dro_terms(adapter: Adapter, sample: BufferSample, eps_w: Tensor) -> PairTerms:
    """Errors of (expert ``w``, own sample ``l``) pairs: ``w`` = ``sample.x0`` noised with ``eps_w`` at ``sample.t``,
    ``l`` = ``sample.x_t`` against ``sample.target``; reference (LoRA off, no grad) first, then the policy, as one
    concatenated [w, l] forward each. Returns ``PairTerms`` with ``policy_*`` carrying the gradient."""
    process, device = adapter.process, adapter.device
    x0, t = sample.x0.to(device).float(), sample.t.to(device)
    eps_w = eps_w.to(device).float()
    x_t = torch.cat([process.add_noise(x0, eps_w, t), sample.x_t.to(device).float()])
    target = torch.cat([process.target(x0, eps_w, t), sample.target.to(device).float()])
    tt = torch.cat([t, t])
    cond = {k: torch.cat([v, v]).to(device) for k, v in sample.cond.items()}
    with torch.no_grad(), adapter.reference():
        ref_w, ref_l = per_sample_error(adapter.predict(x_t, tt, cond), target).chunk(2)
    policy_w, policy_l = per_sample_error(adapter.predict(x_t, tt, cond), target).chunk(2)
    return PairTerms(
        policy_w=policy_w,
        policy_l=policy_l,
        ref_w=ref_w,
        ref_l=ref_l,
        timesteps=t,
        num_train_timesteps=process.num_train_timesteps,
    )
