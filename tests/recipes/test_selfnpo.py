"""End-to-end tests of recipes/selfnpo.py on tiny SD1.5 / SDXL models and the Pick-a-Pic fixture's winner images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config
from diffalign.training import checkpoint
from tests.recipes.conftest import recipe_module, toy_overrides


@pytest.fixture(scope="module")
def selfnpo_recipe():
    return recipe_module("selfnpo")


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(out / "checkpoints") / "trainable.safetensors"))


def test_sd15_trains_and_resumes_bitwise_including_the_ema(selfnpo_recipe, tiny_dirs, tmp_path):
    """3 steps straight == 1 step, stop, resume from the step-1 checkpoint, 2 more (LoRA, EMA, export)."""
    common = {"run.save_every": 1, "run.keep_last": 5, "run.log_every": 1}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = selfnpo_recipe.main(
        ["--config", "toy/selfnpo", *toy_overrides(tiny_dirs["sd15"], ref_out, **common, **{"run.max_steps": 3})]
    )
    history = ref["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert all(1 <= h["teacher/steps"] <= 2 and h["student/u"] > h["teacher/t_end"] for h in history)
    lines = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3] and "loss/x0_mse" in lines[0]

    cut = toy_overrides(tiny_dirs["sd15"], cut_out, **common)
    selfnpo_recipe.main(["--config", "toy/selfnpo", *cut, "run.max_steps=1"])
    resumed = selfnpo_recipe.main(["--config", "toy/selfnpo", *cut, "run.max_steps=3", "run.resume_from=latest"])
    assert len(resumed["history"]) == 2
    assert resumed["history"][-1]["loss"] == history[-1]["loss"]

    a, b = _final_state(ref_out), _final_state(cut_out)
    ema_keys = [k for k in a if k.startswith("ema.")]
    assert a.keys() == b.keys() and len(ema_keys) == len(a) // 2 > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lora_b = [k for k in ema_keys if "lora_B" in k]
    assert any(a[k].abs().sum() > 0 for k in lora_b)  # the teacher moved off the base
    assert any(not torch.equal(a[k], a[k.removeprefix("ema.")]) for k in lora_b)  # and lags the student
    ref_lora = load_file(str(ref_out / "lora" / "pytorch_lora_weights.safetensors"))
    cut_lora = load_file(str(cut_out / "lora" / "pytorch_lora_weights.safetensors"))
    assert ref_lora.keys() == cut_lora.keys() and all(torch.equal(ref_lora[k], cut_lora[k]) for k in ref_lora)


def test_sdxl_negative_guidance_run_exports_a_lora_stock_diffusers_loads(selfnpo_recipe, tiny_dirs, tmp_path):
    import diffusers

    out = tmp_path / "run"
    extra = {"model.family": "sdxl", "run.max_steps": 2, "optim.lr": 0.05}
    overrides = [*toy_overrides(tiny_dirs["sdxl"], out, **extra), "selfnpo.guidance_scale=-5", "selfnpo.uncond=zeros"]
    result = selfnpo_recipe.main(["--config", "toy/selfnpo", *overrides])
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert config.load(out / "config.yaml", schema=config.SelfNPOConfig).selfnpo.guidance_scale == -5.0

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_dirs["sdxl"]))
    pipe.set_progress_bar_config(disable=True)

    def sample():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(str(out / "lora"))
    assert (sample() - before).abs().max() > 1e-4


def test_latent_cache_gives_the_same_first_step_as_pixels(selfnpo_recipe, tiny_dirs, tmp_path):
    """A cache built for the selfnpo config (K=2 latents per pair) feeds the winner latent and cached prompt."""
    from diffalign import models
    from diffalign.data import latent_cache

    extra = {"run.max_steps": 1, "run.log_every": 1}
    cache_dir = tmp_path / "cache"
    cache_over = toy_overrides(tiny_dirs["sd15"], tmp_path / "cached", **extra, **{"data.latent_cache": cache_dir})
    cfg = config.load("toy/selfnpo", cache_over, schema=config.SelfNPOConfig)
    latent_cache.build(cfg, models.load("sd15", str(tiny_dirs["sd15"])), cache_dir)
    pixels = selfnpo_recipe.main(
        ["--config", "toy/selfnpo", *toy_overrides(tiny_dirs["sd15"], tmp_path / "px", **extra)]
    )
    cached = selfnpo_recipe.main(["--config", "toy/selfnpo", *cache_over])
    a, b = pixels["history"][0], cached["history"][0]
    assert b["teacher/t_start"] == a["teacher/t_start"] and b["student/u"] == a["student/u"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_nan_loss_stops_and_sets_aside_the_weights_that_gave_it(selfnpo_recipe, tiny_dirs, tmp_path):
    """lr=1e30: step 1's update gives finite but huge weights (saved), whose loss at step 2 is not finite."""
    out = tmp_path / "run"
    extra = {"run.max_steps": 2, "run.save_every": 1, "optim.lr": 1e30, "optim.max_grad_norm": "null"}
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2") as err:
        selfnpo_recipe.main(["--config", "toy/selfnpo", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    assert "step-00000001.nonfinite" in str(err.value) and "Last good checkpoint: none" in str(err.value)
    assert checkpoint.list_complete(out / "checkpoints") == []
    assert not (out / "lora").exists()


def test_cli_picks_the_selfnpo_schema(capsys):
    from diffalign.cli.main import main

    assert main(["run", "selfnpo", "--config", "toy/selfnpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "selfnpo:" in out and "guidance_scale: -1.0" in out and "recipes/selfnpo.py" in out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.family=sd3", "not supported by selfnpo"),
        ("lora.text_encoder=true", "text-encoder LoRAs"),
        ("selfnpo.max_teacher_steps=-1", "max_teacher_steps=-1"),
        ("selfnpo.ema_decay=1.5", "ema_decay=1.5"),
        ("selfnpo.loss_type=l1", "huber"),
        ("selfnpo.guidnce_scale=-1", "did you mean 'guidance_scale'"),
    ],
)
def test_config_rejects_what_selfnpo_cannot_do(override, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.load("toy/selfnpo", [override], schema=config.SelfNPOConfig)


@pytest.mark.parametrize("name", ["toy/selfnpo", "sd15/selfnpo_lora", "sdxl/selfnpo_lora"])
def test_shipped_selfnpo_configs_load(name):
    cfg = config.load(name, schema=config.schema_for_recipe("selfnpo"))
    assert isinstance(cfg, config.SelfNPOConfig)
    if name != "toy/selfnpo":
        s = cfg.selfnpo
        assert (s.num_ddim_steps, s.max_teacher_steps, s.ema_decay, s.huber_c) == (25, 5, 0.999, 1e-3)
        assert (s.guidance_scale, s.uncond) == ((-1.0, "empty_prompt") if name.startswith("sd15") else (-5.0, "zeros"))
