"""Diffusion-DRO's pieces below the recipe: the per-sample perturbed grid and the rollout that keeps its outputs
(shared sampling kernel), the replay buffer (the authors' rules), and the (expert, own sample) errors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from diffalign import models
from diffalign.diffusion.flow import FlowProcess
from diffalign.diffusion.vp import VPProcess
from diffalign.models import lora, tiny
from diffalign.sampling import grids, guidance, sde
from diffalign.terms import dro as dro_terms


def test_perturbed_grid_is_the_authors_arithmetic():
    """train.py L689-692 with T=1000, N=20: ratio 50, t = (arange(20) * 50).flip(0)[:, None] + perturb."""
    offsets = torch.tensor([0, 49, 7])
    t, prev = grids.perturbed_timesteps(1000, 20, offsets)
    theirs = (torch.arange(0, 20) * 50).round().flip(0)[:, None] + offsets[None, :]
    assert torch.equal(t, theirs.long()) and t.shape == (20, 3)
    assert t[0].tolist() == [950, 999, 957] and t[-1].tolist() == [0, 49, 7]
    assert torch.equal(prev, t - 50)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        grids.perturbed_timesteps(1000, 20, torch.tensor([50]))


def _adapter():
    adapter = models.from_components("sd15", tiny.sd15(seed=0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    with torch.no_grad():
        for i, p in enumerate(lora.trainable_parameters(adapter).values()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return adapter


def test_per_sample_grid_rollout_keeps_outputs_and_matches_one_sample_runs():
    """A batch on per-sample grids equals each sample rolled out alone on its own grid, and ``outputs[:, j]`` is
    the model's prediction at ``latents[:, j]`` (what the DRO buffer stores as the sample side's target)."""
    adapter = _adapter()
    shape = (adapter.vae.config.latent_channels, 4, 4)
    prompts = ["a red circle", "a blue square"]
    info = [guidance.default_info(adapter, shape[1:])] * 2
    with torch.no_grad():
        cond, _ = guidance.encode_condition(adapter, prompts, info, "empty_prompt")
    offsets = torch.tensor([3, 200])
    grid = sde.make_grid(adapter, 4, offsets=offsets)
    alphas = adapter.process.alphas_cumprod.float()
    assert grid.timesteps[:, 1].tolist() == [950, 700, 450, 200]
    assert torch.equal(grid.levels[:, 0], alphas[torch.tensor([753, 503, 253, 3, 0])])  # the last clamped to 0
    spec, off = sde.SDESpec(noise_level=0.0), torch.zeros(4, dtype=torch.bool)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    traj = sde.rollout(adapter, grid, spec, cond, None, generators=gens, latent_shape=shape, sde_steps=off,
                       keep_outputs=True)  # fmt: skip
    assert traj.outputs.shape == (2, 4, *shape) and traj.latents.shape == (2, 5, *shape)
    with torch.no_grad():
        for j in range(4):
            again = adapter.predict(traj.latents[:, j], grid.timesteps[j], cond).float()
            torch.testing.assert_close(traj.outputs[:, j], again, rtol=1e-5, atol=1e-6)
    for b in range(2):
        alone_grid = sde.make_grid(adapter, 4, offsets=offsets[b : b + 1])
        alone = sde.rollout(adapter, alone_grid, spec, {k: v[b : b + 1] for k, v in cond.items()}, None,
                            generators=[torch.Generator().manual_seed(5 + b)], latent_shape=shape, sde_steps=off)  # fmt: skip
        torch.testing.assert_close(alone.latents[0], traj.latents[b], rtol=1e-4, atol=1e-5)
    assert (
        sde.rollout(adapter, grid, spec, cond, None, generators=gens, latent_shape=shape, sde_steps=off).outputs
        is None
    )


def _filled(size: int) -> dro_terms.ReplayBuffer:
    """Trajectory i (i = 0..3, committed two at a time): x0 = i, x[j] = 10 i + j, target = -(10 i + j),
    t[j] = 100 (3 - j) + i, prompt embedding = i."""
    buf = dro_terms.ReplayBuffer(size)
    for lo in (0, 2):
        i = torch.arange(lo, lo + 2).float()
        j = torch.arange(3).float()
        x = (10 * i[:, None] + j[None, :]).view(2, 3, 1, 1, 1).expand(2, 3, 1, 2, 2)
        t = (100 * (3 - j)[None, :] + i[:, None]).long()
        cond = {"prompt_embeds": i.view(2, 1, 1).expand(2, 5, 3)}
        buf.commit(i.view(2, 1, 1, 1).expand(2, 1, 2, 2), cond, x, -x, t)
    return buf


def test_buffer_keeps_the_newest_and_samples_like_the_authors():
    buf = _filled(3)
    assert len(buf) == 3 and buf.tensors["x0"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # trajectory 0 trimmed
    g = torch.Generator().manual_seed(0)
    got = buf.sample(2, g, "cpu")
    g = torch.Generator().manual_seed(0)
    slots, steps = torch.randperm(3, generator=g)[:2], torch.randint(0, 3, (2,), generator=g)  # buffer.py L106-110
    kept = slots + 1  # slot s holds trajectory s + 1
    assert got.x0[:, 0, 0, 0].tolist() == kept.float().tolist()
    assert got.x_t[:, 0, 0, 0].tolist() == (10 * kept + steps).float().tolist()
    assert torch.equal(got.target, -got.x_t)
    assert got.t.tolist() == (100 * (3 - steps) + kept).tolist()
    assert got.cond["prompt_embeds"][:, 0, 0].tolist() == kept.float().tolist()
    many = buf.sample(5, torch.Generator().manual_seed(1), "cpu")  # more than it holds: with replacement
    g = torch.Generator().manual_seed(1)
    assert many.x0[:, 0, 0, 0].tolist() == (torch.randint(0, 3, (5,), generator=g) + 1).float().tolist()


def test_buffer_state_round_trip_and_errors():
    buf = _filled(4)
    again = dro_terms.ReplayBuffer(4)
    again.load_state_dict(buf.state_dict("dro.buffer."), "dro.buffer.")
    assert again.tensors.keys() == buf.tensors.keys()
    assert all(torch.equal(again.tensors[k], buf.tensors[k]) for k in buf.tensors)
    with pytest.raises(ValueError, match="more than size=2"):
        dro_terms.ReplayBuffer(2).load_state_dict(buf.state_dict("b."), "b.")
    with pytest.raises(ValueError, match="empty"):
        dro_terms.ReplayBuffer(2).sample(1, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="do not describe"):
        buf.commit(
            torch.zeros(1, 1, 2, 2), {}, torch.zeros(1, 3, 1, 2, 2), torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 3)
        )


class _LinearAdapter:
    """``predict = w * x_t`` (w = 0.5 for the policy, 0.25 for the reference): hand-computable errors."""

    device = torch.device("cpu")

    def __init__(self, process=None) -> None:
        cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
        self.process = process or VPProcess.from_scheduler_config(cfg | {"prediction_type": "epsilon"})
        self.w = torch.tensor(0.5, requires_grad=True)
        self.ref = False

    @contextlib.contextmanager
    def reference(self):
        self.ref = True
        yield
        self.ref = False

    def predict(self, x_t, t, cond):
        assert cond["prompt_embeds"].shape[0] == x_t.shape[0]
        return (0.25 if self.ref else self.w) * x_t


def test_dro_terms_hand_computed():
    """Expert side: x_t = sqrt(a) x0 + sqrt(1 - a) eps, target eps; sample side: the buffered x_t and target."""
    adapter = _LinearAdapter()
    a = adapter.process.alphas_cumprod[torch.tensor([10, 500])].float()
    x0, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    sample = dro_terms.BufferSample(
        x0=x0, cond={"prompt_embeds": torch.zeros(2, 3, 4)}, x_t=torch.full((2, 1, 2, 2), 4.0),
        target=torch.full((2, 1, 2, 2), 1.0), t=torch.tensor([10, 500]),
    )  # fmt: skip
    terms = dro_terms.dro_terms(adapter, sample, eps)
    xw = 2.0 * a.sqrt() - (1 - a).sqrt()
    torch.testing.assert_close(terms.policy_w, (0.5 * xw + 1.0) ** 2)
    torch.testing.assert_close(terms.ref_w, (0.25 * xw + 1.0) ** 2)
    torch.testing.assert_close(terms.policy_l, torch.full((2,), (0.5 * 4 - 1) ** 2))
    torch.testing.assert_close(terms.ref_l, torch.zeros(2))  # 0.25 * 4 - 1
    assert terms.policy_w.requires_grad and not terms.ref_w.requires_grad
    assert terms.timesteps.tolist() == [10, 500]


def test_flow_buffer_keeps_fp32_timesteps_and_terms_target_the_velocity():
    """A flow grid's model-unit timesteps ``sigma * T`` stay fp32 in the buffer (not truncated to long); the expert
    side is ``(1 - sigma) x0 + sigma eps`` against the velocity ``eps - x0``."""
    buf = dro_terms.ReplayBuffer(2)
    t = torch.tensor([[1000.0, 937.5, 312.25]])
    buf.commit(torch.full((1, 1, 2, 2), 2.0), {"prompt_embeds": torch.zeros(1, 3, 4)},
               torch.full((1, 3, 1, 2, 2), 4.0), torch.full((1, 3, 1, 2, 2), 1.0), t)  # fmt: skip
    sample = buf.sample(3, torch.Generator().manual_seed(0), "cpu")
    assert sample.t.dtype == torch.float32 and set(sample.t.tolist()) <= set(t[0].tolist())
    adapter = _LinearAdapter(FlowProcess(num_train_timesteps=1000, shift=3.0))
    eps = torch.full((3, 1, 2, 2), -1.0)
    terms = dro_terms.dro_terms(adapter, sample, eps)
    sigma = sample.t / 1000
    xw = (1 - sigma) * 2.0 - sigma  # target eps - x0 = -3
    torch.testing.assert_close(terms.policy_w, (0.5 * xw + 3.0) ** 2)
    torch.testing.assert_close(terms.ref_w, (0.25 * xw + 3.0) ** 2)
    torch.testing.assert_close(terms.policy_l, torch.full((3,), 1.0))  # 0.5 * 4 - 1
