"""Online RL rollouts: one SDE step with its log-probability, shared by the rollout and the update.

Flow-GRPO (arXiv 2505.05470), DanceGRPO (arXiv 2505.07818), MixGRPO (arXiv 2507.21802) and DDPO
(arXiv 2305.13301) sample a group of images per prompt with a *stochastic* version of the sampler, keep every
transition ``x_j -> x_{j+1}`` and its log-density, and later re-evaluate the log-density of the same transition
under the updated policy. ``sde_step`` is the ONE function that does both: the rollout calls it without
``prev_sample`` (it draws the next sample from the caller's ``noise``), the update calls it with the stored
``prev_sample``. Everything is fp32 (Flow-GRPO ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:34-38``: bf16
overflows in the mean), on the same step grid, with the same reduction.

**Flow models** (SD3, SD3.5, FLUX; sigma = flow sigma, 1 = noise; ``dt = sigma_next - sigma < 0``; ``v`` the
guided velocity)::

    mean = x + v dt + s^2 / (2 sigma) (x + (1 - sigma) v) dt          std = s sqrt(-dt)

- ``form="flow_grpo"``: ``s = a sqrt(sigma / (1 - sigma))`` with ``a = noise_level`` (0.7); at sigma = 1 the
  denominator uses the grid's second sigma (``sd3_sde_with_logprob.py:42-50``: ``sigma_max = sigmas[1]``).
- ``form="dance_grpo"``: ``s = eta`` constant (0.3). DanceGRPO writes the drift through the score
  ``-(x - (1 - sigma) x0_hat) / sigma^2`` with ``x0_hat = x - sigma v`` and ``std = eta sqrt(sigma - sigma_next)``
  (``fastvideo/train_grpo_flux.py:131-170``); expanding ``x0_hat`` gives the line above with ``s = eta``.
- ``noise_level = 0`` (or ``deterministic=True``) is the plain Euler ODE step, with no log-probability (MixGRPO's
  steps outside its SDE window, ``fastvideo/utils/sampling_utils.py:157-210``).

**Epsilon / v models** (SD1.5, SDXL): DDIM (Song et al. 2021, Eq. 12 and 16) with ``eta = noise_level`` (DDPO:
1.0), ``x0_hat`` / ``eps_hat`` from the guided output, no clipping of ``x0_hat``
(``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:93-190``; the arithmetic is ``losses._transition``, which
SPO / LPO mining share). The last step goes to ``alphas_cumprod[0]`` (DDPO clamps ``prev_timestep`` at 0, ``:97``).

**Log-probability**: per-element Gaussian log-density ``-(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``,
*averaged* over C,H,W as all four codes do (``sd3_sde_with_logprob.py:61-68``, ``train_grpo_flux.py:159-167``,
``ddim_with_logprob.py:183-190``). The PPO clip range 1e-4 only makes sense with this normalisation.

**Grids.** Flow: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the adapter's fixed shift (``spacing=
"diffusers"``: shift(linspace(1, shift(1/T), N)) then a terminal 0, what Flow-GRPO's pipeline steps on) or
DanceGRPO's shift(linspace(1, 0, N + 1)) (``spacing="linear"``, ``train_grpo_flux.py:311-313``). The model sees
``sigma * T`` (diffusers' timesteps; DanceGRPO truncates ``int(sigma * 1000)`` for the model input only, which is
not reproduced). VP: the checkpoint's DDIM spacing, "leading" (with ``steps_offset``) or "trailing". A grid of N steps has N + 1
levels (flow sigmas, or ``alphas_cumprod`` at each step and at the last step's target).

**Rollout / update parity.** Rollout latents stay fp32 between steps (Flow-GRPO's pipeline casts them back to
the model dtype before the next step, ``sd3_pipeline_with_logprob.py:169-172``, so its stored input is not what
the model saw), the CFG forward is the same concatenated [uncond, cond] batch in both, and the update evaluates a
micro-batch of exactly the rollout's samples at one shared step. With LoRA dropout 0 the update's first
log-probabilities then equal the rollout's bit for bit, so the ratio is exactly 1 at any batch size (DanceGRPO
issue #57: exactly 1 only at batch size 1 there). The last (sigma -> 0) step is never trained (``train_steps``).

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
from diffalign.diffusion.vp import VPProcess
from diffalign.losses._transition import ddim_mean_std, gaussian_log_prob
from diffalign.models.base import Adapter, Cond


FLOW_FORMS = ("flow_grpo", "dance_grpo")
SPACINGS = ("diffusers", "linear")
STEP_MODES = ("fraction", "window")


@dataclass(frozen=True, kw_only=True)
class SDESpec:
    """How the stochastic sampler steps. ``form`` applies to flow models; VP models always step DDIM.

    ``noise_level``: ``a`` of Flow-GRPO (0.7), ``eta`` of DanceGRPO (0.3) or DDIM's eta (DDPO: 1.0).
    """

    form: str = "flow_grpo"
    noise_level: float = 0.7

    def __post_init__(self) -> None:
        if self.form not in FLOW_FORMS:
            raise ValueError(f"SDESpec.form={self.form!r}; choices: {', '.join(FLOW_FORMS)}")
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


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000, spacing: str = "diffusers") -> Tensor:
    """(N + 1,) fp32 shifted sigmas from 1 down to a terminal 0 (see the module docstring for the two spacings)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choices: {', '.join(SPACINGS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")

    def shifted(s: Tensor) -> Tensor:
        return shift * s / (1 + (shift - 1) * s)

    if spacing == "linear":
        return shifted(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)).float()
    sigma_min = float(shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)))  # the table's last
    base = torch.linspace(num_train_timesteps * 1.0, sigma_min * num_train_timesteps, num_steps, dtype=torch.float64)
    sigmas = shifted(base / num_train_timesteps).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_grid(adapter: Adapter, num_steps: int, *, spacing: str = "diffusers") -> Grid:
    """The rollout grid of ``adapter``'s forward process (flow: its fixed ``shift``; VP: its scheduler's DDIM grid)."""
    process = adapter.process
    if isinstance(process, FlowProcess):
        sigmas = flow_sigmas(num_steps, process.shift, process.num_train_timesteps, spacing)
        return Grid(sigmas[:-1] * process.num_train_timesteps, sigmas, "flow")
    if isinstance(process, VPProcess):
        from diffalign.terms.stepwise import ddim_timesteps

        config, big_t = adapter.scheduler.config, process.num_train_timesteps
        spacing = config.get("timestep_spacing", "leading")
        if spacing == "leading":
            t, prev = ddim_timesteps(big_t, num_steps, int(config.get("steps_offset", 0) or 0))
        elif spacing == "trailing":  # DDIMScheduler.set_timesteps: round(arange(T, 0, -T / N)) - 1
            t = torch.round(torch.arange(big_t, 0, -big_t / num_steps, dtype=torch.float64)).long() - 1
            prev = (t - big_t // num_steps).clamp_min(0)
        else:
            raise ValueError(f"scheduler timestep_spacing={spacing!r}: online rollouts step 'leading' or 'trailing'")
        levels = process.alphas_cumprod.float().cpu()[torch.cat([t, prev[-1:]])]
        return Grid(t, levels, process.prediction_type)
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


def _col(values: Tensor, like: Tensor) -> Tensor:
    return values.float().reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def _step_index(step: int | Tensor, batch: int, device: torch.device) -> Tensor:
    index = torch.as_tensor(step, dtype=torch.long).reshape(-1).to(device)
    if index.numel() not in (1, batch):
        raise ValueError(f"step has {index.numel()} entries for a batch of {batch}")
    return index.expand(batch)


def _flow_mean_std(
    grid: Grid, spec: SDESpec, v: Tensor, x: Tensor, index: Tensor, noise_level: float
) -> tuple[Tensor, Tensor, Tensor]:
    levels = grid.levels.to(x.device)
    sigma, sigma_next = _col(levels[index], x), _col(levels[index + 1], x)
    dt = sigma_next - sigma
    if spec.form == "flow_grpo":
        safe = torch.where(sigma == 1, levels[1].to(sigma), sigma)  # the sigma = 1 edge case: 1 - sigmas[1]
        scale = noise_level * torch.sqrt(sigma / (1 - safe))
    else:
        scale = torch.full_like(sigma, noise_level)
    mean = x + v * dt + scale**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    return mean, scale * torch.sqrt(-dt), scale


def _ddim_mean_std(grid: Grid, out: Tensor, x: Tensor, index: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    levels = grid.levels.to(x.device)
    a_t, a_prev = levels[index], levels[index + 1]
    root_a, root_b = _col(a_t.sqrt(), x), _col((1 - a_t).sqrt(), x)
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
    return StepOut(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, kl_scale)


def guided_prediction(
    adapter: Adapter,
    x: Tensor,
    timesteps: Tensor,
    cond: Cond,
    uncond: Cond | None,
    guidance_scale: float,
    *,
    detach_uncond: bool = False,
) -> Tensor:
    """fp32 ``u + w (c - u)`` from one concatenated [uncond, cond] forward; cond only when ``uncond`` is None or
    ``w == 1`` (FLUX.1-dev: its guidance embedding instead, set on the adapter). ``detach_uncond``: no gradient
    through the unconditional branch (Flow-GRPO ``scripts/train_sd3.py:180-195``); it does not change values."""
    if uncond is None or guidance_scale == 1.0:
        return adapter.predict(x, timesteps, cond).float()
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    out = adapter.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).float()
    u, c = out.chunk(2)
    if detach_uncond:
        u = u.detach()
    return u + guidance_scale * (c - u)


@dataclass
class Trajectory:
    """B rollouts of N steps. ``latents`` (B, N + 1, C, h, w) fp32: the latent before each step, then the final
    sample; ``log_probs`` (B, N) fp32 (NaN on deterministic steps); ``sde`` (N,) bool: which steps were
    stochastic."""

    latents: Tensor
    log_probs: Tensor
    sde: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str) -> Tensor:
    """(B, *shape) fp32: one CPU draw per sample from its own generator (independent of batching and device)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


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
) -> Trajectory:
    """Sample B = len(generators) trajectories from ``adapter`` as it is now (the policy, LoRA on).

    Each sample's initial noise and step noises come from its own generator, so a sample does not depend on
    which others share its batch or process. ``sde_steps`` (N,) bool: stochastic steps (default all; MixGRPO:
    a window); the others are ODE steps.
    """
    n, device = grid.num_steps, adapter.device
    sde = torch.ones(n, dtype=torch.bool) if sde_steps is None else sde_steps.bool().cpu()
    x = draw_noise(generators, latent_shape, device)
    latents, log_probs = [x], []
    for j in range(n):
        t = grid.timesteps[j].to(device).expand(x.shape[0])
        out = guided_prediction(adapter, x, t, cond, uncond, guidance_scale)
        noise = draw_noise(generators, latent_shape, device) if sde[j] else None
        result = sde_step(grid, spec, out, x, j, noise=noise, deterministic=not bool(sde[j]))
        x = result.prev_sample
        latents.append(x)
        lp = result.log_prob if result.log_prob is not None else torch.full((x.shape[0],), math.nan, device=device)
        log_probs.append(lp)
    return Trajectory(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), sde)


def transition_log_prob(
    adapter: Adapter,
    grid: Grid,
    spec: SDESpec,
    x: Tensor,
    x_next: Tensor,
    step: int,
    cond: Cond,
    uncond: Cond | None,
    *,
    guidance_scale: float = 1.0,
    detach_uncond: bool = False,
) -> StepOut:
    """The update's log-density of stored transitions ``x -> x_next`` at grid step ``step`` under ``adapter`` as it
    is now (with grad when enabled; under ``adapter.reference()`` for the KL term)."""
    t = grid.timesteps[step].to(x.device).expand(x.shape[0])
    out = guided_prediction(adapter, x, t, cond, uncond, guidance_scale, detach_uncond=detach_uncond)
    return sde_step(grid, spec, out, x, step, prev_sample=x_next)


def train_steps(
    num_steps: int,
    *,
    mode: str = "fraction",
    fraction: float = 0.99,
    shuffle: bool = False,
    window: tuple[int, int] = (0, 4),
    generator: torch.Generator | None = None,
) -> Tensor:
    """(k,) long: the grid steps an iteration trains. The last step (to sigma -> 0) is never among them.

    ``fraction``: ``k = min(int(N fraction), N - 1)`` steps, the first k in order (Flow-GRPO ``train_sd3.py:345,864``:
    int(10 * 0.99) = 9), or with ``shuffle`` a random k of the N - 1 candidates in random order (DanceGRPO
    ``train_grpo_flux.py:551-572``: int(16 * 0.6) = 9 of 15). ``window=(start, size)``: steps
    ``[start, min(start + size, N - 1))`` (MixGRPO's SDE window; ``window_start`` moves it).
    """
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}; choices: {', '.join(STEP_MODES)}")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: training needs >= 2 steps (the last one is never trained)")
    last = num_steps - 1
    if mode == "window":
        start, size = window
        if not 0 <= start < last or size < 1:
            raise ValueError(f"window {window} must start in [0, {last}) and have size >= 1")
        return torch.arange(start, min(start + size, last))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    k = max(1, min(int(num_steps * fraction), last))
    if not shuffle:
        return torch.arange(k)
    return torch.randperm(last, generator=generator)[:k]


def window_start(iteration: int, *, num_steps: int, stride: int, interval: int, init: int = 0, size: int = 1) -> int:
    """MixGRPO's progressive window (``fastvideo/utils/grpo_states.py:85-148``) as a function of the iteration.

    The start moves by ``stride`` every ``interval`` iterations and rolls back to ``init`` once the window of ``size``
    steps would pass the last trainable step (N - 2), so every window is full (MixGRPO also trains the shortened
    windows at the end of the grid before rolling back). Stateless, so a resumed run finds the same window.
    """
    last = num_steps - 1 - size  # the largest start of a full window
    if stride < 1 or interval < 1 or size < 1 or not 0 <= init <= last:
        raise ValueError(f"need stride, interval, size >= 1 and 0 <= init <= {last} (N - 1 - size)")
    positions = (last - init) // stride + 1
    return init + ((iteration // interval) % positions) * stride
