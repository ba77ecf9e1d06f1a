"""End-to-end tests of recipes/offline_pref.py on tiny models and the shipped Pick-a-Pic fixture."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.fileio import FolderBusyError, FolderLock
from diffalign.models import lora
from diffalign.training import checkpoint, loop
from tests.recipes.conftest import (
    ROOT,
    averaged_gradients,
    child_env,
    recipe_command,
    run_subprocess,
    toy_overrides,
    two_process_command,
)


def test_toy_dpo_trains_saves_and_exports(recipe, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    extra = {"run.max_steps": 4, "run.save_every": 2, "validation.every": 4, "validation.num_inference_steps": 2}
    extra["run.report_to"] = "[tensorboard]"
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    history = result["history"]
    assert len(history) == 4
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA init: policy == reference
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] != history[0]["loss"]
    assert (out / "config.yaml").is_file()
    assert len(list((out / "validation" / "step-00000004").glob("*.png"))) == 4  # assets/prompts/validation.txt
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert [p.name for p in checkpoint.list_complete(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(str(lora_file))
    assert any("lora_B" in k for k in weights) and any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_stock_pipeline_loads_recipe_lora(recipe, tiny_dirs, tmp_path):
    import diffusers

    out = tmp_path / "run"
    recipe.main(
        ["--config", "toy/mapo", *toy_overrides(tiny_dirs["sd15"], out, **{"run.max_steps": 2, "optim.lr": 0.05})]
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd15"]))
    pipe.set_progress_bar_config(disable=True)

    def sample():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(str(out / "lora"))
    assert (sample() - before).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_recipe_runs_on_sdxl_and_sd3(recipe, tiny_dirs, tmp_path, family):
    overrides = toy_overrides(tiny_dirs[family], tmp_path / "run", **{"run.max_steps": 2, "model.family": family})
    if family == "sd3":
        overrides += ["model.timestep_sampling=logit_normal", "loss.beta=100"]
    result = recipe.main(["--config", "toy/dpo", *overrides])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_nan_stop_never_leaves_exploded_weights_as_the_latest_checkpoint(recipe, tiny_dirs, tmp_path):
    """lr=1e10: step 1's loss is finite, its update leaves finite but huge weights (saved as step 1), and step 2's
    loss is not finite: step 1 is set aside, so neither the message nor ``resume_from=latest`` offers it."""
    out = tmp_path / "huge"
    overrides = toy_overrides(tiny_dirs["sd15"], out, **{"run.max_steps": 4, "run.save_every": 1, "optim.lr": 1e10})
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2") as err:
        recipe.main(["--config", "toy/dpo", *overrides])
    assert "Last good checkpoint: none" in str(err.value) and "step-00000001.nonfinite" in str(err.value)
    assert checkpoint.latest(out / "checkpoints") is None
    assert (out / "checkpoints" / "step-00000001.nonfinite" / "trainable.safetensors").is_file()


def test_non_finite_gradient_norm_or_weights_stop_the_step(recipe, tiny_dirs, tmp_path):
    """A finite loss whose gradient is not finite stops before the update; an update to non-finite weights stops
    before the step counts (so before any checkpoint of it)."""
    cfg = dconfig.load("toy/dpo", toy_overrides(tiny_dirs["sd15"], tmp_path / "run"), schema=dconfig.OfflinePrefConfig)
    state = recipe.setup(cfg, loop.make_accelerator(cfg))
    run = state.run
    before = lora.trainable_state(run.adapter)

    def sqrt_loss(batch, seeds):  # 0 where lora_B == 0, but d sqrt(|x|)/dx there is nan
        return {"loss": sum(p.abs().sqrt().sum() for p in run.params)}

    with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 1"):
        loop.optimizer_step(run, sqrt_loss)
    assert all(torch.equal(before[k], v) for k, v in lora.trainable_state(run.adapter).items())
    run.optimizer.zero_grad(set_to_none=True)
    for group in run.optimizer.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite weights after the update of step 1"):
        loop.optimizer_step(run, partial(recipe.micro_step, state))
    assert run.step == 0


def test_resume_refuses_changed_training_settings_and_keeps_one_metrics_row_per_step(
    recipe, tiny_dirs, tmp_path, caplog
):
    """Resume from step 2 of a finished 4-step run: a changed optim.lr or batch size is refused, naming each key and
    leaving config.yaml as it was; a longer run.max_steps is applied and logged. Steps 3-4 run again (re-saving the
    existing step-4, identically) and metrics.jsonl ends with exactly one row per step."""
    out = tmp_path / "run"
    common = {"run.save_every": 2, "run.keep_last": 10, "run.log_every": 1}
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **{**common, "run.max_steps": 4})])
    first_step4 = _lora_state(out)
    saved_config = (out / "config.yaml").read_bytes()
    resume = {**common, "run.resume_from": out / "checkpoints" / "step-00000002"}
    changed = {**resume, "run.max_steps": 4, "optim.lr": 2e-3, "optim.batch_size": 2}
    with pytest.raises(dconfig.ConfigError) as err:
        recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **changed)])
    assert "optim.lr: 0.001 -> 0.002" in str(err.value) and "optim.batch_size: 4 -> 2" in str(err.value)
    assert (out / "config.yaml").read_bytes() == saved_config

    caplog.set_level("INFO", logger="diffalign.train")
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **{**resume, "run.max_steps": 5})])
    assert "run.max_steps: 4 -> 5" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    step4 = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert all(torch.equal(first_step4[k], step4[k]) for k in step4)
    assert "max_steps: 5" in (out / "config.yaml").read_text()


def test_a_second_trainer_on_the_same_output_folder_is_refused(recipe, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **{"run.max_steps": 1})]
    with FolderLock(out, "training (another trainer)"):
        with pytest.raises(FolderBusyError, match=f"training \\(another trainer\\): pid {os.getpid()} on "):
            recipe.main(argv)
        assert not (out / "config.yaml").exists()
    assert recipe.main(argv)["step"] == 1  # the lock goes with its holder
    with FolderLock(out, "check"):  # and a finished run releases its own
        pass


def _lora_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(out / "checkpoints") / "trainable.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tiny_dirs, tmp_path):
    """Kill -9 right after checkpoint 4 of 8 appears, resume with latest: final LoRA == uninterrupted run."""
    common = {"run.max_steps": 8, "run.save_every": 2, "run.keep_last": 10, "data.hflip_prob": 0.5}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = run_subprocess(recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], ref_out, **common)), ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cmd = recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], cut_out, **common))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (cut_out / "checkpoints" / "step-00000004" / "COMPLETE").exists():
        time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(cut_out / "checkpoints").name in {"step-00000004", "step-00000006"}
    assert not (cut_out / "lora").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _lora_state(ref_out), _lora_state(cut_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref_lora = load_file(str(ref_out / "lora" / "pytorch_lora_weights.safetensors"))
    cut_lora = load_file(str(cut_out / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(ref_lora[k], cut_lora[k]) for k in ref_lora)


GRAD_RTOL = 1e-4  # fp32 rounding of a DPO gradient at sigmoid(0) weights, norm-wise: see the test below


def test_two_processes_match_one_process_first_step(tiny_dirs, tmp_path, free_port):
    """accelerate --multi_gpu --num_processes 2 (gloo, CPU), batch 2 each == one process with batch 4.

    What is compared is chosen to be well-conditioned, so the tolerances follow from fp32 rounding (unit roundoff
    u = 6e-8) and hold on any CPU, whatever order its kernels and the all-reduce sum in:

    * Step 1's figures (loss, the four errors): the same groups, noise and weights on both sides; each error is a
      mean of positive squares, so summing in another order moves it by a few u: rel 1e-6.
    * The averaged gradient of step 1, read from the checkpoints' AdamW first moments (``averaged_gradients``).
      At step 1 the LoRA's B is 0, so policy == reference and every DPO weight is sigmoid(0): beta amplifies no
      rounding. Each element is the winner's minus the loser's error gradient, sums over the batch and pixels
      done in another order (batch 4 in one kernel, or 2 + 2 and the all-reduce): rounding of ~n u ~ 1e-5 of the
      terms' size (reductions over ~1e2 terms), over a difference that cancels them by up to ~10x:
      ``GRAD_RTOL`` = 1e-4 norm-wise (measured 1e-6 here, 2e-5 in the corrupt-row test). A missing or
      mis-weighted all-reduce is O(1e-1) (a process's own batch-2 gradient differs from the batch-4 one by 0.23).
    * Step 2's gradient and loss: DPO multiplies the error differences by beta/2, so their rounding (rel 1e-6 of
      errors near 1, four of them) moves the loss and the gradient's weights by up to beta/2 * 4e-6 = 1e-2 for
      beta = 5000 (measured 3e-5 on the gradient, 6e-5 on the loss); the reference errors of step 2 do not depend
      on training: rel 1e-6, the same step-2 groups and noise.

    The weights after AdamW steps are NOT compared elementwise: Adam's first update is lr * g / (|g| + eps), so an
    element whose gradient is near 0 moves by up to lr on whichever side of 0 the rounding puts it (that comparison
    failed on an Intel Xeon by 1.6e-6 with atol 1e-6 and passed on AMD EPYC).
    """
    common = {"run.max_steps": 2, "run.log_every": 1, "run.save_every": 1, "run.keep_last": 2}
    one = run_subprocess(
        recipe_command(
            "toy/dpo", toy_overrides(tiny_dirs["sd15"], tmp_path / "one", **common, **{"optim.batch_size": 4})
        ),
        ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two_cmd = [
        *recipe_command("toy/dpo", [])[:1],
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port),
        *recipe_command(
            "toy/dpo",
            toy_overrides(tiny_dirs["sd15"], tmp_path / "two", **common, **{"optim.batch_size": 2}),
        )[1:],
    ]
    env = child_env() | {"ACCELERATE_USE_CPU": "true"}
    two = subprocess.run(two_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "1 processes" in one.stderr and "2 processes" in two.stderr
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    ]
    (first_one, second_one), (first_two, second_two) = rows
    assert first_one["step"] == first_two["step"] == 1
    for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-6, abs=1e-9), key
    for key in ("loss/ref_err_w", "loss/ref_err_l"):
        assert second_two[key] == pytest.approx(second_one[key], rel=1e-6), key
    beta_rounding = 5000 / 2 * 4e-6  # toy/dpo's loss.beta
    assert second_two["loss"] == pytest.approx(second_one["loss"], rel=beta_rounding)
    (g1_one, g2_one), (g1_two, g2_two) = (averaged_gradients(tmp_path / d, 2) for d in ("one", "two"))
    assert g1_one.norm() > 0 and g2_one.norm() > 0
    assert (g1_two - g1_one).norm() <= GRAD_RTOL * g1_one.norm(), float((g1_two - g1_one).norm() / g1_one.norm())
    tol = GRAD_RTOL + beta_rounding
    assert (g2_two - g2_one).norm() <= tol * g2_one.norm(), float((g2_two - g2_one).norm() / g2_one.norm())


@pytest.mark.parametrize("b", [1, 2])
def test_two_processes_equal_one_process_with_a_corrupt_row(recipe, tiny_dirs, tmp_path, b):
    """2 processes x batch b == 1 process x batch 2b, on the fixture with its corrupt row 13: run.seed=2 puts it in
    global batch 3 for b=1 (one process's whole micro-batch is that row) and in global batch 2 for b=2.

    The loss and gradient are means over the global count of usable groups, so the weighting is the same; what is
    left is float rounding (the kernels sum in another order for another batch size). Compared where that is
    well-conditioned: the gradient norm before clipping and the averaged gradient of every step (from the AdamW
    first moments), not the weights after AdamW steps (see test_two_processes_match_one_process_first_step). Step
    1 has policy == reference: ``GRAD_RTOL``. Later steps: DPO multiplies the errors' rounding (rel 1e-6 of errors
    near 1, four of them) by beta/2, loss.beta=500: GRAD_RTOL + 250 * 4e-6 = 1.1e-3 (measured ~2e-5). Weighting per process
    instead of by the global count scales the corrupt step's gradient norm by 2 (b=1) or turns its direction by
    ~0.1 (b=2).
    """
    steps, beta = {1: 4, 2: 3}[b], 500
    common = {"run.seed": 2, "run.max_steps": steps, "run.save_every": 1, "run.keep_last": steps, "run.log_every": 1}
    common["loss.beta"] = beta
    one, two = tmp_path / "one", tmp_path / "two"
    recipe.main(
        ["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], one, **common, **{"optim.batch_size": 2 * b})]
    )
    cmd = two_process_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], two, **common, **{"optim.batch_size": b}))
    done = run_subprocess(cmd, ROOT, env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and "skipping bad row 13" in done.stderr
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["groups"] for r in rows[0]] == [r["groups"] for r in rows[1]]
    assert 2 * b - 1 in [r["groups"] for r in rows[0]]  # the step with the corrupt row
    grads = [averaged_gradients(d, steps) for d in (one, two)]
    for r1, r2, g1, g2 in zip(*rows, *grads, strict=True):
        tol = GRAD_RTOL if r1["step"] == 1 else GRAD_RTOL + beta / 2 * 4e-6
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=tol), r1["step"]
        assert float((g2 - g1).norm()) <= tol * float(g1.norm()), (r1["step"], float((g2 - g1).norm() / g1.norm()))


def test_run_start_removes_what_a_killed_rotation_left(tiny_dirs, tmp_path, caplog):
    """``loop.start`` (every recipe's first step, under the folder lock) finishes a deletion a kill cut short and
    removes an incomplete step older than latest; the complete checkpoints stay."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    for step in (2, 4):
        checkpoint.save(root, step, trainable={"w": torch.zeros(2)}, optimizer={}, state={"step": step})
    (root / "step-00000002" / "trainable.safetensors").unlink()  # killed inside an older diffalign's rmtree
    (root / ".step-00000001.deleting").mkdir()
    overrides = toy_overrides(tiny_dirs["sd15"], out, **{"run.resume_from": "latest"})  # a fresh run is refused
    cfg = dconfig.load("toy/dpo", overrides, schema=dconfig.OfflinePrefConfig)
    caplog.set_level("INFO", logger="diffalign.train")
    loop.start(cfg, loop.make_accelerator(cfg), "test run")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
    assert "removed" in caplog.text and ".step-00000001.deleting" in caplog.text
