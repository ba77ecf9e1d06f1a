"""Offline ELBO terms draw the right randomness: standard normal noise and each group's own timestep.

The split-invariance and shared-noise tests elsewhere would pass with ``torch.rand`` noise or with every group
given seed 0's timestep; these compare against the distribution and against an independent per-seed draw.
"""

from __future__ import annotations

import torch

from diffalign import models
from diffalign.diffusion.vp import VPProcess
from diffalign.models import lora
from diffalign.terms.offline import draw_noise, group_errors
from diffalign.types import SampleInfo


SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SEEDS = [0, 1, 2, 7, 11, 123, 4096, 2**31 - 1]


def _first_timestep(seed: int) -> int:
    """Independent draw: the first value of the group's own generator, uniform over [0, 1000)."""
    return int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(seed)))


def _assert_standard_normal(x: torch.Tensor) -> None:
    x = x.double().flatten()
    assert x.numel() >= 4096
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
    assert abs((x < 0).double().mean().item() - 0.5) < 0.02  # torch.rand has no negative values
    kurtosis = ((x - x.mean()) ** 4).mean() / x.var() ** 2
    assert abs(kurtosis.item() - 3.0) < 0.2  # 3 for a normal, 1.8 for a uniform


def test_draw_noise_is_standard_normal_and_timesteps_come_from_each_seed():
    process = VPProcess.from_scheduler_config(SD15)
    noise, timesteps = draw_noise(process, (4, 32, 32), SEEDS)
    assert noise.shape == (len(SEEDS), 4, 32, 32) and noise.dtype == torch.float32
    _assert_standard_normal(noise)
    assert timesteps.tolist() == [_first_timestep(s) for s in SEEDS]
    assert len(set(timesteps.tolist())) == len(SEEDS)
    corr = torch.corrcoef(noise.flatten(1))  # groups get independent noise
    assert (corr - torch.eye(len(SEEDS))).abs().max() < 0.1


def test_group_errors_noise_the_latents_with_each_groups_draw(tiny_dirs):
    """What reaches the forward process: N(0, 1) noise shared within a group and the group's own timestep."""
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    inner, seen = adapter.process, []

    class Recording:
        def __getattr__(self, name):
            return getattr(inner, name)

        def add_noise(self, x0, eps, t):
            seen.append((eps.detach().cpu(), t.detach().cpu()))
            return inner.add_noise(x0, eps, t)

    adapter.process = Recording()
    seeds = SEEDS[:6]
    latents = torch.zeros(len(seeds), 2, 4, 32, 32)
    info = [SampleInfo((256, 256), (0, 0), (256, 256))] * len(seeds)
    errors = group_errors(adapter, latents, seeds, prompts=["x"] * len(seeds), info=info, need_ref=False)
    ((eps, t),) = seen
    expected = [_first_timestep(s) for s in seeds]
    assert errors.timesteps.tolist() == expected
    assert t.tolist() == [s for s in expected for _ in range(2)]
    assert torch.equal(eps[0::2], eps[1::2])  # both images of a group share the noise
    _assert_standard_normal(eps[0::2])
