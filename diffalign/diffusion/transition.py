"""Reverse transition kernels of the samplers: mean, std and Gaussian log-density of one stochastic step.

Pure tensor math, shared by the sampler loops (``diffalign.sampling``), the step-level terms (SPO / LPO,
``diffalign.terms.stepwise``) and the online-RL terms (``diffalign.terms.online``). Everything is fp32.

**DDIM** (Song et al. 2021, arXiv 2010.02502, Eq. 12 and 16), with ``a_t = alphas_cumprod[t]`` and
``a_p = alphas_cumprod[prev_t]``::

    std_t^2 = eta^2 (1 - a_p) / (1 - a_t) (1 - a_t / a_p)
    mu      = sqrt(a_p) x0_hat + sqrt(1 - a_p - std_t^2) eps_hat

exactly as ``ddim_step_with_logprob`` in the SPO / LPO code and DDPO's
``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:93-190``; no clipping of ``x0_hat`` (the SD schedulers have
``clip_sample=False``). eta = 1 is DDPM's ancestral step on a strided grid.

**Flow SDE** (SD3, SD3.5, FLUX; sigma = flow sigma, 1 = noise; ``dt = sigma_next - sigma < 0``; ``v`` the
guided velocity)::

    mean = x + v dt + s^2 / (2 sigma) (x + (1 - sigma) v) dt          std = s sqrt(-dt)

- ``form="flow_grpo"``: ``s = a sqrt(sigma / (1 - sigma))`` with ``a = noise_level`` (0.7); at sigma = 1 the
  denominator uses the grid's second sigma (Flow-GRPO ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:42-50``:
  ``sigma_max = sigmas[1]``).
- ``form="dance_grpo"``: ``s = eta`` constant (0.3). DanceGRPO writes the drift through the score
  ``-(x - (1 - sigma) x0_hat) / sigma^2`` with ``x0_hat = x - sigma v`` and ``std = eta sqrt(sigma - sigma_next)``
  (``fastvideo/train_grpo_flux.py:131-170``); expanding ``x0_hat`` gives the line above with ``s = eta``.

- ``form="cps"``: Coefficients-Preserving Sampling (Wang & Yu 2025, arXiv 2509.05952; Flow-GRPO
  ``sde_type="cps"``, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:70-86`` at yifan123/flow_grpo@9745241,
  noise level 0.8 in ``config/grpo.py`` ``geneval_sd3_fast_nocfg``). With ``x0_hat = x - sigma v``,
  ``x1_hat = x + (1 - sigma) v`` and ``std = sigma_next sin(a pi / 2)``::

      mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat          x' = mean + std noise

  so a sample whose estimates are exact keeps the forward marginal ``(1 - sigma') x0 + sigma' eps``: the clean
  coefficient ``1 - sigma'`` and the total noise variance ``(sigma'^2 - std^2) + std^2 = sigma'^2`` (Flow-GRPO's
  SDE step inflates the noise beyond ``sigma'``). ``a = 0`` is the Euler step; ``a`` must be in (0, 1]. The KL
  scale is ``std`` itself (the authors' ``std_dev_t``). Its log-probability is the authors' *unnormalised*
  ``-(x' - mean)^2`` averaged over C,h,w (``:85-86``, "remove all constants"): the 1 / (2 std^2) factor is dropped,
  so a CPS ratio is ``exp(2 std^2 x`` the Gaussian log-ratio) and wants the authors' tiny clip range (1e-5).
- ``arithmetic="flow_grpo"`` (``flow_grpo`` form only): the mean in Flow-GRPO's own order,
  ``x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt`` (``sd3_sde_with_logprob.py:50``):
  ``x`` enters through ONE product that is bit-identical for the policy and the reference, so in the KL's
  ``mean_policy - mean_ref`` it cancels exactly and only the velocity terms' rounding remains (the default order
  adds ``x`` twice, each a rounding at ``x``'s magnitude). Same value in exact arithmetic; not bitwise the default.

**Log-density**: the per-element Gaussian log-density ``-(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)``,
*averaged* (not summed) over C,h,w as all the reference codes do (``sd3_sde_with_logprob.py:61-68``,
``train_grpo_flux.py:159-167``, ``ddim_with_logprob.py:183-190``, SPO / LPO): SPO's beta 10, LPO's 500 and the
PPO clip range 1e-4 all depend on this normalisation.

Shapes: latents (B, C, h, w); ``a_t``, ``a_prev``, ``sigma``, ``sigma_next`` and every per-sample result (B,);
stds (B, 1, 1, 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
FLOW_FORMS = ("flow_grpo", "dance_grpo", "cps")
ARITHMETIC = ("diffalign", "flow_grpo")


def column(x: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) fp32 on ``like``'s device."""
    return x.float().reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def ddim_std(a_t: Tensor, a_prev: Tensor, eta: float = 1.0) -> Tensor:
    """(B,) fp32 DDIM step std ``eta sqrt((1 - a_p)/(1 - a_t) (1 - a_t/a_p))`` (DDIM Eq. 16)."""
    a_t, a_prev = a_t.float(), a_prev.float()
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    return eta * variance.sqrt()


def ddim_mean_std(
    x0_hat: Tensor, eps_hat: Tensor, a_t: Tensor, a_prev: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mean (B, C, h, w) and std (B, 1, 1, 1) of the DDIM step ``x_t -> x_prev`` (DDIM Eq. 12), fp32.

    ``x0_hat`` / ``eps_hat`` are the (guided) model's clean-sample and noise estimates at ``x_t``.
    """
    std = column(ddim_std(a_t, a_prev, eta), x0_hat)
    a_p = column(a_prev, x0_hat)
    direction = (1.0 - a_p - std**2).clamp_min(0.0).sqrt() * eps_hat.float()
    return a_p.sqrt() * x0_hat.float() + direction, std


def flow_sde_mean_std(
    x: Tensor,
    v: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
    *,
    form: str,
    sigma_max: Tensor,
    arithmetic: str = "diffalign",
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (B, C, h, w), std and scale ``s`` (both (B, 1, 1, 1)) of the flow SDE step ``sigma -> sigma_next``.

    ``sigma_max``: the grid's second sigma, which stands in for sigma = 1 in Flow-GRPO's ``1 - sigma``.
    ``s`` is the std the KL term divides by (Flow-GRPO's, without ``sqrt(-dt)``; CPS: the std). ``arithmetic``:
    the order of the ``flow_grpo`` mean (module docstring). fp32.
    """
    if form not in FLOW_FORMS:
        raise ValueError(f"unknown flow SDE form {form!r}; choices: {', '.join(FLOW_FORMS)}")
    if arithmetic not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic {arithmetic!r}; choices: {', '.join(ARITHMETIC)}")
    x, v = x.float(), v.float()
    sigma, sigma_next = column(sigma, x), column(sigma_next, x)
    if form == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = x - sigma * v, x + v * (1 - sigma)
        mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0.0))
        return mean, std, std
    dt = sigma_next - sigma
    if form == "flow_grpo":
        safe = torch.where(sigma == 1, sigma_max.to(sigma), sigma)  # the sigma = 1 edge case: 1 - sigmas[1]
        scale = noise_level * torch.sqrt(sigma / (1 - safe))
    else:
        scale = torch.full_like(sigma, noise_level)
    if arithmetic == "flow_grpo" and form == "flow_grpo":
        mean = x * (1 + scale**2 / (2 * sigma) * dt) + v * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
    else:
        mean = x + v * dt + scale**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    return mean, scale * torch.sqrt(-dt), scale


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) per-element Gaussian log-density of ``x`` under ``N(mean, std^2)``, averaged over all non-batch dims.

    ``x`` is detached: the density is a function of the policy's mean and std, the sample is data."""
    x, mean, std = x.detach().float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.flatten(1).mean(dim=1)


def cps_log_prob(x: Tensor, mean: Tensor) -> Tensor:
    """(B,) CPS's unnormalised log-density ``-(x - mean)^2`` averaged over all non-batch dims (Flow-GRPO
    ``sd3_sde_with_logprob.py:85-86``: the constants and the ``1 / (2 std^2)`` factor dropped); ``x`` detached."""
    return -((x.detach().float() - mean.float()) ** 2).flatten(1).mean(dim=1)


def ddim_log_prob(
    x_prev: Tensor, x0_hat: Tensor, eps_hat: Tensor, a_t: Tensor, a_prev: Tensor, eta: float = 1.0
) -> Tensor:
    """(B,) mean-over-dims log-density of the child ``x_prev`` under the DDIM step from the model's estimates."""
    if eta <= 0:
        raise ValueError(f"the transition density needs a stochastic step (eta > 0), got eta={eta}")
    mean, std = ddim_mean_std(x0_hat, eps_hat, a_t, a_prev, eta)
    return gaussian_log_prob(x_prev, mean, std)
