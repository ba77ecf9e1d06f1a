"""Every sampling recipe on every family: one round of ``online_rl`` (the GRPO and DDPO presets), one step of
``reward_grad`` (ReFL, DRaFT-K, AlignProp) and one of ``dro`` (Diffusion-DRO; images only, so not on Wan) on tiny
SD1.5, SDXL, SD3, SD3.5-Medium-shaped, FLUX.1-dev-shaped and Wan2.1-T2V-shaped (video) models. Each run must end in a LoRA that a stock diffusers pipeline loads and that changes
its images, while with the LoRA disabled the pipeline gives the base's images exactly.

The FLUX online_rl case is the regression test of the rollout that took its latent channel count from the
transformer's packed input (64) instead of the VAE's latents (16)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.recipes.conftest import ROOT, recipe_module
from tests.recipes.test_objectives_matrix import sample_edit


FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux", "qwenimage", "zimage", "flux2"]
COMMON = {"data.resolution": 32, "run.max_steps": 1, "run.log_every": 1, "run.report_to": "[]"}
# 2 prompts x 2 samples in one micro-batch of 4, on a 3-step grid: 2 trained steps (the last is never trained)
ONLINE = {
    "online.num_steps": 3,
    "online.prompts_per_round": 2,
    "online.group_size": 2,
    "optim.batch_size": 4,
    "optim.grad_accum": 2,
}
REWARD_GRAD = {
    "data.max_prompts": 4,
    "optim.batch_size": 2,
    "optim.lr": 0.01,
    "reward_grad.num_steps": 4,
    "reward_grad.refl_steps": "[2,3]",
}
CASES = {  # name -> (recipe, shipped toy config, overrides)
    "grpo": ("online_rl", "toy/grpo", ONLINE),
    "ddpo": ("online_rl", "toy/ddpo", ONLINE),
    "refl": ("reward_grad", "toy/refl_world", REWARD_GRAD),
    "draft": ("reward_grad", "toy/draft_world", {**REWARD_GRAD, "reward_grad.k": 2}),
    "alignprop": (
        "reward_grad",
        "toy/draft_world",
        {
            **REWARD_GRAD,
            "reward_grad.method": "alignprop",
            "reward_grad.truncation": "uniform",
            "reward_grad.truncation_args": "[1,4]",
            "reward_grad.checkpointing": "true",
        },
    ),
    # Diffusion-DRO: the Pick-a-Pic fixture's winners as experts, the buffer sampled on each family's own grid
    # (the flow families: the shared flow grid, no per-trajectory timestep offsets)
    "dro": ("dro", "toy/dro", {"data.path": "diffalign://assets/pickapic_tiny", "dro.num_steps": 3}),
}


# ---- video (wan): 5-frame 16 px videos; rewards score every frame, reduced by the mean (scorers.base.PerFrame)
FAMILIES.append("wan")
VIDEO = {"data.resolution": 16, "data.num_frames": 5}


def sample_video(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=16, width=16, num_frames=5, generator=gen,
                output_type="pt").frames  # fmt: skip


# ---- instruction editing (fluxkontext, qwenimageedit): online RL on prompts with a source image each
EDITING = ("fluxkontext", "qwenimageedit")
FAMILIES += EDITING
EDIT = {"data.prompts": ROOT / "assets" / "edit_tiny" / "prompts.jsonl", "data.source_image_column": "source_image"}


@pytest.fixture(scope="module")
def recipes():
    return {name: recipe_module(name) for name in ("online_rl", "reward_grad", "dro")}


def sample(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe(  # prompt by keyword: Flux2Pipeline's first parameter is the reference image
        prompt="a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt"
    ).images


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_recipe_runs_on_family_and_exports_a_working_lora(recipes, tiny_dirs, stock_pipes, tmp_path, family, case):
    from diffalign.models import tiny

    name, config, extra = CASES[case]
    if name == "dro" and family == "wan":
        pytest.skip("dro trains on expert images (pickapic / ranked / scored_pairs): no video family")
    if family in EDITING and name != "online_rl":
        pytest.skip("reward_grad and dro pass no source images yet (editing families run offline_pref and online_rl)")
    overrides = {**COMMON, **extra, "model.family": tiny.adapter_family(family), "model.path": tiny_dirs[family]}
    overrides["run.output_dir"] = tmp_path / "run"
    if family in EDITING:
        overrides |= EDIT | ({"model.source_resolution": 32} if family == "qwenimageedit" else {})
    # FLUX.1-dev / FLUX.2-dev / Kontext are guidance-distilled: their guidance embedding, no CFG (dro's is 1)
    if family in {"flux", "flux2", "fluxkontext"} and name != "dro":
        overrides["online.guidance_scale" if name == "online_rl" else "reward_grad.guidance_scale"] = 1.0
    if family == "wan":
        overrides |= VIDEO
    if name == "dro" and family not in {"sd15", "sdxl"}:  # the per-trajectory grid offsets are DDPM timesteps
        overrides["dro.perturb_timesteps"] = "false"
    result = recipes[name].main(["--config", config, *(f"{k}={v}" for k, v in overrides.items())])
    first = result["history"][0]
    assert len(result["history"]) == 1 and math.isfinite(first["loss"])
    if name == "online_rl":
        assert result["rounds"] == 1 and first["loss/ratio_min"] == first["loss/ratio_max"] == 1.0

    pipe = stock_pipes[family]
    draw = sample_video if family == "wan" else sample_edit if family in EDITING else sample
    before = draw(pipe)
    pipe.load_lora_weights(str(result["lora_dir"]), adapter_name="trained")
    try:
        assert "trained" in pipe.get_list_adapters().get("unet" if family in {"sd15", "sdxl"} else "transformer", [])
        assert not torch.equal(draw(pipe), before), "the trained LoRA must change the images"
        pipe.disable_lora()
        assert torch.equal(draw(pipe), before)
    finally:
        pipe.enable_lora()
        pipe.delete_adapters("trained")
