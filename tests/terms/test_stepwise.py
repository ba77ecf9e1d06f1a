"""Step-level pair mining and transition terms on tiny SD1.5 / SDXL models.

Checked: the DDIM grid and LPO's sigma-threshold table, children sharing one mean with independent noise,
continuation from a child, the threshold rule, determinism and batch-composition invariance, the on-policy
ratio == 1 invariant at LoRA init, batching invariance of the terms, the decoded scorer, pair storage.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from diffalign import models
from diffalign.diffusion import transition
from diffalign.diffusion.vp import VPProcess
from diffalign.losses import lpo, spo
from diffalign.models import lora, tiny
from diffalign.sampling import grids, guidance
from diffalign.terms import stepwise
from diffalign.terms.stepwise import MinedPairs, MiningSpec


PROMPTS = ["a red circle", "a cat on a table", "a lighthouse at dusk"]
SEEDS = [11, 22, 33]
# Kwai-Kolors/LPO lpo/preference_models/compare_funcs.py: the DDIM eta=1 step std of SD's 20-step grid, by t // 50.
LPO_SIGMA_TABLE = [0.0206, 0.0406, 0.1673, 0.2144, 0.2509, 0.2836, 0.3144, 0.3442, 0.3732, 0.4016,
                   0.4293, 0.4565, 0.4829, 0.5087, 0.5336, 0.5576, 0.5807, 0.6029, 0.6241, 0.6444]  # fmt: skip


def _adapter(family: str):
    adapter = models.from_components(family, getattr(tiny, family)(seed=0))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    return adapter


@pytest.fixture(scope="module")
def sd15():
    return _adapter("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return _adapter("sdxl")


def spec(**kw) -> MiningSpec:
    base = {"num_steps": 4, "num_children": 3, "threshold": 0.0, "resolution": 32}
    return MiningSpec(**{**base, **kw})


class Spy:
    """Wraps a scorer; records every call's latents, timesteps and prompts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, latents, timesteps, prompts, *, adapter):
        self.calls.append((latents.clone(), timesteps.clone(), list(prompts)))
        return self.inner(latents, timesteps, prompts, adapter=adapter)


class ByIndex:
    """Scores child k of every parent with ``values[k]`` (latents are ignored)."""

    def __init__(self, values):
        self.values = torch.tensor(values, dtype=torch.float32)

    def __call__(self, latents, timesteps, prompts, *, adapter):
        return self.values.repeat(latents.shape[0] // len(self.values))


# ---- grid and thresholds ------------------------------------------------------------------------------
def test_sigma_threshold_reproduces_lpo_table():
    process = VPProcess.from_scheduler_config(
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    )
    t, prev = grids.ddim_timesteps(1000, 20, steps_offset=1)
    prev = prev.clamp_min(0)  # the last step goes to timestep 0, as SPO / LPO
    sigmas = transition.ddim_std(process.alphas_cumprod[t], process.alphas_cumprod[prev])
    torch.testing.assert_close(sigmas.flip(0), torch.tensor(LPO_SIGMA_TABLE), rtol=0, atol=6e-5)
    th = stepwise.step_thresholds(spec(threshold_schedule="sigma", threshold_min=0.35, threshold_max=0.5), sigmas)
    assert th[0].item() == pytest.approx(0.5) and th[-1].item() == pytest.approx(0.35)  # t=951 -> max, t=1 -> min
    assert bool((th[:-1] >= th[1:]).all())
    assert stepwise.step_thresholds(spec(threshold=0.3), sigmas).tolist() == pytest.approx([0.3] * 20)


def test_gap_is_the_softmax_difference():
    gap = stepwise.preference_gap(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert gap.tolist() == pytest.approx([math.tanh(1.0), 0.0])


# ---- mining -------------------------------------------------------------------------------------------
def test_children_share_one_mean_with_independent_noise(sd15):
    spy = Spy(stepwise.LinearLatentScorer())
    s = spec(num_children=4)
    pairs = stepwise.mine(sd15, PROMPTS[:1], SEEDS[:1], s, spy).pairs
    process = sd15.process
    for i, (children, t_score, _) in enumerate(spy.calls):
        parent = pairs.x_t[pairs.step_index == i]
        assert parent.shape[0] == 1, "threshold 0 keeps every step with distinct scores"
        t = pairs.timesteps[pairs.step_index == i]
        prev = pairs.prev_timesteps[pairs.step_index == i]
        assert t_score.tolist() == prev.tolist() * 4  # scored at the child's timestep
        cond, empty = guidance.encode_condition(sd15, PROMPTS[:1], pairs.info()[:1], "empty_prompt")
        with torch.no_grad():
            out = guidance.guided_output(sd15, parent, t, cond, empty, s.guidance_scale)
        a = process.alphas_cumprod
        mean, std = transition.ddim_mean_std(
            process.pred_x0(parent, out, t), process.pred_eps(parent, out, t), a[t], a[prev]
        )
        z = (children - mean) / std
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1.0) < 0.1
        zf = z.flatten(1)
        corr = torch.corrcoef(zf)
        assert (corr - torch.eye(4)).abs().max() < 0.2, "children noises must be independent"


def test_next_parent_is_one_of_the_children(sd15):
    spy = Spy(stepwise.LinearLatentScorer())
    pairs = stepwise.mine(sd15, PROMPTS[:2], SEEDS[:2], spec(), spy).pairs
    for step in (1, 2, 3):
        children = spy.calls[step - 1][0].view(2, 3, *pairs.x_t.shape[1:])
        for row in range(2):
            sel = (pairs.step_index == step) & (pairs.prompt_ids == row)
            parent = pairs.x_t[sel][0]
            assert any(torch.equal(parent, c) for c in children[row])


def test_branch_start_threshold_and_best_worst(sd15):
    values = [0.0, 2.0, 1.0]  # gap(best=2, worst=0) = tanh(1) = 0.7616
    spy = Spy(ByIndex(values))
    res = stepwise.mine(sd15, PROMPTS[:2], SEEDS[:2], spec(branch_start=2, threshold=0.7), spy)
    assert len(spy.calls) == 2 and res.stats["candidates"] == 4.0
    pairs = res.pairs
    assert len(pairs) == 4 and sorted(set(pairs.step_index.tolist())) == [2, 3]
    assert pairs.score_w.tolist() == [2.0] * 4 and pairs.score_l.tolist() == [0.0] * 4
    assert pairs.gap.tolist() == pytest.approx([math.tanh(1.0)] * 4)
    children = spy.calls[0][0].view(2, 3, *pairs.x_t.shape[1:])
    first = pairs.select(pairs.step_index == 2)
    for row in range(2):
        assert torch.equal(first.child_w[first.prompt_ids == row][0], children[row, 1])
        assert torch.equal(first.child_l[first.prompt_ids == row][0], children[row, 0])
    dropped = stepwise.mine(sd15, PROMPTS[:2], SEEDS[:2], spec(branch_start=2, threshold=0.77), ByIndex(values))
    assert len(dropped.pairs) == 0 and dropped.stats["kept"] == 0.0
    tied = stepwise.mine(sd15, PROMPTS[:2], SEEDS[:2], spec(), ByIndex([1.0, 1.0, 1.0]))
    assert len(tied.pairs) == 0, "equal scores give a zero gap, never > threshold"


def test_parent_timestep_scoring_option(sd15):
    spy = Spy(ByIndex([0.0, 1.0, 2.0]))
    pairs = stepwise.mine(sd15, PROMPTS[:1], SEEDS[:1], spec(score_timestep="parent"), spy).pairs
    assert [call[1][0].item() for call in spy.calls] == [751, 501, 251, 1] == pairs.timesteps.tolist()


def test_mining_is_deterministic_and_independent_of_batch_composition(sd15):
    scorer = stepwise.LinearLatentScorer(scale=3.0)
    a = stepwise.mine(sd15, PROMPTS, SEEDS, spec(), scorer).pairs
    b = stepwise.mine(sd15, PROMPTS, SEEDS, spec(), scorer).pairs
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    alone = stepwise.mine(sd15, PROMPTS[1:2], SEEDS[1:2], spec(), scorer, prompt_ids=[1]).pairs
    mine = a.select(a.prompt_ids == 1)
    assert mine.prompts == alone.prompts and torch.equal(mine.step_index, alone.step_index)
    torch.testing.assert_close(mine.child_w, alone.child_w, rtol=1e-4, atol=1e-4)  # batch-size float rounding
    other = stepwise.mine(sd15, PROMPTS, [1, 2, 3], spec(), scorer).pairs
    assert not torch.equal(other.x_t[-1], a.x_t[-1])


# ---- terms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_on_policy_ratio_is_exactly_one_at_lora_init(family, sd15, sdxl):
    adapter = {"sd15": sd15, "sdxl": sdxl}[family]
    uncond = "zeros" if family == "sdxl" else "empty_prompt"
    pairs = stepwise.mine(adapter, PROMPTS, SEEDS, spec(uncond=uncond), stepwise.LinearLatentScorer()).pairs
    terms = stepwise.step_terms(adapter, pairs, guidance_scale=5.0, uncond=uncond)
    assert torch.equal(terms.policy_w, terms.ref_w) and torch.equal(terms.policy_l, terms.ref_l)
    out = lpo.loss(terms, lpo.Config())
    assert out.loss.item() == torch.tensor(math.log(2)).item()
    assert out.metrics["ratio_w"].item() == 1.0 and out.metrics["ratio_l"].item() == 1.0
    out.loss.backward()
    grads = [p.grad for p in lora.trainable_parameters(adapter).values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the policy log-prob must carry gradient"
    adapter.denoiser.zero_grad(set_to_none=True)


def test_terms_see_the_lora_and_do_not_depend_on_batching(sd15):
    pairs = stepwise.mine(sd15, PROMPTS, SEEDS, spec(), stepwise.LinearLatentScorer()).pairs
    params = lora.trainable_parameters(sd15)
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            if "lora_B" in k:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            whole = stepwise.step_terms(sd15, pairs, guidance_scale=5.0)
            parts = [
                stepwise.step_terms(sd15, pairs.select(idx), guidance_scale=5.0)
                for idx in (slice(0, 5), slice(5, 7), slice(7, None))
            ]
        assert not torch.equal(whole.policy_w, whole.ref_w)
        for name in ("policy_w", "policy_l", "ref_w", "ref_l"):
            torch.testing.assert_close(
                torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), rtol=1e-5, atol=1e-5
            )
        n = len(pairs)
        loss_whole = spo.loss(whole, spo.Config()).loss
        loss_parts = sum(spo.loss(p, spo.Config()).loss * len(p.policy_w) for p in parts) / n
        assert loss_parts.item() == pytest.approx(loss_whole.item(), rel=1e-5)
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


# ---- scorers ------------------------------------------------------------------------------------------
def test_decoded_scorer_decodes_x0_prediction_and_raw_latents_at_t0(sd15):
    pixel = stepwise.PixelLinearScorer(seed=3)
    scorer = stepwise.DecodedScorer(pixel, guidance_scale=5.0)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = pixel((sd15.decode_latents(latents) + 1) / 2, None)
    at0 = scorer(latents, torch.zeros(2, dtype=torch.long), PROMPTS[:2], adapter=sd15)
    torch.testing.assert_close(at0, raw)
    at500 = scorer(latents, torch.tensor([0, 500]), PROMPTS[:2], adapter=sd15)
    assert at500[0] == at0[0] and at500[1] != at0[1]
    x0 = scorer.predict_x0(latents, torch.tensor([500, 500]), PROMPTS[:2], sd15)
    torch.testing.assert_close(at500[1:], pixel((sd15.decode_latents(x0) + 1) / 2, None)[1:])


def test_guidance_scale_one_is_the_conditional_prediction(sd15):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 100])
    info = [guidance.default_info(sd15, (16, 16))] * 2
    cond, empty = guidance.encode_condition(sd15, PROMPTS[:2], info, "empty_prompt")
    with torch.no_grad():
        torch.testing.assert_close(guidance.guided_output(sd15, x, t, cond, empty, 1.0), sd15.predict(x, t, cond))
        guided = guidance.guided_output(sd15, x, t, cond, empty, 5.0)
        u, c = sd15.predict(x, t, empty), sd15.predict(x, t, cond)
    torch.testing.assert_close(guided, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_zeros_uncond_keeps_sdxl_time_ids(sdxl):
    info = [guidance.default_info(sdxl, (16, 16))]
    cond, empty = guidance.encode_condition(sdxl, PROMPTS[:1], info, "zeros")
    assert torch.equal(empty["time_ids"], cond["time_ids"]) and cond["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    assert not empty["encoder_hidden_states"].any() and not empty["text_embeds"].any()


def test_build_scorer_names(sd15, tmp_path, monkeypatch):
    assert isinstance(stepwise.build_scorer("toy_latent", adapter=sd15), stepwise.LinearLatentScorer)
    assert isinstance(stepwise.build_scorer("toy_decoded", adapter=sd15), stepwise.DecodedScorer)
    with pytest.raises(ValueError, match="unknown step scorer 'lrn'"):
        stepwise.build_scorer("lrn", adapter=sd15)
    with pytest.raises(ValueError, match=r"needs stepwise\.scorer\.pixel_scorer"):
        stepwise.build_scorer("decoded", adapter=sd15)
    with pytest.raises(ValueError, match="not available"):
        stepwise.build_scorer("no_such_pkg_xyz.scorer", adapter=sd15)
    user = types.ModuleType("user_pkg.step_scorer")
    user.load = lambda path=None, *, adapter: ("loaded", path, adapter)
    monkeypatch.setitem(sys.modules, "user_pkg.step_scorer", user)
    assert stepwise.build_scorer("user_pkg.step_scorer", path="/w", adapter=sd15) == ("loaded", "/w", sd15)


def test_flow_models_are_refused():
    adapter = models.from_components("sd3", tiny.sd3(seed=0))
    with pytest.raises(ValueError, match="VP"):
        stepwise.mine(adapter, PROMPTS[:1], SEEDS[:1], spec(), stepwise.LinearLatentScorer())


def test_spec_validation():
    with pytest.raises(ValueError, match="num_children"):
        spec(num_children=1)
    with pytest.raises(ValueError, match="branch_start"):
        spec(branch_start=4)
    with pytest.raises(ValueError, match="threshold_schedule"):
        spec(threshold_schedule="linear")


# ---- storage ------------------------------------------------------------------------------------------
def test_pairs_round_trip_through_safetensors(sd15, tmp_path):
    pairs = stepwise.mine(sd15, PROMPTS, SEEDS, spec(), stepwise.LinearLatentScorer()).pairs
    path = pairs.save(tmp_path / "pairs" / "round-0.safetensors")
    back = MinedPairs.load(path)
    assert back.prompts == pairs.prompts and back.info() == pairs.info()
    for key, value in pairs.tensors().items():
        assert torch.equal(back.tensors()[key], value), key
    assert not list(path.parent.glob(".*tmp"))
    empty = MinedPairs.empty((4, 16, 16)).save(tmp_path / "empty.safetensors")
    assert len(MinedPairs.load(empty)) == 0
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a mined-pairs file"):
        MinedPairs.load(tmp_path / "other.safetensors")
