"""Inversion noise (InPO / SmPO) against the authors' loop written with diffusers' DDIM (inverse) schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffalign.diffusion.vp import VPProcess
from diffalign.terms.inversion import InversionSpec, eta_std, inversion_grid, inversion_noise


SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}


def model(x, t, cond):
    """A deterministic stand-in for the denoiser that depends on x, t and the conditioning."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.5 * x + torch.sin(t / 100.0) * cond["c"]


def authors_loop(x0, t, c, num_steps, eta=0.0, renoise=False, gen=None):
    """JaydenLyh/InPO train.py L994-1013 (eta) and SmPO train.py L998-1023 (renoise), batch of one."""
    inv, sch = DDIMInverseScheduler(**SD15), DDIMScheduler(**SD15)
    inv.set_timesteps(num_steps)
    x = x0.clone()
    for tg in inv.timesteps[inv.timesteps < t]:
        out = model(x, tg, {"c": c})
        if renoise:
            x1 = inv.step(out, tg, x).prev_sample
            out = (out + model(x1, tg, {"c": c})) / 2
        x = inv.step(out, tg, x).prev_sample
        if eta:
            prev_t = tg + 1000 // num_steps
            x = x + eta * torch.randn(x.shape[1:], generator=gen) * sch._get_variance(prev_t, tg) ** 0.5
    a = sch.alphas_cumprod[t]
    return (x - a**0.5 * x0) / (1 - a) ** 0.5


@pytest.fixture(scope="module")
def process():
    return VPProcess.from_scheduler_config(SD15)


def data(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, 6, generator=g), torch.randn(n, 4, 1, 1, generator=g)


@pytest.mark.parametrize(
    ("t", "num_steps", "renoise"), [(350, 10, False), (999, 10, False), (640, 5, True), (1, 10, False)]
)
def test_matches_the_authors_loop_without_eta(process, t, num_steps, renoise):
    x0, c = data()
    expected = authors_loop(x0, t, c, num_steps, renoise=renoise)
    spec = InversionSpec(num_steps=num_steps, eta=0.0, renoise=renoise)
    eps = inversion_noise(model, process, x0, torch.tensor([t]), {"c": c}, [0], spec)
    torch.testing.assert_close(eps, expected.float(), rtol=1e-4, atol=1e-5)
    # the objective then sees add_noise(x0, eps, t) == the inverted latent
    a = process.alphas_cumprod[t]
    torch.testing.assert_close(process.add_noise(x0, eps, torch.tensor([t])), a.sqrt() * x0 + (1 - a).sqrt() * eps)


def test_matches_the_authors_loop_with_eta(process):
    x0, c = data()
    expected = authors_loop(x0, 730, c, 10, eta=0.1, gen=torch.Generator().manual_seed(5))
    eps = inversion_noise(model, process, x0, torch.tensor([730]), {"c": c}, [5], InversionSpec(num_steps=10, eta=0.1))
    torch.testing.assert_close(eps, expected.float(), rtol=1e-4, atol=1e-5)


def test_eta_scale_is_ddim_variance_and_clamped_past_the_table(process):
    sch = DDIMScheduler(**SD15)
    for tg in (1, 401, 801):
        assert eta_std(torch.tensor(tg), process.alphas_cumprod, 100).item() == pytest.approx(
            float(sch._get_variance(tg + 100, tg)) ** 0.5, rel=1e-5
        )
    assert torch.isfinite(eta_std(torch.tensor(901), process.alphas_cumprod, 100))


def test_each_row_uses_its_own_timestep_and_the_grid_below_it(process):
    x0, c = data(3, seed=1)
    t = torch.tensor([120, 999, 40])
    calls = []

    def counting(x, tt, cond):
        calls.append(tt.tolist())
        return model(x, tt, cond)

    spec = InversionSpec(num_steps=10, eta=0.0)
    eps = inversion_noise(counting, process, x0, t, {"c": c}, [0, 1, 2], spec)
    assert inversion_grid(spec, 1000).tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert [len(rows) for rows in calls] == [3, 2] + [1] * 8  # grid steps below 120, 999 and 40
    for i in range(3):
        alone = inversion_noise(model, process, x0[i : i + 1], t[i : i + 1], {"c": c[i : i + 1]}, [i], spec)
        torch.testing.assert_close(eps[i : i + 1], alone)


def test_flow_models_are_refused():
    from diffalign.diffusion.flow import FlowProcess

    with pytest.raises(ValueError, match="variance-preserving"):
        inversion_noise(model, FlowProcess(), torch.zeros(1, 4, 2, 2), torch.tensor([10]), {}, [0], InversionSpec())
