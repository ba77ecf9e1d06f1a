"""DCPO's per-image captions: the pair loader keeps each caption with its image, the pair engine encodes per image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.data import PickapicDataset, PickapicSource, PreferenceRecord


DUAL = Path(__file__).resolve().parents[2] / "assets" / "pickapic_tiny_dual"


def test_captions_follow_their_images_winner_first(tmp_path):
    plain = PickapicDataset(PickapicSource(path=str(DUAL), cache_dir=str(tmp_path)))
    dual = PickapicDataset(
        PickapicSource(path=str(DUAL), image_caption_columns=("caption_0", "caption_1"), cache_dir=str(tmp_path))
    )
    assert plain[0].image_prompts is None
    swapped = 0
    for i in range(len(dual)):
        rec = dual[i]
        if not isinstance(rec, PreferenceRecord):
            continue
        winner, loser = rec.image_prompts
        assert winner == rec.prompt and loser != rec.prompt  # the rejected image carries the perturbed caption
        swapped += dual.source_index(i) % 3 == 1  # label_0 == 0 rows: jpg_1 wins, so its caption_1 comes first
    assert swapped > 0


def test_group_errors_encode_one_caption_per_image(tiny_dirs):
    from diffalign import models
    from diffalign.models import lora
    from diffalign.terms.offline import group_errors
    from diffalign.types import SampleInfo

    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    lora.add_lora(adapter, lora.LoraSpec(rank=4, init="default"))
    with torch.no_grad():
        for p in lora.trainable_parameters(adapter).values():
            p.add_(0.05 * torch.randn_like(p))
    latents = torch.randn(2, 2, 4, 16, 16)
    info = [SampleInfo((32, 32), (0, 0), (32, 32))] * 2
    same = group_errors(adapter, latents, [3, 4], image_prompts=[["a", "a"], ["b", "b"]], info=info)
    shared = group_errors(adapter, latents, [3, 4], prompts=["a", "b"], info=info)
    torch.testing.assert_close(same.policy, shared.policy)
    torch.testing.assert_close(same.ref, shared.ref)
    mixed = group_errors(adapter, latents, [3, 4], image_prompts=[["a", "x"], ["b", "y"]], info=info)
    other = group_errors(adapter, latents, [3, 4], prompts=["x", "y"], info=info)
    torch.testing.assert_close(mixed.policy[:, 0], shared.policy[:, 0])  # winner: its own caption
    torch.testing.assert_close(mixed.policy[:, 1], other.policy[:, 1])  # loser: its own caption, same noise and t
    with pytest.raises(ValueError, match="captions"):
        group_errors(adapter, latents, [3, 4], image_prompts=[["a"], ["b"]], info=info)


def test_dcpo_needs_caption_columns():
    from diffalign import config

    base = ["run.output_dir=/tmp/x", "model.path=/tmp/m"]
    assert config.load("toy/dcpo", base).data.caption_columns == ["caption_0", "caption_1"]
    with pytest.raises(config.ConfigError, match="caption_columns"):
        config.load("toy/dcpo", [*base, "data.caption_columns=null"])
    with pytest.raises(config.ConfigError, match="two caption columns"):
        config.load("toy/dpo", [*base, "data.caption_columns=[a]"])
