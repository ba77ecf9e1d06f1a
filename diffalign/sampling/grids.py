"""Every timestep grid the samplers step on, each written once.

**VP (DDIM)**: ``DDIMScheduler.set_timesteps``' grid for the checkpoint's ``timestep_spacing``, with
``ratio = T // N``: "leading" ``arange(N)[::-1] * ratio + steps_offset`` (SD: 951, 901, ..., 1 for 20 steps),
"trailing" ``round(arange(T, 0, -T / N)) - 1``, "linspace" ``round(linspace(0, T - 1, N))[::-1]``; each step
goes to ``prev = t - ratio``. The last ``prev`` is negative when the step leaves the table: SPO, LPO and DDPO clamp
it to timestep 0 (``alphas_cumprod[0]``, ``prev_t.clamp_min(0)``), the diffusers scheduler uses its
``final_alpha_cumprod`` (1 with ``set_alpha_to_one``): ``ddim_alphas`` does either.

**Flow** (``flow_sigmas``; N + 1 sigmas ending at a terminal 0, ``shift(s) = shift s / (1 + (shift - 1) s)``):

- ``"diffusers"``: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with a fixed shift,
  ``shift(linspace(1, shift(1/T), N))`` (its double shift of the last sigma), what Flow-GRPO's pipeline steps on;
- ``"linear"``: DanceGRPO's ``shift(linspace(1, 0, N + 1))`` (``fastvideo/train_grpo_flux.py:311-313``);
- ``"endpoint"``: the reward-gradient sampler's ``shift(linspace(1, 1/T, N))`` in fp32 (single shift);
- ``"unipc"``: ``UniPCMultistepScheduler.set_timesteps`` with flow sigmas (Wan's checkpoints),
  ``shift(linspace(1, 1/T, N + 1)[:-1])`` in float64 with the first sigma lowered by 1e-6, then fp32: the grid
  flow_grpo's Wan rollouts step on (``wan_pipeline_with_logprob.py`` uses the pipeline scheduler's sigmas).

The model sees ``sigma * T`` (diffusers' timesteps).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.models.base import Adapter


VP_SPACINGS = ("leading", "trailing", "linspace")
FLOW_SPACINGS = ("diffusers", "linear", "endpoint", "unipc")


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, steps_offset: int = 0, spacing: str = "leading"
) -> tuple[Tensor, Tensor]:
    """(timesteps, prev), both (N,) long: the DDIM grid and ``prev = t - T // N`` (negative where the step leaves
    the table; see the module docstring)."""
    big_t, n = num_train_timesteps, num_steps
    if spacing not in VP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choices: {', '.join(VP_SPACINGS)}")
    if not 1 <= n <= big_t:
        raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={big_t}]")
    ratio = big_t // n
    if spacing == "leading":
        t = np.arange(n)[::-1] * ratio + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
    else:
        t = np.linspace(0, big_t - 1, n).round()[::-1]
    t = torch.as_tensor(t.copy(), dtype=torch.long)
    if int(t.max()) >= big_t:
        raise ValueError(f"steps_offset={steps_offset} puts timestep {int(t.max())} past {big_t - 1}")
    return t, t - ratio


def perturbed_timesteps(num_train_timesteps: int, num_steps: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample grids (N, B) long and their ``prev = t - T // N`` (N, B): Diffusion-DRO's buffer sampler
    (basiclab/DiffusionDRO@b0693ec ``train.py`` L688-692) ``t[j, b] = (N - 1 - j) * ratio + offsets[b]`` with
    ``ratio = T // N`` and each ``offsets[b]`` in ``[0, ratio)`` (the authors draw ``randint(0, ratio)``), so the
    grids together cover every timestep. The last ``prev`` is negative: that step leaves the table."""
    big_t, n = num_train_timesteps, num_steps
    if not 1 <= n <= big_t:
        raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={big_t}]")
    ratio = big_t // n
    offsets = offsets.long().reshape(-1)
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= ratio):
        raise ValueError(f"timestep offsets must lie in [0, {ratio}); got {offsets.tolist()}")
    t = (torch.arange(n - 1, -1, -1) * ratio)[:, None] + offsets[None, :]
    return t, t - ratio


def scheduler_timesteps(
    adapter: Adapter, num_steps: int, spacings: Sequence[str] = VP_SPACINGS, *, who: str = "this sampler"
) -> tuple[Tensor, Tensor]:
    """``ddim_timesteps`` for the checkpoint's scheduler config (``timestep_spacing``, ``steps_offset``); a spacing
    outside ``spacings`` is an error naming ``who`` refuses it."""
    config = adapter.scheduler.config
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in spacings:
        raise ValueError(f"scheduler timestep_spacing={spacing!r}: {who} implements {', '.join(spacings)} only")
    offset = int(config.get("steps_offset", 0) or 0)
    return ddim_timesteps(adapter.process.num_train_timesteps, num_steps, offset, spacing)


def ddim_alphas(alphas_cumprod: Tensor, t: Tensor, prev: Tensor, final: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(a_t, a_prev)`` of a DDIM grid: ``a_prev`` where ``prev < 0`` is ``final`` (the scheduler's final alpha),
    or ``alphas_cumprod[0]`` when ``final`` is None (the clamp of SPO / DDPO)."""
    alphas = alphas_cumprod
    a_prev = alphas[prev.clamp_min(0)]
    if final is not None:
        a_prev = torch.where(prev >= 0, a_prev, final.to(a_prev))
    return alphas[t], a_prev


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000, spacing: str = "diffusers") -> Tensor:
    """(N + 1,) fp32 shifted sigmas from 1 down to a terminal 0 (the three spacings of the module docstring)."""
    if spacing not in FLOW_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choices: {', '.join(FLOW_SPACINGS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")

    def shifted(s: Tensor) -> Tensor:
        return shift * s / (1 + (shift - 1) * s)

    if spacing == "linear":
        return shifted(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)).float()
    if spacing == "unipc":
        base = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
        unipc = shift * base / (1 + (shift - 1) * base)
        if abs(unipc[0] - 1) < 1e-6:
            unipc[0] -= 1e-6
        return torch.cat([torch.from_numpy(unipc.astype(np.float32)), torch.zeros(1)])
    if spacing == "endpoint":
        sigmas = shifted(torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps, dtype=torch.float32))
    else:
        sigma_min = float(shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)))  # the table's last
        base = torch.linspace(
            num_train_timesteps * 1.0, sigma_min * num_train_timesteps, num_steps, dtype=torch.float64
        )
        sigmas = shifted(base / num_train_timesteps).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])
