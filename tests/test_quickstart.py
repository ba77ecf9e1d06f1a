"""The README's first command (``diffalign quickstart``), shortened: faithfulness must go up, beyond the noise."""

from __future__ import annotations

import json
import math

from diffalign.cli.main import main


def test_quickstart_moves_faithfulness_up(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--eval-prompts", "24", "--train-steps", "60"]) == 0
    text = capsys.readouterr().out
    assert "win draft>base" in text and "report:" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["world"] == "duo" and summary["train"]["steps"] == 60 and summary["label"] is None
    h = summary["headline"]
    # Direction, with a margin over noise: the 95% bootstrap CI (over prompts, 3 seeds each, same seeds for both
    # models) of the paired duofaithfulness difference DRaFT - base lies above zero.
    assert h["reward"] == "duofaithfulness" and h["difference_ci_low"] > 0, h
    assert h["win_rate"] > 0.5 and h["aligned_reward"] > h["base_reward"], h
    assert (out / "eval" / "compare" / "report.html").is_file()
    assert (out / "eval" / "compare" / "side_by_side-duofaithfulness.png").is_file()
    assert (out / "draft" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_quickstart_dpo_labels_pairs_and_trains_from_them(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--objective", "dpo", "--label-prompts", "16", "--eval-prompts", "4"]
    assert main([*argv, "--train-steps", "4"]) == 0
    assert "win dpo>base" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label"]["records"] == 16 and summary["train"]["steps"] == 4
    assert abs(summary["train"]["history"][0]["loss"] - math.log(2)) < 1e-6  # LoRA init: policy == reference
    assert (out / "labels" / "pairs").is_dir() and (
        out / "dpo" / "lora" / "pytorch_lora_weights.safetensors"
    ).is_file()


def test_quickstart_grpo_trains_online_on_its_own_samples(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--objective", "grpo", "--eval-prompts", "4", "--train-steps", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GRPO on groups of its own samples" in printed and "win grpo>base" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["objective"] == "grpo" and summary["train"]["steps"] == 1
    assert (out / "grpo" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["headline"]["objective"] == "grpo"
