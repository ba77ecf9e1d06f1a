"""The reverse transition kernels: DDIM mean / std / log-density against fp64 formulas and diffusers' DDIM step,
the flow SDE step (Flow-GRPO, DanceGRPO) against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from diffalign.diffusion import transition
from diffalign.diffusion.vp import VPProcess


SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def _alphas() -> torch.Tensor:
    return VPProcess.from_scheduler_config(SD_CONFIG).alphas_cumprod


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_transition_log_prob_matches_torch_normal() -> None:
    a = _alphas()
    t, prev = torch.tensor([951, 501, 51, 1]), torch.tensor([901, 451, 1, 0])
    x0, eps, z = _rand(4, 4, 8, 8, seed=0), _rand(4, 4, 8, 8, seed=1), _rand(4, 4, 8, 8, seed=2)
    means, stds = [], []
    for i in range(4):  # in fp64, straight from DDIM Eq. 12 / 16
        at, ap = a[t[i]].double(), a[prev[i]].double()
        stds.append(((1 - ap) / (1 - at) * (1 - at / ap)).sqrt())
        means.append(ap.sqrt() * x0[i].double() + (1 - ap - stds[-1] ** 2).sqrt() * eps[i].double())
    for x_prev in (
        torch.stack([m + s * z[i] for i, (m, s) in enumerate(zip(means, stds, strict=True))]).float(),
        z + 0.5,
    ):
        got = transition.ddim_log_prob(x_prev, x0, eps, a[t], a[prev], eta=1.0)
        for i in range(4):
            want = Normal(means[i], stds[i]).log_prob(x_prev[i].double()).mean()
            assert got[i].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5), i
    assert got.dtype == torch.float32 and got.shape == (4,)


def test_mean_and_std_reproduce_diffusers_ddim_step_with_eta_1() -> None:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(20)
    assert sched.timesteps.tolist()[:2] == [951, 901] and sched.timesteps.tolist()[-1] == 1
    a = sched.alphas_cumprod
    x_t, model_out, z = _rand(1, 4, 8, 8, seed=3), _rand(1, 4, 8, 8, seed=4), _rand(1, 4, 8, 8, seed=5)
    process = VPProcess.from_scheduler_config(SD_CONFIG)
    for t in (951, 501, 51):
        want = sched.step(model_out, t, x_t, eta=1.0, variance_noise=z).prev_sample
        tt = torch.tensor([t])
        x0, eps = process.pred_x0(x_t, model_out, tt), process.pred_eps(x_t, model_out, tt)
        mean, std = transition.ddim_mean_std(x0, eps, a[tt], a[tt - 50], eta=1.0)
        torch.testing.assert_close(mean + std * z, want, rtol=1e-5, atol=1e-5)


def test_std_is_zero_for_eta_zero_and_log_prob_refuses_it() -> None:
    a = _alphas()
    assert transition.ddim_std(a[[501]], a[[451]], eta=0.0).item() == 0.0
    with pytest.raises(ValueError, match="eta > 0"):
        transition.ddim_log_prob(*(_rand(1, 4, 2, 2, seed=i) for i in range(3)), a[[501]], a[[451]], eta=0.0)


def test_flow_sde_step_by_hand() -> None:
    """x = 1, v = 2 everywhere; sigma 0.5 -> 0.25 (dt = -0.25), and the sigma = 1 edge with sigma_max = 0.9.

    flow_grpo, a = 0.7: s = 0.7 sqrt(0.5 / 0.5) = 0.7; mean = 1 - 0.5 + 0.49 / 1 * (1 + 0.5 * 2) * -0.25 = 0.255;
    std = 0.7 sqrt(0.25) = 0.35. dance_grpo, eta = 0.3: mean = 0.5 + 0.09 * 2 * -0.25 = 0.455; std = 0.15.
    sigma = 1 -> 0.9: s = 0.7 sqrt(1 / (1 - 0.9)) = 0.7 sqrt(10); mean = 1 - 0.2 + 4.9 / 2 * 1 * -0.1 = 0.555;
    std = 0.7 sqrt(10) sqrt(0.1) = 0.7.
    """
    x, v = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0)
    s, s_next, s_max = torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor(0.9)
    for form, level, mean, std, scale in (("flow_grpo", 0.7, 0.255, 0.35, 0.7), ("dance_grpo", 0.3, 0.455, 0.15, 0.3)):
        m, sd, sc = transition.flow_sde_mean_std(x, v, s, s_next, level, form=form, sigma_max=s_max)
        torch.testing.assert_close(m, torch.full_like(x, mean))
        assert sd.shape == (1, 1, 1, 1) and sd.item() == pytest.approx(std) and sc.item() == pytest.approx(scale)
    m, sd, sc = transition.flow_sde_mean_std(
        x, v, torch.tensor([1.0]), s_max[None], 0.7, form="flow_grpo", sigma_max=s_max
    )
    torch.testing.assert_close(m, torch.full_like(x, 0.555))
    assert sd.item() == pytest.approx(0.7) and sc.item() == pytest.approx(0.7 * math.sqrt(10))
    with pytest.raises(ValueError, match="form"):
        transition.flow_sde_mean_std(x, v, s, s_next, 0.7, form="cps?", sigma_max=s_max)


def test_dance_grpo_score_form_is_the_same_step() -> None:
    """DanceGRPO's drift through the score (train_grpo_flux.py:131-170) equals the expanded mean."""
    x, v = _rand(2, 4, 4, 4, seed=7), _rand(2, 4, 4, 4, seed=8)
    sigma, sigma_next, eta = torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.1]), 0.3
    mean, std, _ = transition.flow_sde_mean_std(x, v, sigma, sigma_next, eta, form="dance_grpo", sigma_max=sigma[0])
    sg, sn = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    x0 = x - sg * v
    score = -(x - (1 - sg) * x0) / sg**2
    want = x + (sn - sg) * (v - 0.5 * eta**2 * score)  # Euler on the SDE drift v - eta^2/2 * score
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, eta * (sg - sn).sqrt())
