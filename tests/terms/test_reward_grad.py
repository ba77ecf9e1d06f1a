"""Reward-gradient rollouts (ReFL, DRaFT-K, DRaFT-LV, AlignProp) on tiny SD1.5 / SD3 models.

Checked against independent arithmetic: the DDIM grid and step against diffusers' ``DDIMScheduler`` for every
timestep spacing, ReFL's predicted x0 against ``DDPMScheduler.step(...).pred_original_sample`` on ImageReward's
40-step grid, the flow Euler step by hand; DRaFT-K keeps a graph through exactly the last K denoiser calls;
AlignProp with a fixed truncation b has DRaFT-K's gradients for K = N - b (with and without checkpointing);
DRaFT-LV re-noises the stop-gradient final sample to the last timestep with n noise draws; the reference
regularisation is exactly 0 at LoRA init; the loss forms.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffalign import models
from diffalign.diffusion.vp import VPProcess
from diffalign.models import lora, tiny
from diffalign.terms import reward_grad
from diffalign.terms.reward_grad import GradSpec, Sampler


PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
SEEDS = [5, 6]


def _adapter(family: str):
    adapter = models.from_components(family, getattr(tiny, family)(seed=0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    return adapter


@pytest.fixture(scope="module")
def sd15():
    return _adapter("sd15")


@pytest.fixture(scope="module")
def sd3():
    return _adapter("sd3")


def spec(**kw) -> GradSpec:
    return GradSpec(**{"num_steps": 4, "resolution": 32, "refl_steps": (2, 3), "guidance_scale": 2.0, **kw})


def toy_reward(images: torch.Tensor) -> torch.Tensor:
    """A fixed differentiable image score (B,)."""
    w = torch.linspace(-1, 1, images[0].numel()).view(images.shape[1:])
    return (images * w).flatten(1).sum(1) / images[0].numel()


def lora_grads(adapter, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = lora.trainable_parameters(adapter)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), grads, strict=True)}


class PredictSpy:
    """Records, per denoiser call, whether grad was on, whether the input carried a graph, and the input."""

    def __init__(self, monkeypatch, adapter):
        self.calls: list[tuple[bool, bool, torch.Tensor]] = []
        inner = adapter.predict

        def predict(x, t, cond):
            self.calls.append((torch.is_grad_enabled(), x.requires_grad, x.detach().clone()))
            return inner(x, t, cond)

        monkeypatch.setattr(adapter, "predict", predict)


# ---- sampler arithmetic -------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_vp_sampler_matches_diffusers_ddim(spacing, eta):
    ddim = DDIMScheduler.from_config(
        tiny.sd15()["scheduler"].config,
        timestep_spacing=spacing,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    fake = types.SimpleNamespace(process=VPProcess.from_scheduler_config(ddim.config), scheduler=ddim, device="cpu")
    sampler = Sampler(fake, 10, eta)
    ddim.set_timesteps(10)
    assert sampler.timesteps.tolist() == ddim.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for i in (0, 4, 9):  # 9: the last step, to the final alpha (alphas_cumprod[0], set_alpha_to_one=False)
        want = ddim.step(out, ddim.timesteps[i], x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(sampler.step(x, out, i, noise), want, rtol=1e-5, atol=1e-5)


def test_refl_predicted_x0_matches_ddpm_scheduler(sd15):
    """ImageReward's ReFL: DDPMScheduler.set_timesteps(40); step(noise_pred, timesteps[m], x).pred_original_sample."""
    ddpm = DDPMScheduler.from_config(sd15.scheduler.config, clip_sample=False)  # as SD1.5's scheduler config
    ddpm.set_timesteps(40)
    sampler = Sampler(sd15, 40)
    assert sampler.timesteps.tolist() == ddpm.timesteps.tolist()  # leading + steps_offset 1: 976, 951, ..., 1
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    for m in (30, 35, 39):
        want = ddpm.step(out, ddpm.timesteps[m], x).pred_original_sample
        torch.testing.assert_close(sampler.pred_x0(x, out, m), want, rtol=1e-5, atol=1e-5)
        a = sd15.process.alphas_cumprod[ddpm.timesteps[m]]
        torch.testing.assert_close(sampler.pred_x0(x, out, m), (x - (1 - a).sqrt() * out) / a.sqrt())


def test_flow_sampler_is_euler_on_the_shifted_grid(sd3):
    sampler = Sampler(sd3, 4)
    u = torch.tensor([1.0, 1 - 0.999 / 3, 1 - 2 * 0.999 / 3, 0.001])  # linspace(1, 1/T, 4)
    s = 3.0 * u / (1 + 2.0 * u)  # shift 3 (the tiny SD3 scheduler)
    torch.testing.assert_close(sampler.sigmas, torch.cat([s, torch.zeros(1)]))
    torch.testing.assert_close(sampler.timesteps, s * 1000)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sampler.step(x, v, 1, None), x + (s[2] - s[1]) * v)
    torch.testing.assert_close(sampler.pred_x0(x, v, 1), x - s[1] * v)


# ---- where the graph is kept --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_draft_k_keeps_a_graph_through_the_last_k_calls_only(sd15, monkeypatch, k):
    spy = PredictSpy(monkeypatch, sd15)
    ro = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="draft", k=k), batch_seed=0)
    grad_on = [g for g, _, _ in spy.calls]
    assert grad_on == [False] * (4 - k) + [True] * k
    assert [r for _, r, _ in spy.calls] == [False] * (4 - k + 1) + [True] * (k - 1)  # the window starts from sg(x)
    assert ro.images.requires_grad and ro.grad_start == 4 - k and ro.grad_steps == k
    grads = lora_grads(sd15, toy_reward(ro.images).sum())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_draft_forward_values_do_not_depend_on_k(sd15):
    images = [
        reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="draft", k=k), batch_seed=0).images for k in (1, 4)
    ]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


def test_refl_one_grad_step_at_a_late_index(sd15, monkeypatch):
    seen = set()
    for batch_seed in range(12):
        spy = PredictSpy(monkeypatch, sd15)
        ro = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="refl"), batch_seed=batch_seed)
        assert [g for g, _, _ in spy.calls] == [False] * ro.grad_start + [True]
        seen.add(ro.grad_start)
        monkeypatch.undo()
    assert seen == {2, 3}


def _perturb_lora(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    saved = {k: p.detach().clone() for k, p in lora.trainable_parameters(adapter).items()}
    with torch.no_grad():
        for p in lora.trainable_parameters(adapter).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return saved


def _restore(adapter, saved):
    with torch.no_grad():
        for k, p in lora.trainable_parameters(adapter).items():
            p.copy_(saved[k])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_alignprop_fixed_truncation_equals_draft_k(sd15, checkpointing):
    saved = _perturb_lora(sd15)  # LoRA B != 0, so gradients reach every LoRA tensor
    try:
        draft = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="draft", k=3), batch_seed=0)
        ap_spec = spec(method="alignprop", truncation="fixed", truncation_args=(1.0,), checkpointing=checkpointing)
        ap = reward_grad.rollout(sd15, PROMPTS, SEEDS, ap_spec, batch_seed=0)
        assert ap.grad_start == 1 and ap.grad_steps == 3
        g_draft = lora_grads(sd15, toy_reward(draft.images).sum())
        g_ap = lora_grads(sd15, toy_reward(ap.images).sum())
    finally:
        _restore(sd15, saved)
    for key in g_draft:
        torch.testing.assert_close(g_ap[key], g_draft[key], rtol=1e-4, atol=1e-8)


def test_alignprop_truncation_draws_stay_in_range():
    s = spec(method="alignprop", num_steps=50, truncation="gaussian", truncation_args=(42.0, 5.0))
    draws = [reward_grad.grad_start(s, torch.Generator().manual_seed(i)) for i in range(200)]
    assert all(1 <= b < 50 for b in draws) and 38 < sum(draws) / len(draws) < 46
    uni = spec(method="alignprop", num_steps=50, truncation="uniform", truncation_args=(10.0, 20.0))
    assert {reward_grad.grad_start(uni, torch.Generator().manual_seed(i)) for i in range(100)} <= set(range(10, 20))


def test_draft_lv_renoises_the_final_sample(sd15, monkeypatch):
    finals = []
    real_decode = reward_grad.decode
    monkeypatch.setattr(
        reward_grad, "decode", lambda a, z, **kw: finals.append(z.detach().clone()) or real_decode(a, z)
    )
    reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="draft", k=1), batch_seed=3)
    x_final = finals[-1]
    spy = PredictSpy(monkeypatch, sd15)
    ro = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="draft_lv", lv_samples=2), batch_seed=3)
    assert ro.n == 2 and ro.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and ro.images.shape[0] == 4
    assert [g for g, _, _ in spy.calls] == [False] * 4 + [True]  # the whole chain without grad, then one step
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn((4, *x_final.shape[1:]), generator=gen)
    sampler = Sampler(sd15, 4)
    want = sd15.process.add_noise(x_final.repeat_interleave(2, 0), eps, sampler.t(3, 4))
    x_in = spy.calls[-1][2][4:]  # CFG batch: [uncond (4 rows), cond (4 rows)]
    torch.testing.assert_close(x_in, want, rtol=1e-5, atol=1e-6)
    assert not spy.calls[-1][1], "the re-noised input is a stop-gradient of the sample"
    assert reward_grad.group_mean(torch.tensor([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [2.0, 6.0]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_every_family_backpropagates(family, sd3):
    adapter = sd3 if family == "sd3" else _adapter(family)
    for method in ("refl", "draft", "draft_lv"):
        s = spec(method=method, guidance_scale=1.0, uncond="zeros" if family == "sdxl" else "empty_prompt")
        ro = reward_grad.rollout(adapter, PROMPTS, SEEDS, s, batch_seed=0)
        grads = lora_grads(adapter, toy_reward(ro.images).sum())
        assert ro.images.shape == (2 * ro.n, 3, 32, 32)
        assert all(bool(torch.isfinite(g).all()) for g in grads.values())
        assert any(float(g.abs().sum()) > 0 for g in grads.values()), method


# ---- reference regularisation and loss ----------------------------------------------------------------
def test_kl_is_zero_at_lora_init_and_positive_after(sd15):
    s = spec(method="draft", k=2)
    assert float(reward_grad.rollout(sd15, PROMPTS, SEEDS, s, batch_seed=0, kl=True).kl.detach()) == 0.0
    saved = _perturb_lora(sd15)
    try:
        ro = reward_grad.rollout(sd15, PROMPTS, SEEDS, s, batch_seed=0, kl=True)
        assert float(ro.kl.detach()) > 0 and ro.kl.requires_grad
        assert any(float(g.abs().sum()) > 0 for g in lora_grads(sd15, ro.kl).values())
    finally:
        _restore(sd15, saved)


def test_reward_loss_forms():
    r = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(reward_grad.reward_loss(r, "relu", 2.0, 1e-3), torch.tensor([1e-3, 0.0]))
    torch.testing.assert_close(reward_grad.reward_loss(r, "linear", 2.0, 1e-3), torch.tensor([1e-3, -1e-3]))
    with pytest.raises(ValueError, match="form"):
        reward_grad.reward_loss(r, "hinge")


def test_rollout_is_deterministic_in_its_seeds(sd15):
    a = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="refl"), batch_seed=7).images
    b = reward_grad.rollout(sd15, PROMPTS, SEEDS, spec(method="refl"), batch_seed=7).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = reward_grad.rollout(sd15, PROMPTS[:1], SEEDS[:1], spec(method="refl"), batch_seed=7).images
    torch.testing.assert_close(c, a[:1], rtol=1e-5, atol=1e-5)  # a prompt's sample does not depend on the batch


def test_spec_checks():
    with pytest.raises(ValueError, match="refl_steps"):
        GradSpec(num_steps=20, refl_steps=(30, 39))
    with pytest.raises(ValueError, match="fixed"):
        GradSpec(method="alignprop", num_steps=10, truncation="fixed", truncation_args=(10.0,))
    with pytest.raises(ValueError, match="method"):
        GradSpec(method="ddpo")
