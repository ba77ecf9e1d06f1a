"""The plain sampler of the reward-gradient methods: DDIM with eta on VP models, Euler on flow models.

VP (sd15, sdxl): ``DDIMScheduler``'s grid for the checkpoint's ``timestep_spacing`` ("leading" + ``steps_offset``,
"trailing", "linspace"; ``diffalign.sampling.grids``), ``prev = t - T // N`` and the scheduler's final alpha
(``set_alpha_to_one``), and the DDIM step with ``eta`` (``diffalign.diffusion.transition.ddim_mean_std``; eta = 1 is
DDPM's ancestral step, what ImageReward's ReFL samples with). Flow (sd3, flux): the "endpoint" sigmas (N sigmas
linear in [1, 1/T] before the process's shift: ``FlowMatchEulerDiscreteScheduler``'s grid up to its double shift of
the last sigma), then 0, and Euler steps ``x += (s_next - s) v`` (no noise; ``eta`` unused).

Shapes: latents (B, C, h, w) fp32; timesteps (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.diffusion import FlowProcess, VPProcess
from diffalign.diffusion.transition import ddim_mean_std
from diffalign.models.base import Adapter
from diffalign.sampling.grids import ddim_alphas, flow_sigmas, scheduler_timesteps


class Sampler:
    """The sampling grid of ``adapter`` with ``num_steps`` steps and its update rule (module docstring)."""

    def __init__(self, adapter: Adapter, num_steps: int, eta: float = 1.0) -> None:
        self.process, self.num_steps, self.eta = adapter.process, num_steps, eta
        device, n = adapter.device, num_steps
        if isinstance(self.process, VPProcess):
            t, prev = scheduler_timesteps(adapter, n, who="the reward-gradient sampler")
            self.timesteps = t.to(device)
            alphas = self.process.alphas_cumprod.to(device)
            cfg = adapter.scheduler.config
            final = torch.ones(()) if cfg.get("set_alpha_to_one", True) else alphas[0].cpu()
            self.a_t, self.a_prev = ddim_alphas(alphas, self.timesteps, prev.to(device), final.to(device))
        elif isinstance(self.process, FlowProcess):
            big_t = self.process.num_train_timesteps
            self.sigmas = flow_sigmas(n, self.process.shift, big_t, "endpoint").to(device)
            self.timesteps = self.sigmas[:-1] * big_t
        else:
            raise TypeError(f"no sampler for {type(self.process).__name__}")

    @property
    def is_flow(self) -> bool:
        return isinstance(self.process, FlowProcess)

    def t(self, i: int, batch: int) -> Tensor:
        """(batch,) model-unit timesteps of grid step ``i``."""
        return self.timesteps[i].expand(batch).clone()

    def pred_x0(self, x: Tensor, out: Tensor, i: int) -> Tensor:
        """fp32 clean-sample estimate at step ``i`` (DDPM/DDIM ``pred_original_sample``; flow ``x - sigma v``)."""
        return self.process.pred_x0(x.float(), out.float(), self.t(i, x.shape[0])).float()

    def step(self, x: Tensor, out: Tensor, i: int, noise: Tensor | None) -> Tensor:
        """``x`` at step ``i`` -> step ``i + 1`` (fp32); ``noise`` (like ``x``) is used by stochastic VP steps."""
        x, out = x.float(), out.float()
        if self.is_flow:
            return x + (self.sigmas[i + 1] - self.sigmas[i]) * out
        t = self.t(i, x.shape[0])
        x0, eps = self.process.pred_x0(x, out, t).float(), self.process.pred_eps(x, out, t).float()
        b = x.shape[0]
        mean, std = ddim_mean_std(x0, eps, self.a_t[i].expand(b), self.a_prev[i].expand(b), self.eta)
        return mean if noise is None or self.eta == 0 else mean + std * noise.float()
