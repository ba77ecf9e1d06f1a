"""source_similarity: the CLIP image-image cosine of an edit with its source, on a tiny random-init CLIP saved like
openai/clip-vit-large-patch14; composed with other scorers as an online RL edit reward."""

from __future__ import annotations

import pytest
import torch

from diffalign import scorers
from diffalign.scorers import _clip
from diffalign.scorers.base import preprocess_images, score


def test_cosine_of_edit_and_source(clip_backbone_dir):
    scorer = scorers.load("source_similarity", path=str(clip_backbone_dir), batch_size=2)
    torch.manual_seed(0)
    edits, sources = torch.rand(3, 3, 40, 40), torch.rand(3, 3, 40, 40)
    got = scorer(edits, None, sources=sources)
    embed = lambda x: _clip.image_embeds(scorer.model, preprocess_images(x, scorer.transform, scorer.device))  # noqa: E731
    assert torch.allclose(got, (embed(edits) * embed(sources)).sum(-1), atol=1e-5)
    assert torch.allclose(scorer(sources, None, sources=sources), torch.ones(3), atol=1e-5)
    g = scorer(edits.clone().requires_grad_(True), None, sources=sources, grad=True)
    assert g.requires_grad


def test_needs_sources_one_line(clip_backbone_dir):
    scorer = scorers.load("source_similarity", path=str(clip_backbone_dir))
    with pytest.raises(ValueError, match="source_image_column"):
        scorer(torch.rand(1, 3, 32, 32), None)
    with pytest.raises(ValueError, match="source_image_column"):
        score(scorer, torch.rand(1, 3, 32, 32), ["x"], None)
    pixels = torch.rand(2, 3, 32, 32)  # score() takes [-1, 1] sources, as the recipes hold them
    assert torch.allclose(score(scorer, pixels, None, pixels * 2 - 1), torch.ones(2), atol=1e-5)


def test_online_rl_edit_reward_on_fluxkontext(tmp_path, clip_backbone_dir):
    """fluxkontext/grpo_edit's reward (clipscore + source_similarity) through one online_rl round on the tiny model."""
    from diffalign.models import tiny
    from tests.recipes.conftest import ROOT, recipe_module

    model = tiny.save("fluxkontext", tmp_path / "kontext")
    clip = str(clip_backbone_dir)
    overrides = {
        "model.family": "fluxkontext", "model.path": model, "data.resolution": 32, "run.max_steps": 1,
        "run.log_every": 1, "run.report_to": "[]", "run.output_dir": tmp_path / "run", "online.num_steps": 3,
        "online.prompts_per_round": 2, "online.group_size": 2, "optim.batch_size": 4, "optim.grad_accum": 2,
        "online.guidance_scale": 1.0, "data.prompts": ROOT / "assets" / "edit_tiny" / "prompts.jsonl",
        "data.source_image_column": "source_image",
        "online.rewards": f"{{clipscore: {{weight: 0.5, path: {clip}}}, source_similarity: {{weight: 0.5, path: {clip}}}}}",
    }  # fmt: skip
    result = recipe_module("online_rl").main(["--config", "toy/grpo", *(f"{k}={v}" for k, v in overrides.items())])
    first = result["history"][0]
    assert -1.0 <= first["reward/source_similarity/mean"] <= 1.0
    assert "reward/clipscore/mean" in first
