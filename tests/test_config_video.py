"""Config checks of the video family (wan): the shipped wan configs validate; data.num_frames, data.format=video and
the per-frame reward options belong to video families; Wan has no text-encoder LoRA."""

from __future__ import annotations

import re

import pytest

from diffalign import config
from diffalign.cli.main import main
from diffalign.config import ConfigError


@pytest.mark.parametrize("name", ["wan/dpo_lora", "wan/grpo_ocr"])
def test_shipped_wan_configs_validate(name, tiny_dirs, capsys):
    """As shipped, but the Hub model (not in the offline test cache) replaced by the tiny Wan folder."""
    assert main(["validate", name, f"model.path={tiny_dirs['wan']}"]) == 0
    assert "valid" in capsys.readouterr().out


def test_ls_configs_lists_the_wan_configs(capsys):
    assert main(["ls", "configs"]) == 0
    out = capsys.readouterr().out
    assert "wan/dpo_lora" in out and "wan/grpo_ocr" in out


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("wan/dpo_lora", ["data.num_frames=32"], "data.num_frames=32: a wan video has 4k + 1 frames"),
        ("wan/dpo_lora", ["lora.text_encoder=true"], "lora.text_encoder=true: the wan pipeline saves a transformer"),
        ("wan/dpo_lora", ["data.format=pickapic"], "wan trains on videos; use data.format=video"),
        ("toy/dpo", ["data.num_frames=5"], "data.num_frames applies to video families"),
        ("toy/dpo", ["data.format=video"], "data.format=video needs a video model family"),
        ("wan/grpo_ocr", ["model.flow_shift=resolution"], None),
        ("toy/grpo", ["online.rewards.toy_pixel.frame_reduction=min"], "frame_reduction / frame_stride apply"),
        ("wan/grpo_ocr", ["online.rewards.clipscore.frame_stride=0"], "frame_stride=0 must be >= 1"),
    ],
)
def test_video_options_are_checked(name, overrides, message):
    if message is None:  # caught when the model loads (adapter.resolution_shift), not by the schema
        config.load(name, overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(name, overrides)
