"""What every training run leaves at its end: the last step's metrics row, ``curves.png`` and the summary block.

Run through the real offline_pref recipe on the tiny SD1.5 model (``loop.train`` is the end of every LoRA recipe).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.recipes.conftest import toy_overrides


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_last_step_row_curves_and_summary(recipe, tiny_dirs, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="diffalign.train")
    extra = {"run.max_steps": 5, "run.log_every": 2, "run.save_every": 5, "run.report_to": "[tensorboard]"}
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    assert _steps(out) == [1, 2, 4, 5]  # step 5 is not a multiple of log_every, and is the last
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == pytest.approx(result["history"][-1]["loss"])
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run summary:"))
    lines = summary.splitlines()
    assert lines[0] == f"run summary: {out}"
    assert "for 5 steps (0 -> 5" in lines[1] and "s/step" in lines[1] and lines[1].split()[:2] == ["wall", "time"]
    assert f"at step 5: loss {last['loss']:.4g}" in summary
    assert f"loss/implicit_acc {last['loss/implicit_acc']:.4g}" in summary
    assert f"  LoRA         {out / 'lora'} (pipe.load_lora_weights)" in lines
    assert f"  metrics      {out / 'metrics.jsonl'}" in lines
    assert f"  tensorboard  tensorboard --logdir {out / 'logs'}" in lines
    assert f"  curves       {out / 'curves.png'}" in lines


def test_last_step_on_a_log_step_is_one_row_and_a_resume_adds_the_new_last(recipe, tiny_dirs, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="diffalign.train")
    common = {"run.log_every": 2, "run.save_every": 4}
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **common, **{"run.max_steps": 4})])
    assert _steps(out) == [1, 2, 4]  # the last step is a log step: no second row for it
    assert "tensorboard" not in caplog.text  # run.report_to=[]: no tracker line
    caplog.clear()
    resumed = {**common, "run.max_steps": 7, "run.resume_from": "latest"}
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **resumed)])
    assert _steps(out) == [1, 2, 4, 6, 7]
    assert "for 3 steps (4 -> 7" in caplog.text


def test_a_curves_failure_warns_and_the_run_still_succeeds(recipe, tiny_dirs, tmp_path, caplog):
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)  # a folder where the PNG goes: writing it fails for real
    caplog.set_level("INFO", logger="diffalign.train")
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **{"run.max_steps": 1})])
    assert result["step"] == 1 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    warning = next(r for r in caplog.records if r.levelname == "WARNING" and "could not draw" in r.getMessage())
    assert str(out / "curves.png") in warning.getMessage()
    assert f"curves       not drawn (IsADirectoryError; `diffalign plot {out}` retries)" in caplog.text


def test_final_values_last_of_each_shown_key_in_order():
    from diffalign.training.loop import final_values

    rows = [
        {"step": 1, "guard/pick": 0.2, "reward/toy/mean": 0.1, "loss": 0.7, "lr": 1e-4, "kl": 0.0},
        {"step": 2, "loss": 0.6, "lr": 1e-4, "loss/ratio": 1.0, "flag": True},  # no round sampled: no reward keys
        {"step": 3, "loss": float("nan"), "lr": 1e-4},
    ]
    assert (
        final_values(rows)
        == "at step 3: loss nan, kl 0 (step 1), reward/toy/mean 0.1 (step 1), guard/pick 0.2 (step 1)"
    )
    assert final_values([{"step": 1, "lr": 1e-4}]) == ""
