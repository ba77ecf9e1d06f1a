"""The online-RL SDE step: hand-derived values against the authors' formulas, rollout/update parity per family.

Checked: Flow-GRPO's and DanceGRPO's flow steps and DDPO's DDIM step against their published formulas written out
by hand, the sigma = 1 edge case, the grids (diffusers' scheduler, DDIM leading), that a given ``prev_sample`` is
returned and scored, and that the update's log-probability of every rollout transition equals the rollout's bit
for bit on tiny sd15 / sdxl / sd3 / flux models at batch size 3 (so the first PPO ratio is exactly 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import models
from diffalign.models import lora, tiny
from diffalign.sampling import grids, guidance, sde
from diffalign.sampling.sde import Grid, SDESpec
from diffalign.terms import online, stepwise


LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _flow_grid(sigmas: list[float]) -> Grid:
    s = torch.tensor(sigmas)
    return Grid(s[:-1] * 1000, s, "flow")


def _reference_log_prob(x_next, mean, std):
    """The four codes' per-element Gaussian log-density, mean over all but the batch dim."""
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def test_flow_grpo_step_matches_the_published_formula() -> None:
    """sd3_sde_with_logprob.py:42-68 written out: std_dev_t = a sqrt(sigma / (1 - sigma)), mean, log-prob."""
    grid = _flow_grid([1.0, 0.8, 0.5, 0.0])
    x, v, z = _rand(2, 3, 4, 4, seed=0), _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2)
    a, step = 0.7, 1
    sigma, sigma_prev = 0.8, 0.5
    dt = sigma_prev - sigma
    s = math.sqrt(sigma / (1 - sigma)) * a
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = torch.tensor(s * math.sqrt(-dt))
    out = sde.sde_step(grid, SDESpec(noise_level=a), v, x, step, noise=z)
    torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.std.flatten(), std.expand(2))
    torch.testing.assert_close(out.kl_scale.flatten(), torch.tensor([s, s]))
    torch.testing.assert_close(out.prev_sample, mean + std * z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.log_prob, _reference_log_prob(out.prev_sample, mean, std), rtol=1e-6, atol=1e-6)


def test_flow_grpo_sigma_one_edge_uses_the_second_sigma() -> None:
    """At sigma = 1 the denominator 1 - sigma is 0; Flow-GRPO uses 1 - sigmas[1] there (finite std)."""
    grid = _flow_grid([1.0, 0.75, 0.0])
    x, v = _rand(1, 2, 2, 2, seed=3), _rand(1, 2, 2, 2, seed=4)
    out = sde.sde_step(grid, SDESpec(noise_level=0.7), v, x, 0, noise=torch.zeros_like(x))
    s = 0.7 * math.sqrt(1.0 / (1 - 0.75))
    assert out.kl_scale.item() == pytest.approx(s, rel=1e-6)
    assert out.std.item() == pytest.approx(s * math.sqrt(0.25), rel=1e-6)
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.mean).all()


def test_dance_grpo_step_matches_the_published_formula() -> None:
    """train_grpo_flux.py:141-167 written out: score form with x0_hat, std = eta sqrt(sigma - sigma_next)."""
    grid = _flow_grid([1.0, 0.6, 0.3, 0.0])
    x, v = _rand(2, 3, 4, 4, seed=5), _rand(2, 3, 4, 4, seed=6)
    x_next = _rand(2, 3, 4, 4, seed=7)
    eta, step, sigma, sigma_next = 0.3, 2, 0.3, 0.0
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = torch.tensor(eta * math.sqrt(sigma - sigma_next))
    out = sde.sde_step(grid, SDESpec(form="dance_grpo", noise_level=eta), v, x, step, prev_sample=x_next)
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.prev_sample, x_next)
    torch.testing.assert_close(out.log_prob, _reference_log_prob(x_next, mean, std), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_ddpo(prediction_type: str) -> None:
    """ddim_with_logprob.py:100-190 written out with eta = 1 (DDPO), per-sample steps."""
    a = torch.tensor([0.1, 0.4, 0.9, 0.99])
    grid = Grid(torch.tensor([700, 400, 100]), a, prediction_type)
    x, out, x_next = _rand(2, 4, 3, 3, seed=8), _rand(2, 4, 3, 3, seed=9), _rand(2, 4, 3, 3, seed=10)
    step = torch.tensor([0, 2])
    a_t, a_p = a[step].view(-1, 1, 1, 1), a[step + 1].view(-1, 1, 1, 1)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
    else:
        x0, eps = a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
    std = ((1 - a_p) / b_t * (1 - a_t / a_p)) ** 0.5
    mean = a_p**0.5 * x0 + (1 - a_p - std**2) ** 0.5 * eps
    got = sde.sde_step(grid, SDESpec(noise_level=1.0), out, x, step, prev_sample=x_next)
    torch.testing.assert_close(got.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.std, std)
    torch.testing.assert_close(got.log_prob, _reference_log_prob(x_next, mean, std), rtol=1e-5, atol=1e-5)


def test_deterministic_step_is_euler_without_log_prob() -> None:
    grid = _flow_grid([1.0, 0.5, 0.0])
    x, v = _rand(1, 2, 2, 2, seed=11), _rand(1, 2, 2, 2, seed=12)
    out = sde.sde_step(grid, SDESpec(), v, x, 1, deterministic=True)
    assert out.log_prob is None
    torch.testing.assert_close(out.prev_sample, x - 0.5 * v)
    with pytest.raises(ValueError, match="noise"):
        sde.sde_step(grid, SDESpec(), v, x, 1)


def test_grids_follow_the_schedulers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, n in ((3.0, 10), (1.0, 4)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(n)
        assert torch.equal(grids.flow_sigmas(n, shift), scheduler.sigmas)
    linear = grids.flow_sigmas(4, 1.0, spacing="linear")
    torch.testing.assert_close(linear, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    adapter = models.from_components("sd15", tiny.sd15(seed=0))
    grid = sde.make_grid(adapter, 4)
    t, prev = stepwise.scheduler_grid(adapter, 4)
    assert torch.equal(grid.timesteps, t) and prev[-1] == 0
    assert torch.equal(grid.levels, adapter.process.alphas_cumprod[torch.cat([t, prev[-1:]])])


def test_vp_grid_follows_trailing_spacing() -> None:
    from diffusers import DDIMScheduler

    adapter = models.from_components("sd15", tiny.sd15(seed=0))
    config = dict(adapter.scheduler.config) | {"timestep_spacing": "trailing"}
    adapter.scheduler = DDIMScheduler.from_config(config)
    for n in (4, 20):
        adapter.scheduler.set_timesteps(n)
        grid = sde.make_grid(adapter, n)
        assert torch.equal(grid.timesteps, adapter.scheduler.timesteps)
        assert grid.levels[-1] == adapter.process.alphas_cumprod[0]


def test_train_steps_never_include_the_last_step() -> None:
    assert online.train_steps(10).tolist() == list(range(9))  # Flow-GRPO: int(10 * 0.99) = 9
    picked = online.train_steps(16, fraction=0.6, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(picked) == 9 and len(set(picked.tolist())) == 9 and int(picked.max()) < 15  # DanceGRPO
    assert online.train_steps(25, mode="window", window=(22, 4)).tolist() == [22, 23]
    assert online.train_steps(2, fraction=1.0).tolist() == [0]
    starts = [online.window_start(i, num_steps=8, stride=2, interval=3) for i in range(0, 30, 3)]
    assert starts == [0, 2, 4, 6, 0, 2, 4, 6, 0, 2]
    starts = [online.window_start(i, num_steps=8, stride=1, interval=1, size=4) for i in range(5)]
    assert starts == [0, 1, 2, 3, 0]  # windows [s, s + 4) stay inside the 7 trainable steps


def _mixgrpo_windows(iterations: int, *, max_t: int, size: int, stride: int, interval: int, init: int) -> list:
    """MixGRPO's progressive walk with roll-back, transcribed (``fastvideo/utils/grpo_states.py:85-97, 129-148``):
    the window of each iteration, ``range(cur, min(cur + size, max_t))``."""
    cur, in_group, windows = init, 0, []
    for _ in range(iterations):
        windows.append(list(range(cur, min(cur + size, max_t))))
        in_group += 1
        if in_group >= interval:
            in_group, cur = 0, cur + stride
        if cur > max_t:
            cur, in_group = init, 0
    return windows


@pytest.mark.parametrize("stride,interval,init", [(1, 1, 0), (1, 3, 2), (2, 2, 1)])
def test_partial_windows_walk_as_mixgrpo(stride, interval, init):
    """online.window_partial: the windows are MixGRPO's, their empty one (cur = max) left out. Their max_t is the
    exclusive end of the trainable steps, N - 1 here."""
    n, size = 9, 3
    theirs = [
        w for w in _mixgrpo_windows(200, max_t=n - 1, size=size, stride=stride, interval=interval, init=init) if w
    ]
    ours = []
    for i in range(10_000):
        if len(ours) == len(theirs):
            break
        start = online.window_start(
            i, num_steps=n, stride=stride, interval=interval, init=init, size=size, partial=True
        )
        ours.append(online.train_steps(n, mode="window", window=(start, size)).tolist())
    # MixGRPO spends `interval` iterations on each window; the walk without the empty window is theirs
    assert ours == theirs
    assert any(len(w) < size for w in ours) and all(w for w in ours)


# ---- rollout / update parity on the tiny families ----------------------------------------------------------
PROMPTS = ["a red circle", "a blue square", "a cat"]


def _policy(family: str):
    adapter = models.from_components(tiny.adapter_family(family), getattr(tiny, family)(seed=0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    with torch.no_grad():  # move off the init (lora_B = 0) so the policy differs from the reference
        for i, p in enumerate(lora.trainable_parameters(adapter).values()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return adapter


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "qwenimage", "zimage", "flux2"])
def test_update_log_prob_equals_rollout_log_prob(family: str) -> None:
    adapter = _policy(family)
    is_flow = family not in ("sd15", "sdxl")
    spec = SDESpec(noise_level=0.7 if is_flow else 1.0)
    grid = sde.make_grid(adapter, 3)
    shape = (adapter.latent_channels, 8, 8)
    info = [guidance.default_info(adapter, shape[1:])] * len(PROMPTS)
    with torch.no_grad():
        cond, uncond = guidance.encode_condition(adapter, PROMPTS, info, "empty_prompt")
    scale = 1.0 if family in ("flux", "flux2") else 4.5  # FLUX.1-dev / FLUX.2: guidance embedding instead of CFG
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    traj = sde.rollout(adapter, grid, spec, cond, uncond, generators=gens, latent_shape=shape, guidance_scale=scale)
    assert traj.latents.shape == (3, 4, *shape) and traj.log_probs.shape == (3, 3)
    assert torch.isfinite(traj.log_probs).all()
    adapter.denoiser.train()
    for j in range(grid.num_steps):
        out = online.transition_log_prob(
            adapter, grid, spec, traj.latents[:, j], traj.latents[:, j + 1], j, cond, uncond,
            guidance_scale=scale, detach_uncond=True,
        )  # fmt: skip
        assert out.log_prob.requires_grad
        assert torch.equal(out.log_prob.detach(), traj.log_probs[:, j]), (family, j)
        assert torch.equal(out.prev_sample, traj.latents[:, j + 1])
        ratio = torch.exp(out.log_prob.detach() - traj.log_probs[:, j])
        assert torch.equal(ratio, torch.ones(3))
    # the same seeds give the same trajectory alone and in a batch (no dependence on batch composition)
    alone = sde.rollout(
        adapter, grid, spec, {k: v[1:2] for k, v in cond.items()}, {k: v[1:2] for k, v in uncond.items()},
        generators=[torch.Generator().manual_seed(2)], latent_shape=shape, guidance_scale=scale,
    )  # fmt: skip
    torch.testing.assert_close(alone.latents[0], traj.latents[1], rtol=1e-4, atol=1e-5)
