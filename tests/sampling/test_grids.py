"""Every timestep grid against the diffusers scheduler it follows, or against values written out by hand."""

from __future__ import annotations

import pytest
import torch

from diffalign import models
from diffalign.models import tiny
from diffalign.sampling import grids


def test_ddim_leading_grid_with_offset_by_hand() -> None:
    t, prev = grids.ddim_timesteps(1000, 20, steps_offset=1)
    assert t.tolist() == list(range(951, 0, -50)) and prev.tolist() == [*range(901, 0, -50), -49]
    t4, prev4 = grids.ddim_timesteps(1000, 4, steps_offset=1)
    assert t4.tolist() == [751, 501, 251, 1] and prev4.tolist() == [501, 251, 1, -249]
    with pytest.raises(ValueError, match="num_steps"):
        grids.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps_offset"):
        grids.ddim_timesteps(1000, 2, steps_offset=500)  # 500 + 500 = 1000
    with pytest.raises(ValueError, match="timestep_spacing"):
        grids.ddim_timesteps(1000, 4, spacing="karras")


@pytest.mark.parametrize("spacing", grids.VP_SPACINGS)
@pytest.mark.parametrize("n", [3, 4, 20, 7])
def test_ddim_grids_follow_the_ddim_scheduler(spacing: str, n: int) -> None:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(n)
    t, prev = grids.ddim_timesteps(1000, n, sched.config.steps_offset, spacing)
    assert torch.equal(t, sched.timesteps)
    assert prev.tolist() == [int(v) - 1000 // n for v in sched.timesteps]  # DDIMScheduler.step's prev_timestep


def test_ddim_alphas_clamp_or_use_the_final_alpha() -> None:
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    t, prev = grids.ddim_timesteps(1000, 4, steps_offset=1)
    a_t, a_prev = grids.ddim_alphas(alphas, t, prev)
    assert torch.equal(a_t, alphas[t]) and torch.equal(a_prev, alphas[[501, 251, 1, 0]])
    _, a_prev = grids.ddim_alphas(alphas, t, prev, torch.ones(()))
    assert a_prev.tolist() == [*alphas[[501, 251, 1]].tolist(), 1.0]


def test_flow_grids_by_hand_and_against_the_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, n in ((3.0, 10), (1.0, 4)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(n)
        assert torch.equal(grids.flow_sigmas(n, shift), scheduler.sigmas)
    torch.testing.assert_close(grids.flow_sigmas(4, 1.0, spacing="linear"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3, linear: 3 s / (1 + 2 s) at s = 0.5 -> 0.75
    assert grids.flow_sigmas(2, 3.0, spacing="linear")[1].item() == pytest.approx(0.75)
    # endpoint: linspace(1, 1/T, N) shifted once, then 0; T = 4, N = 4, shift 1: 1, 0.75, 0.5, 0.25, 0
    torch.testing.assert_close(
        grids.flow_sigmas(4, 1.0, 4, spacing="endpoint"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    )
    # shift 3 at s = 1/T = 1/4: 0.75 / 1.5 = 0.5
    assert grids.flow_sigmas(4, 3.0, 4, spacing="endpoint")[3].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="spacing"):
        grids.flow_sigmas(4, 1.0, spacing="karras")


def test_scheduler_timesteps_refuse_a_spacing_the_caller_does_not_implement() -> None:
    adapter = models.from_components("sd15", tiny.sd15(seed=0))
    adapter.scheduler.register_to_config(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="step-level mining implements leading only"):
        grids.scheduler_timesteps(adapter, 4, ("leading",), who="step-level mining")
    t, _ = grids.scheduler_timesteps(adapter, 4)
    assert t.tolist() == [999, 666, 333, 0]
