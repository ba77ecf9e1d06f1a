"""The peers' options in recipes/online_rl.py (issue 21 item 4): each runs one tiny round and does what it says."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from tests.recipes.conftest import recipe_module
from tests.recipes.test_online_rl import overrides


@pytest.fixture(scope="module")
def recipe():
    return recipe_module("online_rl")


def run(recipe, tiny_dirs, tmp_path, config: str = "toy/grpo", family: str = "sd3", **extra):
    extra.setdefault("run.max_steps", 1)
    return recipe.main(["--config", config, *overrides(tiny_dirs[family], tmp_path / "run", **extra)])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["online.sde_form=cps", "online.noise_level=1.2"], "online.noise_level"),
        (["online.sde_form=cps", "online.sde_arithmetic=flow_grpo"], "online.sde_arithmetic"),
        (["online.bestofn=3"], "online.bestofn"),
        (["online.bestofn=4"], "online.bestofn"),
        (["online.adv_std=tracker", "online.tracker_min_count=20"], "online.tracker_min_count"),
        (["online.adv_std=tracker", "online.per_reward=true"], "online.per_reward"),
        (["online.sde_form=cps", "online.noise_level=0.8", "loss.ratio_norm=true"], "loss.ratio_norm"),
    ],
)
def test_peer_config_checks(override, match):
    with pytest.raises(dconfig.ConfigError, match=match):
        dconfig.load("toy/grpo", ["run.output_dir=x", *override])


def test_cps_round_trains_with_ratio_one(recipe, tiny_dirs, tmp_path):
    extra = {"online.sde_form": "cps", "online.noise_level": 0.8, "loss.clip_range": 1e-5}
    h = run(recipe, tiny_dirs, tmp_path, **extra)["history"][0]
    assert math.isfinite(h["loss"]) and h["loss/ratio_min"] == h["loss/ratio_max"] == 1.0 and h["grad_norm"] > 0


def test_flow_grpo_arithmetic_round_trains_with_ratio_one(recipe, tiny_dirs, tmp_path):
    h = run(recipe, tiny_dirs, tmp_path, **{"online.sde_arithmetic": "flow_grpo", "run.max_steps": 2})["history"]
    assert h[0]["loss/ratio_min"] == h[0]["loss/ratio_max"] == 1.0 and h[1]["loss/kl"] > 0


def _record_rollouts(recipe, monkeypatch) -> list:
    seen = []
    real = recipe.rollout

    def spy(*args, **kwargs):
        traj = real(*args, **kwargs)
        seen.append((kwargs, traj))
        return traj

    monkeypatch.setattr(recipe, "rollout", spy)
    return seen


@pytest.mark.parametrize("same", [False, True])
def test_same_latent_shares_the_initial_noise_of_a_group_only(recipe, tiny_dirs, tmp_path, monkeypatch, same):
    """toy/grpo: 2 prompts x 4, batch 4, so micro-batch i is prompt i's group."""
    seen = _record_rollouts(recipe, monkeypatch)
    run(recipe, tiny_dirs, tmp_path, **{"online.same_latent": same})
    (kw0, t0), (_, t1) = [s for s in seen if s[0].get("sde_steps") is not None and s[0]["sde_steps"].any()][:2]
    first = t0.latents[:, 0]
    assert (kw0["initial"] is not None) == same
    assert all(torch.equal(first[0], first[i]) for i in range(1, 4)) == same
    assert not torch.equal(first[0], t1.latents[0, 0])  # another prompt, another noise
    assert not torch.equal(t0.latents[0, 1], t0.latents[1, 1])  # the SDE noises differ within the group


def test_bestofn_trains_the_best_and_worst_of_each_group(recipe, tiny_dirs, tmp_path):
    h = run(recipe, tiny_dirs, tmp_path, **{"online.bestofn": 2})["history"][0]
    assert h["bestofn_kept_frac"] == 0.5 and h["groups"] == 4 * 3 and h["grad_norm"] > 0


TRACKER = {"online.adv_std": "tracker", "online.tracker_buffer": 8, "online.tracker_min_count": 4,
           "online.adv_eps": 1e-6, "data.max_prompts": 2, "run.save_every": 1}  # fmt: skip


def test_tracker_state_makes_resume_exact(recipe, tiny_dirs, tmp_path):
    """DDPO's per-prompt buffers (2 prompts, 4 rewards each per round, buffer 8): round 3 normalises by rounds 2-3,
    so a resume that lost the buffers would train another LoRA."""
    whole = run(recipe, tiny_dirs, tmp_path / "a", **TRACKER, **{"run.max_steps": 3})
    assert whole["history"][0]["tracked_prompts"] == 2.0
    run(recipe, tiny_dirs, tmp_path / "b", **TRACKER, **{"run.max_steps": 2})
    resumed = run(recipe, tiny_dirs, tmp_path / "b", **TRACKER, **{"run.max_steps": 3, "run.resume_from": "latest"})
    assert resumed["rounds"] == 3
    want = load_file(str(tmp_path / "a" / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(tmp_path / "b" / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_no_cfg_skips_the_unconditional_pass_entirely(recipe, tiny_dirs, tmp_path, monkeypatch, scale):
    """guidance_scale 1: every denoiser forward (rollout, update, reference, held-out) is the conditional batch alone
    and the empty prompt is never encoded; with CFG every forward is the doubled [uncond, cond] batch."""
    from diffalign.training import loop

    calls = {"predict": [], "prompts": []}
    build = loop.build_adapter

    def spied(*args, **kwargs):
        adapter = build(*args, **kwargs)
        predict, encode = adapter.predict, adapter.encode_prompts

        def count_predict(x, *a, **k):
            calls["predict"].append(x.shape[0])
            return predict(x, *a, **k)

        def count_encode(prompts, *a, **k):
            calls["prompts"].extend(prompts)
            return encode(prompts, *a, **k)

        adapter.predict, adapter.encode_prompts = count_predict, count_encode
        return adapter

    monkeypatch.setattr(loop, "build_adapter", spied)
    extra = {"online.guidance_scale": scale, "validation.every": 1}
    run(recipe, tiny_dirs, tmp_path, **extra)
    assert calls["predict"] and set(calls["predict"]) == ({4} if scale == 1.0 else {8})
    assert ("" in calls["prompts"]) == (scale != 1.0)


def test_eval_guidance_scale_is_checked():
    with pytest.raises(dconfig.ConfigError, match=r"online\.eval_guidance_scale"):
        dconfig.load("toy/grpo", ["run.output_dir=x", "online.eval_guidance_scale=0"])
    assert (
        dconfig.load("toy/grpo", ["run.output_dir=x", "online.eval_guidance_scale=1"]).online.eval_guidance_scale == 1
    )


def test_fast_branches_a_shared_ode_trajectory_in_a_random_window(recipe, tiny_dirs, tmp_path, monkeypatch):
    """Flow-GRPO-Fast with same_latent on a 6-step grid, window 2 in [0, 5): the group is one ODE trajectory up to
    the window (identical latents), SDE inside it, ODE after; only the window's steps are trained."""
    seen = _record_rollouts(recipe, monkeypatch)
    extra = {"online.num_steps": 6, "online.train_steps": "fast", "online.fast_window_size": 2,
             "online.fast_window_hi": 5, "online.same_latent": True, "optim.grad_accum": 4, "run.max_steps": 3}  # fmt: skip
    history = run(recipe, tiny_dirs, tmp_path, **extra)["history"]
    starts = []
    for kwargs, traj in seen:
        sde = kwargs["sde_steps"].bool()
        if not sde.any():
            continue
        start = int(sde.nonzero()[0])
        assert sde.nonzero().flatten().tolist() == [start, start + 1] and start + 2 <= 5
        assert torch.isnan(traj.log_probs[:, ~sde]).all() and torch.isfinite(traj.log_probs[:, sde]).all()
        lat = traj.latents
        assert all(torch.equal(lat[0, : start + 1], lat[i, : start + 1]) for i in range(4))  # shared ODE prefix
        assert not torch.equal(lat[0, start + 1], lat[1, start + 1])  # branched by the SDE step
        starts.append(start)
    assert len(starts) == 6 and all(h["groups"] == 8 * 2 for h in history)
    assert all(h["loss/ratio_min"] == h["loss/ratio_max"] == 1.0 for h in history)


def test_fast_window_is_checked():
    with pytest.raises(dconfig.ConfigError, match=r"online\.fast_window_size"):
        dconfig.load("toy/grpo", ["run.output_dir=x", "online.train_steps=fast", "online.fast_window_hi=4"])


def test_grpo_guard_round_trains_and_its_first_ratio_is_one(recipe, tiny_dirs, tmp_path):
    extra = {"loss.ratio_norm": True, "loss.grad_reweight": True, "loss.clip_range": 2e-6, "run.max_steps": 2,
             "run.save_every": 2, "online.updates_per_round": 2, "optim.grad_accum": 3}  # fmt: skip
    first, second = run(recipe, tiny_dirs, tmp_path, **extra)["history"]
    assert first["loss/ratio_min"] == first["loss/ratio_max"] == 1.0 and first["grad_norm"] > 0
    assert second["loss/ratio_min"] != second["loss/ratio_max"] and math.isfinite(second["loss"])


def test_grpo_guard_ratio_norm_on_ddim_and_flow_only_options_refuse_a_vp_model(recipe, tiny_dirs, tmp_path):
    h = run(recipe, tiny_dirs, tmp_path / "a", config="toy/ddpo", family="sd15", **{"loss.ratio_norm": True})
    assert h["history"][0]["loss/ratio_min"] == h["history"][0]["loss/ratio_max"] == 1.0
    for key, value in (("loss.grad_reweight", True), ("online.sde_form", "cps")):
        with pytest.raises(ValueError, match="needs a flow model"):
            run(recipe, tiny_dirs, tmp_path / "b", config="toy/ddpo", family="sd15", **{key: value})


def test_mixgrpo_shortened_end_window_is_the_mean_over_its_steps(recipe, tiny_dirs, tmp_path):
    """online.window_partial: a window of 2 starting at the last trainable step (4-step grid: steps 0-2 trainable)
    trains that 1 step, as MixGRPO's ``range(cur, min(cur + size, max))`` does, and its update is the mean over
    that step (the missing items are empty): the same LoRA as a full window of size 1 at the same start."""
    window = {"online.train_steps": "window", "online.window_init": 2, "run.max_steps": 1}
    partial = run(recipe, tiny_dirs, tmp_path / "partial", **window, **{
        "online.window_size": 2, "online.window_partial": True, "optim.grad_accum": 4})  # fmt: skip
    full = run(recipe, tiny_dirs, tmp_path / "full", **window, **{"online.window_size": 1, "optim.grad_accum": 2})
    assert partial["history"][0]["groups"] == full["history"][0]["groups"] == 8 * 1
    assert partial["history"][0]["round/trained_steps"] == 1.0
    got = load_file(str(tmp_path / "partial" / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    want = load_file(str(tmp_path / "full" / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(dconfig.ConfigError, match=r"online\.window_partial=true"):
        dconfig.load("toy/grpo", ["run.output_dir=x", "online.train_steps=window", "online.window_init=2"])
