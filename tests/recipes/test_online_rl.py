"""End-to-end tests of recipes/online_rl.py (Flow-GRPO preset on tiny SD3, DDPO preset on tiny SD1.5)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.training import checkpoint
from tests.recipes.conftest import ROOT, averaged_gradients, child_env, recipe_module, run_subprocess


def overrides(tiny_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {"model.path": str(tiny_dir), "run.output_dir": str(out_dir), "run.report_to": "[]"}
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def recipe():
    return recipe_module("online_rl")


@pytest.fixture(scope="module")
def grpo_run(recipe, tiny_dirs, tmp_path_factory):
    """Toy Flow-GRPO on tiny SD3: 2 rounds (= 2 optimizer steps), a checkpoint after each."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    args = overrides(tiny_dirs["sd3"], out, **{"run.max_steps": 2, "run.save_every": 1})
    return out, recipe.main(["--config", "toy/grpo", *args])


def test_toy_grpo_trains_logs_and_exports(grpo_run):
    out, result = grpo_run
    history = result["history"]
    assert len(history) == 2 and result["rounds"] == 2 and all(math.isfinite(h["loss"]) for h in history)
    first = history[0]
    assert first["loss/ratio_min"] == first["loss/ratio_max"] == 1.0, "rollout and update log-probs are one function"
    assert first["loss/clip_frac"] == 0.0 and first["loss/approx_kl"] == 0.0 and first["loss/kl"] == 0.0
    assert history[1]["loss/kl"] > 0  # the LoRA moved away from the reference after step 1
    for key in ("reward/toy_pixel/mean", "reward/toy_pixel/std", "zero_std_frac", "grad_norm", "adv_clip_frac"):
        assert key in first and math.isfinite(first[key]), key
    assert first["groups"] == 8 * 3  # 8 kept samples x 3 trained steps (4-step grid, last step not trained)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    weights = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_resume_equals_uninterrupted(recipe, grpo_run, tiny_dirs, tmp_path):
    """1 step, stop, resume to 2: the same LoRA as the uninterrupted 2-step run (rollout seeds, round, optimizer)."""
    out = tmp_path / "run"
    recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], out, **{"run.max_steps": 1})])
    resumed = recipe.main(
        [
            "--config",
            "toy/grpo",
            *overrides(tiny_dirs["sd3"], out, **{"run.max_steps": 2, "run.resume_from": "latest"}),
        ]
    )
    assert resumed["step"] == 2 and resumed["rounds"] == 2
    want = load_file(str(grpo_run[0] / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert want.keys() == got.keys() and all(bool((want[k] == got[k]).all()) for k in want)


def test_toy_ddpo_on_sd15(recipe, tiny_dirs, tmp_path):
    result = recipe.main(
        ["--config", "toy/ddpo", *overrides(tiny_dirs["sd15"], tmp_path / "run", **{"run.max_steps": 1})]
    )
    h = result["history"][0]
    assert math.isfinite(h["loss"]) and h["loss/ratio_min"] == h["loss/ratio_max"] == 1.0 and h["grad_norm"] > 0


def test_two_updates_per_round_clip_the_second(recipe, tiny_dirs, tmp_path):
    """Flow-GRPO's 2 updates per round: the second half of the round's micro-batches meets the moved policy."""
    extra = {"run.max_steps": 2, "run.save_every": 2, "online.updates_per_round": 2, "optim.grad_accum": 3}
    result = recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], tmp_path / "run", **extra)])
    first, second = result["history"]
    assert result["rounds"] == 1 and "reward/toy_pixel/mean" in first and "reward/toy_pixel/mean" not in second
    assert first["loss/ratio_min"] == first["loss/ratio_max"] == 1.0 and first["groups"] == 4 * 3
    assert second["loss/ratio_min"] != second["loss/ratio_max"] and second["loss/approx_kl"] > 0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.grad_accum=4", "grad_accum"),
        ("loss={name: dpo, beta: 5000}", "policy loss"),
        ("lora.dropout=0.1", "lora.dropout"),
        ("online.group_size=1", "group_size"),
        ("online.noise_level=0", "noise_level"),
        ("online.updates_per_round=3", "updates_per_round"),
    ],
)
def test_config_checks(override, match):
    with pytest.raises(dconfig.ConfigError, match=match):
        dconfig.load("toy/grpo", ["run.output_dir=x", override])


@pytest.mark.parametrize(
    "name",
    ["sd3/grpo_pickscore", "sd15/ddpo_aesthetic", "flux/grpo_hps", "toy/ddpo", "toy/grpo_world", "toy/ddpo_world"],
)
def test_paper_configs_load(name):
    cfg = dconfig.load(name)
    assert cfg.loss.name == "grpo" and cfg.optim.grad_accum % cfg.online.trained_steps_per_round() == 0


@pytest.mark.slow
def test_two_processes_train_like_one(grpo_run, tiny_dirs, tmp_path, free_port):
    """accelerate, 2 CPU processes with 4 samples each == one process with 8 (same rewards, advantages and update up to
    all-reduce rounding). Opt-in (-m slow): ~15 s on 2 cores.

    Compared where it is well-conditioned, with tolerances from fp32 rounding (u = 6e-8): round 1 samples with the
    same weights, so its rewards are equal and its averaged gradient (read back from the AdamW first moments) differs
    only in summation order: rel 1e-5 (measured 5e-8). Round 2 samples with weights one update apart; its rewards
    (~55, std ~8) differ by rounding (rel 1e-5; measured 6e-8), which the advantages divide by the std: rel 1e-4 on
    its gradient (measured 1e-6). Not compared: the weights after AdamW steps (an element with a near-zero gradient
    moves by up to lr on either side of 0, see test_offline_pref) and round 2's loss, a mean of advantages that
    cancels to ~1e-8."""
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--main_process_port", str(free_port), str(ROOT / "recipes" / "online_rl.py")]
    args = overrides(tiny_dirs["sd3"], two, **{"run.max_steps": 2, "run.save_every": 1, "optim.grad_accum": 3})
    done = subprocess.run(
        [*launch, "--config", "toy/grpo", *args], cwd=ROOT, env=child_env() | {"ACCELERATE_USE_CPU": "true"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one_rows, two_rows = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (grpo_run[0], two)
    )
    assert one_rows[0]["reward/toy_pixel/mean"] == two_rows[0]["reward/toy_pixel/mean"]
    assert one_rows[0]["grad_norm"] == pytest.approx(two_rows[0]["grad_norm"], rel=1e-5)
    assert two_rows[1]["reward/toy_pixel/mean"] == pytest.approx(one_rows[1]["reward/toy_pixel/mean"], rel=1e-5)
    (g1, g2), (h1, h2) = (averaged_gradients(d, 2) for d in (grpo_run[0], two))
    assert float((h1 - g1).norm()) <= 1e-5 * float(g1.norm()), float((h1 - g1).norm() / g1.norm())
    assert float((h2 - g2).norm()) <= 1e-4 * float(g2.norm()), float((h2 - g2).norm() / g2.norm())


def test_nan_stop_saves_nothing_corrupt(recipe, tiny_dirs, tmp_path):
    """lr=1e10: round 1's loss is finite and its update leaves huge weights (saved as step 1); round 2's log-probs are
    not finite: the run stops with FloatingPointError, step 1 is set aside, no LoRA is exported."""
    out = tmp_path / "huge"
    extra = {"run.max_steps": 4, "run.save_every": 1, "optim.lr": 1e10}
    with pytest.raises(FloatingPointError, match="non-finite") as err:
        recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], out, **extra)])
    assert "Last good checkpoint: none" in str(err.value)
    assert checkpoint.latest(out / "checkpoints") is None
    assert not (out / "lora").exists()


def test_window_rounds_are_not_a_nan_stop(recipe, tiny_dirs, tmp_path):
    """MixGRPO's window: the ODE steps outside it store NaN log-probs by design; the rollout NaN stop ignores them."""
    extra = {"run.max_steps": 1, "online.train_steps": "window", "online.window_size": 2, "optim.grad_accum": 4}
    result = recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], tmp_path / "run", **extra)])
    h = result["history"][0]
    assert math.isfinite(h["loss"]) and h["groups"] == 8 * 2 and h["loss/ratio_min"] == h["loss/ratio_max"] == 1.0


def test_sigkill_then_resume_equals_uninterrupted(recipe, tiny_dirs, tmp_path):
    """kill -9 once checkpoint 1 of 3 is written (during round 2, or 3 on a slow machine), resume with latest: the
    final LoRA equals the uninterrupted 3-round run's bit for bit (rollout seeds, round counter and optimizer come
    from the checkpoint)."""
    common = {"run.max_steps": 3, "run.save_every": 1, "run.keep_last": 10}
    recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], tmp_path / "ref", **common)])
    out = tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "recipes" / "online_rl.py"), "--config", "toy/grpo"]
    cmd += overrides(tiny_dirs["sd3"], out, **common)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "step-00000001" / "COMPLETE").exists():
        time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(out / "checkpoints").name in {"step-00000001", "step-00000002"}
    assert not (out / "lora").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want = load_file(str(tmp_path / "ref" / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_heldout_scores_guards_and_curves(recipe, tiny_dirs, tmp_path):
    """validation.every=2 with log_every=5: the held-out rewards and guards of step 2 are logged on their own row
    (step 2 is no logging step) and in the step's history, and curves.png is drawn."""
    from PIL import Image

    out = tmp_path / "run"
    extra = {
        "run.max_steps": 2,
        "run.log_every": 5,
        "validation.every": 2,
        "online.guard_scorers": "[toyprominence]",
        "validation.prompts_file": "null",  # toy-world captions: what the toy guard reads
        "validation.prompts": "['a red circle on a blue background', 'a red circle on a yellow background']",
    }
    result = recipe.main(["--config", "toy/grpo", *overrides(tiny_dirs["sd3"], out, **extra)])
    first, second = result["history"]
    assert "heldout/toy_pixel" not in first
    held = {k: v for k, v in second.items() if k.startswith("heldout/")}
    assert set(held) == {"heldout/toy_pixel", "heldout/guard/toyprominence"}
    assert all(math.isfinite(v) for v in held.values()) and 0.0 <= held["heldout/guard/toyprominence"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {k: rows[1][k] for k in held} == held
    with Image.open(out / "curves.png") as image:  # drawn at the end of the run from every logged metric
        assert image.format == "PNG" and image.size[0] > 0


def test_guard_scorers_need_heldout_prompts_and_a_cadence():
    base = ["model.path=x", "run.output_dir=y"]
    with pytest.raises(dconfig.ConfigError, match=r"set validation\.every > 0"):
        dconfig.load("toy/grpo", overrides=[*base, "online.guard_scorers=[toyprominence]"])
    with pytest.raises(dconfig.ConfigError, match="did you mean 'toyprominence'"):
        dconfig.load("toy/grpo", overrides=[*base, "validation.every=1", "online.guard_scorers=[toyprominance]"])
