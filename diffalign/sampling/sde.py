"""Stochastic rollouts with log-probabilities: the online-RL sampler (Flow-GRPO, DanceGRPO, MixGRPO, DDPO).

Flow-GRPO (arXiv 2505.05470), DanceGRPO (arXiv 2505.07818), MixGRPO (arXiv 2507.21802) and DDPO
(arXiv 2305.13301) sample a group of images per prompt with a *stochastic* version of the sampler, keep every
transition ``x_j -> x_{j+1}`` and its log-density, and later re-evaluate the log-density of the same transition
under the updated policy. ``sde_step`` is the ONE function that does both: the rollout calls it without
``prev_sample`` (it draws the next sample from the caller's ``noise``), the update (``diffalign.terms.online``)
calls it with the stored ``prev_sample``. Everything is fp32 (Flow-GRPO
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:34-38``: bf16 overflows in the mean), on the same step grid,
with the same reduction.

**Flow models** (SD3, SD3.5, FLUX): the flow SDE step of ``diffalign.diffusion.transition.flow_sde_mean_std``,
``form="flow_grpo"`` (noise level ``a`` = 0.7), ``form="dance_grpo"`` (constant ``eta`` = 0.3) or ``form="cps"``
(Coefficients-Preserving Sampling, ``a`` = 0.8, with the authors' unnormalised log-probability).
``noise_level = 0`` (or ``deterministic=True``) is the plain Euler ODE step, with no log-probability (MixGRPO's
steps outside its SDE window, ``fastvideo/utils/sampling_utils.py:157-210``).

**Epsilon / v models** (SD1.5, SDXL): DDIM (``diffusion.transition.ddim_mean_std``) with ``eta = noise_level``
(DDPO: 1.0), ``x0_hat`` / ``eps_hat`` from the guided output, no clipping of ``x0_hat``
(``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:93-190``). The last step goes to ``alphas_cumprod[0]`` (DDPO
clamps ``prev_timestep`` at 0, ``:97``).

**Log-probability**: ``diffusion.transition.gaussian_log_prob``, averaged over C,H,W as all four codes do. The PPO
clip range 1e-4 only makes sense with this normalisation.

**Grids** (``diffalign.sampling.grids``). Flow: ``flow_sigmas`` with the adapter's fixed shift, spacing
``"diffusers"`` (what Flow-GRPO's pipeline steps on) or DanceGRPO's ``"linear"``. The model sees ``sigma * T``
(DanceGRPO truncates ``int(sigma * 1000)`` for the model input only, which is not reproduced). VP: the checkpoint's
DDIM spacing, "leading" (with ``steps_offset``) or "trailing". A grid of N steps has N + 1 levels (flow sigmas, or
``alphas_cumprod`` at each step and at the last step's target).

**Rollout / update parity.** Rollout latents stay fp32 between steps (Flow-GRPO's pipeline casts them back to
the model dtype before the next step, ``sd3_pipeline_with_logprob.py:169-172``, so its stored input is not what
the model saw), the CFG forward is the same concatenated [uncond, cond] batch in both
(``diffalign.sampling.guidance.guided_output``), and the update evaluates a micro-batch of exactly the rollout's
samples at one shared step. With LoRA dropout 0 the update's first log-probabilities then equal the rollout's bit
for bit, so the ratio is exactly 1 at any batch size (DanceGRPO issue #57: exactly 1 only at batch size 1 there).

Shapes: latents (B, C, h, w) fp32; ``step`` a step index (int) or (B,) long; log-probs (B,) fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from diffalign.diffusion.flow import FlowProcess
from diffalign.diffusion.transition import (
    ARITHMETIC,
    FLOW_FORMS,
    column,
    cps_log_prob,
    ddim_mean_std,
    flow_sde_mean_std,
    gaussian_log_prob,
)
from diffalign.diffusion.vp import VPProcess
from diffalign.models.base import Adapter, Cond
from diffalign.sampling.grids import ddim_alphas, flow_sigmas, scheduler_timesteps
from diffalign.sampling.guidance import guided_output
from diffalign.sampling.seeds import draw_noise


SPACINGS = ("diffusers", "linear")


@dataclass(frozen=True, kw_only=True)
class SDESpec:
    """How the stochastic sampler steps. ``form`` applies to flow models; VP models always step DDIM.

    ``noise_level``: ``a`` of Flow-GRPO (0.7), ``eta`` of DanceGRPO (0.3), CPS's ``a`` (0.8, in (0, 1]) or DDIM's
    eta (DDPO: 1.0). ``arithmetic``: the order of the flow_grpo mean (``diffalign.diffusion.transition``).
    """

    form: str = "flow_grpo"
    noise_level: float = 0.7
    arithmetic: str = "diffalign"

    def __post_init__(self) -> None:
        if self.form not in FLOW_FORMS:
            raise ValueError(f"SDESpec.form={self.form!r}; choices: {', '.join(FLOW_FORMS)}")
        if self.arithmetic not in ARITHMETIC:
            raise ValueError(f"SDESpec.arithmetic={self.arithmetic!r}; choices: {', '.join(ARITHMETIC)}")
        if self.form == "cps" and self.noise_level > 1:
            raise ValueError(f"SDESpec.noise_level={self.noise_level}: CPS needs a noise level in [0, 1]")
        if not (self.noise_level >= 0 and math.isfinite(self.noise_level)):
            raise ValueError(f"SDESpec.noise_level={self.noise_level} must be finite and >= 0")


@dataclass(frozen=True)
class Grid:
    """A sampling grid of N steps. ``timesteps`` (N,): model-unit timesteps fed to the denoiser (flow: fp32
    ``sigma * T``; VP: long). ``levels`` (N + 1,) fp32: flow sigmas ending at 0, or VP ``alphas_cumprod`` at each
    step's timestep and, last, at the final step's target. ``prediction_type``: ``"flow"``, ``"epsilon"`` or
    ``"v_prediction"``."""

    timesteps: Tensor
    levels: Tensor
    prediction_type: str

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> Grid:
        return Grid(self.timesteps.to(device), self.levels.to(device), self.prediction_type)


def make_grid(adapter: Adapter, num_steps: int, *, spacing: str = "diffusers") -> Grid:
    """The rollout grid of ``adapter``'s forward process (flow: its fixed ``shift``; VP: its scheduler's DDIM grid,
    the last step clamped to ``alphas_cumprod[0]``)."""
    process = adapter.process
    if isinstance(process, FlowProcess):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choices: {', '.join(SPACINGS)}")
        sigmas = flow_sigmas(num_steps, process.shift, process.num_train_timesteps, spacing)
        return Grid(sigmas[:-1] * process.num_train_timesteps, sigmas, "flow")
    if isinstance(process, VPProcess):
        t, prev = scheduler_timesteps(adapter, num_steps, ("leading", "trailing"), who="online rollouts")
        a_t, a_last = ddim_alphas(process.alphas_cumprod.float().cpu(), t, prev[-1:])
        return Grid(t, torch.cat([a_t, a_last]), process.prediction_type)
    raise TypeError(f"{adapter.family}: no rollout grid for a {type(process).__name__}")


class StepOut(NamedTuple):
    """``prev_sample`` (B, C, h, w): the next latent; ``log_prob`` (B,) or None (deterministic step); ``mean``
    (B, C, h, w) and ``std`` (B, 1, 1, 1): the transition Gaussian; ``kl_scale`` (B, 1, 1, 1): the std the KL
    term divides by (flow: Flow-GRPO's ``s`` *without* ``sqrt(-dt)``; VP: the DDIM std itself)."""

    prev_sample: Tensor
    log_prob: Tensor | None
    mean: Tensor
    std: Tensor
    kl_scale: Tensor


def _step_index(step: int | Tensor, batch: int, device: torch.device) -> Tensor:
    index = torch.as_tensor(step, dtype=torch.long).reshape(-1).to(device)
    if index.numel() not in (1, batch):
        raise ValueError(f"step has {index.numel()} entries for a batch of {batch}")
    return index.expand(batch)


def _flow_mean_std(
    grid: Grid, spec: SDESpec, v: Tensor, x: Tensor, index: Tensor, noise_level: float
) -> tuple[Tensor, Tensor, Tensor]:
    levels = grid.levels.to(x.device)
    return flow_sde_mean_std(
        x, v, levels[index], levels[index + 1], noise_level, form=spec.form, sigma_max=levels[1],
        arithmetic=spec.arithmetic,
    )  # fmt: skip


def _ddim_mean_std(grid: Grid, out: Tensor, x: Tensor, index: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    levels = grid.levels.to(x.device)
    a_t, a_prev = levels[index], levels[index + 1]
    root_a, root_b = column(a_t.sqrt(), x), column((1 - a_t).sqrt(), x)
    if grid.prediction_type == "epsilon":
        x0, eps = (x - root_b * out) / root_a, out
    else:
        x0, eps = root_a * x - root_b * out, root_a * out + root_b * x
    return ddim_mean_std(x0, eps, a_t, a_prev, eta)


def sde_step(
    grid: Grid,
    spec: SDESpec,
    model_out: Tensor,
    x: Tensor,
    step: int | Tensor,
    *,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    deterministic: bool = False,
) -> StepOut:
    """One step ``x -> x'`` of the stochastic sampler from the (guided) model output, and its log-probability.

    With ``prev_sample`` the log-density of that given sample (the update); without it ``x' = mean + std noise``
    (the rollout; ``noise`` (B, C, h, w) from the caller's generators). ``deterministic`` (or ``noise_level=0``)
    takes the ODE step ``x' = mean`` and returns no log-probability. All arithmetic is fp32.
    """
    out, x = model_out.float(), x.float()
    index = _step_index(step, x.shape[0], x.device)
    if int(index.max()) >= grid.num_steps or int(index.min()) < 0:
        raise ValueError(f"step {index.tolist()} outside the grid of {grid.num_steps} steps")
    level = 0.0 if deterministic else spec.noise_level
    if grid.is_flow:
        mean, std, kl_scale = _flow_mean_std(grid, spec, out, x, index, level)
    else:
        mean, std = _ddim_mean_std(grid, out, x, index, level)
        kl_scale = std
    if level == 0:
        return StepOut(mean, None, mean, std, kl_scale)
    if prev_sample is None:
        if noise is None:
            raise ValueError("sde_step needs noise (rollout) or prev_sample (update)")
        prev_sample = mean + std * noise.float().to(mean.device)
    prev_sample = prev_sample.float()
    if grid.is_flow and spec.form == "cps":
        return StepOut(prev_sample, cps_log_prob(prev_sample, mean), mean, std, kl_scale)
    return StepOut(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, kl_scale)


@dataclass
class Trajectory:
    """B rollouts of N steps. ``latents`` (B, N + 1, C, h, w) fp32: the latent before each step, then the final
    sample; ``log_probs`` (B, N) fp32 (NaN on deterministic steps); ``sde`` (N,) bool: which steps were
    stochastic."""

    latents: Tensor
    log_probs: Tensor
    sde: Tensor
    means: Tensor | None = None  # (B, N, C, h, w) fp32 transition means, with keep_means (GRPO-Guard's mean_old)

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def rollout(
    adapter: Adapter,
    grid: Grid,
    spec: SDESpec,
    cond: Cond,
    uncond: Cond | None,
    *,
    generators: Sequence[torch.Generator],
    latent_shape: Sequence[int],
    guidance_scale: float = 1.0,
    sde_steps: Tensor | None = None,
    initial: Tensor | None = None,
    keep_means: bool = False,
) -> Trajectory:
    """Sample B = len(generators) trajectories from ``adapter`` as it is now (the policy, LoRA on).

    Each sample's initial noise and step noises come from its own generator, so a sample does not depend on
    which others share its batch or process. ``sde_steps`` (N,) bool: stochastic steps (default all; MixGRPO:
    a window); the others are ODE steps. ``initial`` (B, *latent_shape): the initial noise instead of the
    generators' first draw (which is still made, so the step noises are the same with or without it; Flow-GRPO
    ``sample.same_latent``, DanceGRPO ``init_same_noise``: one initial noise per group). ``keep_means``: also
    return every step's transition mean (``Trajectory.means``).
    """
    n, device = grid.num_steps, adapter.device
    sde = torch.ones(n, dtype=torch.bool) if sde_steps is None else sde_steps.bool().cpu()
    x = draw_noise(generators, latent_shape, device)
    if initial is not None:
        if initial.shape != x.shape:
            raise ValueError(f"initial noise of shape {tuple(initial.shape)} for latents {tuple(x.shape)}")
        x = initial.float().to(device)
    latents, log_probs, means = [x], [], []
    for j in range(n):
        t = grid.timesteps[j].to(device).expand(x.shape[0])
        out = guided_output(adapter, x, t, cond, uncond, guidance_scale)
        noise = draw_noise(generators, latent_shape, device) if sde[j] else None
        result = sde_step(grid, spec, out, x, j, noise=noise, deterministic=not bool(sde[j]))
        x = result.prev_sample
        latents.append(x)
        if keep_means:
            means.append(result.mean)
        lp = result.log_prob if result.log_prob is not None else torch.full((x.shape[0],), math.nan, device=device)
        log_probs.append(lp)
    kept = torch.stack(means, dim=1) if keep_means else None
    return Trajectory(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), sde, kept)
