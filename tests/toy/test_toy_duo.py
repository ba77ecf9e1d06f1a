"""The shipped ``assets/toy_duo`` is a trained model: a stock pipeline loads it, draws the two named objects with
their shapes, and (the point of the duo world) gets the left/right relation right only part of the time."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.toy import duo, duo_reward, worlds


TOY_DUO = worlds.get("duo").base


@pytest.fixture(scope="module")
def drawn():
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TOY_DUO)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    prompts = duo.prompts("heldout")[:24]
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=gens, output_type="pt").images
    assert images.shape == (24, 3, 32, 32)
    return images, prompts


def test_stock_pipeline_draws_both_named_objects_with_their_shapes(drawn):
    images, prompts = drawn
    scores = duo_reward.DuoReward().components(images, prompts)
    noise = duo_reward.DuoReward().components(torch.rand(24, 3, 32, 32), prompts)
    detected = (scores["present_left"] >= duo_reward.DETECT) & (scores["present_right"] >= duo_reward.DETECT)
    assert detected.float().mean() > 0.8 and noise["color"].mean() < 0.1, scores
    hits = torch.cat([scores["shape_left"], scores["shape_right"]])[torch.cat([detected, detected])]
    assert (hits > 0.5).float().mean() > 0.6  # shapes well above chance (1/3)


def test_reproduction_record_is_shipped():
    record = json.loads((TOY_DUO / "pretrain.json").read_text())
    assert record["command"].startswith("python recipes/pretrain_toy.py --world duo")
    assert record["args"]["world"] == "duo"
    assert (TOY_DUO / "README.md").read_text().count(record["command"]) == 1
