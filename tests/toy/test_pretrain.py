"""``recipes/pretrain_toy.py`` for a few steps: it trains, and writes a diffusers folder every consumer loads."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from diffalign.config import recipes_dir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = recipes_dir() / "pretrain_toy.py"
    spec = importlib.util.spec_from_file_location("diffalign_recipe_pretrain_toy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("pretrain") / "toy_base"
    argv = ["--out", str(out), "--vae-steps", "3", "--steps", "3", "--batch-size", "4", "--vae-batch-size", "4"]
    record = module.main([*argv, "--threads", "1", "--log-every", "1"])
    return out, record


def test_writes_a_record_of_the_run(pretrained):
    out, record = pretrained
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["args"]["steps"] == 3 and saved["command"].startswith("python recipes/pretrain_toy.py --out")
    assert saved["wall_time_s"]["total"] > 0 and saved["vae"]["latent_std"] > 0
    assert torch.isfinite(torch.tensor(record["final_loss"]))


def test_stock_pipeline_and_adapter_load_it(pretrained):
    import diffusers

    from diffalign import models
    from diffalign.toy import model

    out, record = pretrained
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == model.MAX_TOKENS
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / record["vae"]["latent_std"])
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    adapter = models.load("sd15", str(out))
    latents = adapter.encode_images(torch.zeros(2, 3, 32, 32))
    assert latents.shape == (2, model.LATENT_CHANNELS, 8, 8)
    cond = adapter.encode_prompts(["a red circle on a blue background", ""])
    assert cond["encoder_hidden_states"].shape == (2, model.MAX_TOKENS, model.TEXT_DIM)


def test_duo_world_pretrains_with_its_own_scenes_and_captions(tmp_path, monkeypatch):
    """``--world duo`` renders duo scenes for both stages and captions them with the duo world's noisy captions."""
    path = recipes_dir() / "pretrain_toy.py"
    spec = importlib.util.spec_from_file_location("diffalign_recipe_pretrain_toy_duo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from diffalign.toy import duo

    seen: list[str] = []
    real = module.captions_for
    monkeypatch.setattr(module, "captions_for", lambda *a: seen.extend(real(*a)) or seen[-len(a[0]) :])
    argv = ["--world", "duo", "--out", str(tmp_path / "duo"), "--vae-steps", "2", "--steps", "2", "--batch-size", "8"]
    record = module.main([*argv, "--vae-batch-size", "4", "--threads", "1", "--unet-channels", "16", "32"])
    assert record["args"]["world"] == "duo" and record["args"]["caption_noise"] == 0.4
    assert record["args"]["unet_channels"] == [16, 32] and len(seen) == 16
    for text in seen:
        if text:  # cond dropout empties some
            duo.parse_caption(text)
    assert (tmp_path / "duo" / "unet" / "config.json").is_file()
