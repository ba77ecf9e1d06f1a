"""The GRPO / DDPO update: hand-derived PPO-clip values and gradients, the KL in Flow-GRPO's convention, masking,
and the acceptance check that before the first update the ratio is exactly 1 for every sample at batch size > 1."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign import models
from diffalign.losses import grpo
from diffalign.models import lora, tiny
from diffalign.sampling import guidance, sde
from diffalign.terms import online
from diffalign.terms.advantages import AdvantageSpec, group_advantages
from diffalign.types import PolicyTerms


def test_ppo_clip_cases_by_hand() -> None:
    """Four rows: inside the clip; A > 0 above it (clipped, no grad); A < 0 above it (unclipped); A < 0 below it
    (clipped, no grad). clip_range 0.1 to make the cases readable."""
    c = 0.1
    log_r = torch.tensor([0.05, 0.3, 0.3, -0.3])
    old = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    policy = (old + log_r).requires_grad_(True)
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    out = grpo.loss(PolicyTerms(policy=policy, old=old, advantages=adv), grpo.Config(clip_range=c))
    r = log_r.exp()
    rows = torch.stack([-2 * r[0], -1 * torch.tensor(1 + c), r[2], torch.tensor(1 - c)])
    torch.testing.assert_close(out.loss, rows.mean())
    out.loss.backward()
    expected_grad = torch.stack([-2 * r[0], torch.tensor(0.0), r[2], torch.tensor(0.0)]) / 4  # d(-A e^x)/dx = -A r
    torch.testing.assert_close(policy.grad, expected_grad)
    assert out.metrics["clip_frac"].item() == pytest.approx(0.75)
    assert out.metrics["approx_kl"].item() == pytest.approx(float((0.5 * log_r**2).mean()), rel=1e-6)


def test_kl_uses_flow_grpo_scale_and_mask_drops_rows() -> None:
    g = torch.Generator().manual_seed(0)
    mean_p = torch.randn(3, 2, 2, 2, generator=g, requires_grad=True)
    mean_r = torch.randn(3, 2, 2, 2, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0]).view(-1, 1, 1, 1)
    old = torch.zeros(3)
    terms = PolicyTerms(
        policy=old.clone().requires_grad_(True), old=old, advantages=torch.tensor([1.0, -1.0, 3.0]),
        mask=torch.tensor([True, True, False]), policy_mean=mean_p, ref_mean=mean_r, kl_scale=scale,
    )  # fmt: skip
    out = grpo.loss(terms, grpo.Config(kl_coef=0.04))
    kl = ((mean_p - mean_r) ** 2).mean(dim=(1, 2, 3)) / (2 * scale.flatten() ** 2)  # train_sd3.py:895
    expected = ((-1.0 + 0.04 * kl[0]) + (1.0 + 0.04 * kl[1])) / 2  # ratio 1; row 2 masked out
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.metrics["kl"], kl[:2].mean().detach())
    assert out.metrics["kept_frac"].item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ref_mean"):
        grpo.loss(PolicyTerms(policy=old, old=old, advantages=old), grpo.Config(kl_coef=0.01))
    with pytest.raises(ValueError, match="clip_range"):
        grpo.Config(clip_range=0.0)
    none_kept = grpo.loss(
        PolicyTerms(policy=old, old=old, advantages=old, mask=torch.zeros(3, dtype=torch.bool)), grpo.Config()
    )
    assert none_kept.loss.item() == 0.0 and none_kept.metrics["ratio"].item() == 0.0


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_ratio_is_exactly_one_before_the_first_update(family: str) -> None:
    """Rollout of 2 prompts x G = 2 at batch size 4, advantages, then the update's forward on the same micro-batch
    at every trained step: ratio == 1 bit for bit, nothing clipped, approx_kl 0, and the loss has a gradient."""
    adapter = models.from_components(family, getattr(tiny, family)(seed=0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    with torch.no_grad():
        for i, p in enumerate(lora.trainable_parameters(adapter).values()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    spec = sde.SDESpec(noise_level=0.7 if family == "sd3" else 1.0)
    grid = sde.make_grid(adapter, 4)
    shape = (adapter.vae.config.latent_channels, 8, 8)
    prompts = ["a red circle", "a red circle", "a cat", "a cat"]
    info = [guidance.default_info(adapter, shape[1:])] * 4
    with torch.no_grad():
        cond, uncond = guidance.encode_condition(adapter, prompts, info, "empty_prompt")
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    traj = sde.rollout(adapter, grid, spec, cond, uncond, generators=gens, latent_shape=shape, guidance_scale=4.5)
    rewards = traj.final.float().mean(dim=(1, 2, 3))  # any per-sample reward
    adv = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), AdvantageSpec(std="group"))
    adapter.denoiser.train()
    cfg = grpo.Config(kl_coef=0.01)
    steps = online.train_steps(grid.num_steps)
    assert steps.tolist() == [0, 1, 2]  # int(4 * 0.99) = 3: the last step is not trained
    for j in steps.tolist():
        args = (adapter, grid, spec, traj.latents[:, j], traj.latents[:, j + 1], j, cond, uncond)
        now = online.transition_log_prob(*args, guidance_scale=4.5, detach_uncond=True)
        with torch.no_grad(), adapter.reference():
            ref = online.transition_log_prob(*args, guidance_scale=4.5)
        terms = PolicyTerms(
            policy=now.log_prob, old=traj.log_probs[:, j], advantages=adv.values, mask=adv.mask,
            policy_mean=now.mean, ref_mean=ref.mean, kl_scale=now.kl_scale,
        )  # fmt: skip
        _rows, ratio = grpo.per_sample(terms, cfg)
        assert torch.equal(ratio.detach(), torch.ones(4)), (j, ratio)
        out = grpo.loss(terms, cfg)
        assert out.metrics["ratio_min"].item() == out.metrics["ratio_max"].item() == 1.0
        assert out.metrics["clip_frac"].item() == 0.0 and out.metrics["approx_kl"].item() == 0.0
        assert out.metrics["kl"].item() > 0 and math.isfinite(out.loss.item())
        adapter.denoiser.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in lora.trainable_parameters(adapter).values() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
