"""End-to-end tests of recipes/reward_grad.py: ReFL on tiny SD1.5, DRaFT-K with KL and checkpointing on tiny SD3,
DRaFT-LV on tiny FLUX, exact resume, config checks. The reward is the differentiable toy reward on toy captions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.training import checkpoint
from tests.recipes.conftest import recipe_module


FAST = {
    "data.resolution": 32,
    "data.max_prompts": 8,
    "optim.batch_size": 2,
    "optim.lr": 0.01,
    "reward_grad.num_steps": 4,
    "reward_grad.refl_steps": "[2,3]",
    "run.log_every": 1,
    "run.report_to": "[]",
}


def overrides(tiny_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {**FAST, "model.path": str(tiny_dir), "run.output_dir": str(out_dir), **extra}
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def recipe():
    return recipe_module("reward_grad")


def lora_b_nonzero(out: Path) -> bool:
    weights = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    return any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)


def test_refl_on_tiny_sd15_trains_logs_guards_and_exports(recipe, tiny_dirs, tmp_path):
    out = tmp_path / "refl"
    result = recipe.main(["--config", "toy/refl_world", *overrides(tiny_dirs["sd15"], out, **{"run.max_steps": 3})])
    history = result["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    for h in history:
        assert {"reward/toyreward", "guard/toyfaithfulness", "guard/toyprominence", "kl"} <= h.keys()
        assert h["rollout/grad_start"] in (2.0, 3.0) and h["kl"] == 0.0
        # relu(2 - r) * 1e-3 with r in [0, 1]: the loss is exactly linear in the reward
        assert h["loss"] == pytest.approx(1e-3 * (2 - h["reward/toyreward"]), rel=1e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert lora_b_nonzero(out)
    cfg = dconfig.load(out / "config.yaml", schema=dconfig.RewardGradConfig)
    assert cfg.reward_grad.method == "refl" and cfg.reward_grad.guard_scorers == ["toyfaithfulness", "toyprominence"]


def test_draft_k_with_kl_and_checkpointing_on_tiny_sd3(recipe, tiny_dirs, tmp_path):
    extra = {
        "model.family": "sd3",
        "run.max_steps": 2,
        "reward_grad.k": 2,
        "reward_grad.guidance_scale": 1.0,
        "reward_grad.kl_coeff": 10.0,
        "reward_grad.checkpointing": "true",
    }
    result = recipe.main(["--config", "toy/draft_world", *overrides(tiny_dirs["sd3"], tmp_path / "sd3", **extra)])
    first, second = result["history"]
    assert first["kl"] == 0.0, "step 1 runs at LoRA init: the policy is the reference"
    assert second["kl"] > 0.0 and math.isfinite(second["loss"])
    assert lora_b_nonzero(tmp_path / "sd3")


def test_draft_lv_on_tiny_flux(recipe, tiny_dirs, tmp_path):
    extra = {"model.family": "flux", "run.max_steps": 1, "reward_grad.method": "draft_lv"}
    extra["reward_grad.guidance_scale"] = 1.0
    result = recipe.main(["--config", "toy/draft_world", *overrides(tiny_dirs["flux"], tmp_path / "flux", **extra)])
    assert math.isfinite(result["history"][0]["loss"]) and result["history"][0]["grad_norm"] > 0


def test_resume_reproduces_an_uninterrupted_run(recipe, tiny_dirs, tmp_path):
    extra = {"reward_grad.method": "alignprop", "reward_grad.truncation": "uniform"}
    extra["reward_grad.truncation_args"] = "[1,4]"
    full, split = tmp_path / "full", tmp_path / "split"
    cfg = "toy/refl_world"
    a = recipe.main(["--config", cfg, *overrides(tiny_dirs["sd15"], full, **extra, **{"run.max_steps": 4})])
    recipe.main(["--config", cfg, *overrides(tiny_dirs["sd15"], split, **extra, **{"run.max_steps": 2})])
    assert [p.name for p in checkpoint.list_complete(split / "checkpoints")] == ["step-00000002"]
    more = {**extra, "run.max_steps": 4, "run.resume_from": "latest"}
    b = recipe.main(["--config", cfg, *overrides(tiny_dirs["sd15"], split, **more)])
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"][2:]]
    wa = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(split / "lora" / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward_grad.scorer=pickscor", "pickscore"),
        ("reward_grad.refl_steps=[30,39]", "refl_steps"),
        ("reward_grad.guard_scorers=[nope]", "guard_scorers"),
        ("reward_grad.kl_coeff=-1", "kl_coeff"),
    ],
)
def test_config_checks(override, message):
    with pytest.raises(dconfig.ConfigError, match=message):
        dconfig.load("toy/refl_world", [override])


def test_shipped_configs_load():
    for name in (
        "toy/refl_world",
        "toy/draft_world",
        "sd15/refl_lora",
        "sd15/draft_lora",
        "sd15/alignprop_lora",
        "sdxl/refl_lora",
        "sd3/draft_hps",
        "sd35/refl_hps",
        "flux/draft_hps",
    ):
        cfg = dconfig.load(name)
        assert isinstance(cfg, dconfig.RewardGradConfig)


def test_prompt_source_splits_like_one_process(recipe):
    prompts = [f"p{i}" for i in range(5)]
    one = recipe.PromptSource(prompts, seed=3, batch_size=4)
    two = [recipe.PromptSource(prompts, seed=3, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # crosses epochs: a fresh permutation each
        p1, s1, b1 = one.next_batch()
        parts = [src.next_batch() for src in two]
        assert p1 == parts[0][0] + parts[1][0] and s1 == parts[0][1] + parts[1][1]
        assert b1 == parts[0][2] == parts[1][2]
    assert sorted(one.prompt_at(i) for i in range(5)) == prompts
    state = one.state_dict()
    fresh = recipe.PromptSource(prompts, seed=3, batch_size=4)
    fresh.load_state_dict(state)
    assert fresh.next_batch() == one.next_batch()
