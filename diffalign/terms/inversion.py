"""Inversion noise (InPO, SmPO): replace the random noise of each image by the policy's DDIM inversion of it.

For an image x0 with training timestep t (shared by the images of a group), the current policy (LoRA on, no grad,
plain conditional prediction) runs the DDIM inverse steps of an ``num_steps`` grid up to the largest grid step
below t, giving x_inv; the noise is then solved at t itself::

    eps = (x_inv - sqrt(a_t) x0) / sqrt(1 - a_t)         so that add_noise(x0, eps, t) == x_inv

and the objective sees this eps as target and x_inv as the noisy input, exactly as if it had been drawn. Winner
and loser are inverted separately, so they get different eps at the same t.

Followed: JaydenLyh/InPO@a9cfc4d ``train.py``: L469-472 ``DDIMScheduler`` / ``DDIMInverseScheduler`` from the
model's scheduler config; L866 and L875 ``set_timesteps(10)`` (SD1.5 and SDXL); L995 ``times = grid[grid < t]``;
L996-1010 one inverse step per grid time with the model evaluated at the grid time, then L1008-1010
``x += 0.1 * randn * sqrt(_get_variance(t_grid + T/S, t_grid))`` (``inversion_eta = 0.1``, L997); L1011-1013 the
noise solved with ``alphas_cumprod[t]``. JaydenLyh/SmPO@8922d54 ``train.py``: L872 ``set_timesteps(10)`` (SDXL)
and L881 ``set_timesteps(5)`` (SD1.5); L998-1020 no eta noise, and each inverse step uses the average of the
predictions at x and at the once-stepped x (a one-iteration ReNoise, ``renoise=True``).

The inverse step is diffusers' ``DDIMInverseScheduler.step`` (v0.42 source read): from level
``s = t_grid - T // S`` (``alphas_cumprod[0]`` below 0, i.e. ``set_alpha_to_one: false`` as in the SD1.5 / SDXL
scheduler configs) to level ``t_grid``: ``x0_hat = (x - sqrt(1-a_s) eps)/sqrt(a_s)``,
``x' = sqrt(a_t) x0_hat + sqrt(1-a_t) eps``; v-prediction converts with level-s coefficients as diffusers does.
The grid is diffusers' "leading" spacing, ``arange(S) * (T // S) + steps_offset`` (``steps_offset: 1`` in both
configs). Deviations: the authors take ``times`` and ``a_t`` from the first sample's t for the whole micro-batch
(they run a per-device batch of 1); here every group uses its own t. The authors' eta variance indexes
``alphas_cumprod[t_grid + T/S]``, which runs past the table at the last grid step (t > 901 on a 10-step grid);
the index is clamped to T - 1 here (inferred; the authors' code would fail there). Eta noise comes from a
generator per image seeded from the group's seed, so runs are reproducible and split-invariant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.sampling.grids import ddim_timesteps


@dataclass(frozen=True, kw_only=True)
class InversionSpec:
    """``num_steps``: inverse DDIM grid (InPO 10; SmPO 5 SD1.5 / 10 SDXL). ``eta``: noise added after each step
    (InPO 0.1, SmPO 0). ``renoise``: average two predictions per step (SmPO). ``steps_offset``: grid offset."""

    num_steps: int = 10
    eta: float = 0.1
    renoise: bool = False
    steps_offset: int = 1

    def __post_init__(self) -> None:
        if self.num_steps <= 0 or self.eta < 0 or self.steps_offset < 0:
            raise ValueError(f"inversion: num_steps must be > 0, eta and steps_offset >= 0; got {self}")


def inversion_grid(spec: InversionSpec, num_train_timesteps: int) -> Tensor:
    """Diffusers' "leading" grid (``diffalign.sampling.grids``), ascending: ``arange(S) * (T // S) + steps_offset``."""
    if spec.num_steps > num_train_timesteps:
        raise ValueError(f"inversion: num_steps={spec.num_steps} > num_train_timesteps={num_train_timesteps}")
    return ddim_timesteps(num_train_timesteps, spec.num_steps, spec.steps_offset, "leading")[0].flip(0)


def _alpha(alphas: Tensor, index: Tensor) -> Tensor:
    """alphas_cumprod[index] with alphas_cumprod[0] for negative indices, clamped at the top."""
    clamped = index.clamp(0, alphas.numel() - 1)
    return torch.where(index >= 0, alphas[clamped], alphas[0]).float()


def inverse_step(x: Tensor, model_out: Tensor, t_to: Tensor, alphas: Tensor, ratio: int, prediction_type: str):
    """One DDIM inverse step from level ``t_to - ratio`` to ``t_to`` (per row). Returns (x', eps_hat)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a_s = _alpha(alphas, t_to - ratio).view(shape)
    a_t = _alpha(alphas, t_to).view(shape)
    x, out = x.float(), model_out.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
    else:  # v-prediction, converted with level-s coefficients (DDIMInverseScheduler.step)
        x0 = a_s.sqrt() * x - (1 - a_s).sqrt() * out
        eps = a_s.sqrt() * out + (1 - a_s).sqrt() * x
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, eps


def eta_std(t_grid: Tensor, alphas: Tensor, ratio: int) -> Tensor:
    """sqrt of DDIMScheduler._get_variance(t_grid + ratio, t_grid): the authors' eta noise scale."""
    a_hi = _alpha(alphas, t_grid + ratio)
    a_lo = _alpha(alphas, t_grid)
    return ((1 - a_lo) / (1 - a_hi) * (1 - a_hi / a_lo)).clamp(min=0).sqrt()


@torch.no_grad()
def inversion_noise(
    predict: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor],
    process: object,
    x0: Tensor,
    timesteps: Tensor,
    cond: dict[str, Tensor],
    image_seeds: Sequence[int],
    spec: InversionSpec,
) -> Tensor:
    """The noise (N, C, h, w) fp32 that makes ``add_noise(x0, eps, t)`` the policy's DDIM inversion of ``x0``.

    ``predict(x, t, cond)``: the policy denoiser (e.g. ``adapter.predict``); ``cond``: per-row conditioning (N, ...);
    ``timesteps`` (N,) training timesteps; ``image_seeds``: one seed per row for the eta noise.
    """
    if not hasattr(process, "alphas_cumprod"):
        raise ValueError(
            "inversion noise needs a variance-preserving (DDPM-family) model; flow models are not supported"
        )
    alphas = process.alphas_cumprod.to(x0.device)
    num_t = alphas.numel()
    ratio = num_t // spec.num_steps
    t = torch.as_tensor(timesteps, device=x0.device).long()
    gens = [torch.Generator().manual_seed(int(s)) for s in image_seeds] if spec.eta > 0 else []
    x = x0.float().clone()
    for t_grid in inversion_grid(spec, num_t).to(x0.device):
        rows = (t_grid < t).nonzero().flatten()
        if rows.numel() == 0:
            break  # the grid ascends: no row needs a later step either
        sub, sub_cond = x[rows], {k: v[rows] for k, v in cond.items()}
        t_rows = t_grid.expand(rows.numel())
        out = predict(sub, t_rows, sub_cond).float()
        new, _ = inverse_step(sub, out, t_rows, alphas, ratio, process.prediction_type)
        if spec.renoise:  # SmPO: step again with the average of the predictions at x and at the stepped x
            out = (out + predict(new, t_rows, sub_cond).float()) / 2
            new, _ = inverse_step(sub, out, t_rows, alphas, ratio, process.prediction_type)
        if spec.eta > 0:
            draw = torch.stack([torch.randn(sub.shape[1:], generator=gens[int(i)]) for i in rows.tolist()])
            new = new + spec.eta * draw.to(new.device) * eta_std(t_grid, alphas, ratio)
        x[rows] = new
    a_t = alphas[t].float().view((-1,) + (1,) * (x0.dim() - 1))
    return (x - a_t.sqrt() * x0.float()) / (1 - a_t).sqrt()
