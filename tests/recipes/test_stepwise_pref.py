"""End-to-end tests of recipes/stepwise_pref.py (SPO / LPO presets) on tiny SD1.5 and SDXL models."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.terms.stepwise import MinedPairs
from diffalign.training import checkpoint
from tests.recipes.conftest import ROOT, child_env, recipe_module, run_subprocess, two_process_command


LOG2 = torch.tensor(math.log(2)).item()  # -logsigmoid(0) in fp32


def overrides(tiny_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {"model.path": str(tiny_dir), "run.output_dir": str(out_dir), "run.report_to": "[]"}
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def command(config: str, args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "stepwise_pref.py"), "--config", config, *args]


@pytest.fixture(scope="module")
def recipe():
    return recipe_module("stepwise_pref")


@pytest.fixture(scope="module")
def spo_run(recipe, tiny_dirs, tmp_path_factory):
    """One toy SPO run on tiny SD1.5: 3 steps, checkpoints at 2 and 3, pairs stored, validation at step 3."""
    out = tmp_path_factory.mktemp("spo") / "run"
    extra = {
        "run.max_steps": 3,
        "run.save_every": 2,
        "run.log_every": 1,
        "optim.lr": 0.01,
        "stepwise.save_pairs": "true",
        "validation.every": 3,
        "validation.num_inference_steps": 2,
    }
    result = recipe.main(["--config", "toy/spo", *overrides(tiny_dirs["sd15"], out, **extra)])
    return out, result


def test_toy_spo_trains_logs_checkpoints_stores_pairs_and_exports(spo_run):
    out, result = spo_run
    history = result["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["loss"] == LOG2, "step 1 trains on pairs mined at LoRA init: every ratio is exactly 1"
    assert history[0]["loss/ratio_w"] == 1.0 and history[0]["mining/rounds"] >= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [p.name for p in checkpoint.list_complete(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    rounds = sorted((out / "pairs").glob("round-*.safetensors"))
    assert len(rounds) == result["rounds"] >= 1
    stored = MinedPairs.load(rounds[0])
    assert len(stored) > 0 and set(stored.timesteps.tolist()) <= {501, 251, 1}  # branch_start=1 of 751, 501, 251, 1
    assert bool((stored.gap > 0.05).all()) and bool((stored.score_w >= stored.score_l).all())
    assert len(list((out / "validation" / "step-00000003").glob("*.png"))) == 4
    weights = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    cfg = dconfig.load(out / "config.yaml", schema=dconfig.StepwisePrefConfig)
    assert cfg.loss.name == "spo" and cfg.loss.params == {"beta": 10.0, "eps": 0.1}


def test_stock_pipeline_loads_recipe_lora(spo_run, tiny_dirs):
    import diffusers

    out, _ = spo_run
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd15"]))
    pipe.set_progress_bar_config(disable=True)

    def sample():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(str(out / "lora"))
    assert (sample() - before).abs().max() > 1e-4


def test_toy_lpo_runs_on_sdxl(recipe, tiny_dirs, tmp_path):
    extra = {"model.family": "sdxl", "stepwise.uncond": "zeros", "run.max_steps": 2, "optim.grad_accum": 2}
    result = recipe.main(["--config", "toy/lpo", *overrides(tiny_dirs["sdxl"], tmp_path / "run", **extra)])
    assert result["history"][0]["loss"] == LOG2
    assert math.isfinite(result["history"][1]["loss"])
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_lpo_with_a_latent_reward_model_from_disk(recipe, tiny_dirs, tmp_path):
    """The real LPO scorer path: ``stepwise.scorer: {name: lrm, path: ...}`` -> ``diffalign.scorers.lrm.load``."""
    from diffalign import models
    from diffalign.scorers import lrm

    lrm.from_adapter(models.load("sd15", str(tiny_dirs["sd15"]))).save_pretrained(tmp_path / "lrm")
    extra = {"stepwise.scorer.name": "lrm", "stepwise.scorer.path": tmp_path / "lrm", "run.max_steps": 2}
    extra.update({"stepwise.threshold_min": 0.0, "stepwise.threshold_max": 0.01})
    result = recipe.main(["--config", "toy/lpo", *overrides(tiny_dirs["sd15"], tmp_path / "run", **extra)])
    assert result["history"][0]["loss"] == LOG2 and result["history"][0]["mining/kept"] > 0


def test_no_pair_passing_the_threshold_is_a_clear_error(recipe, tiny_dirs, tmp_path):
    extra = {"stepwise.threshold_min": 0.99, "stepwise.threshold_max": 0.99, "stepwise.scorer.scale": 1e-3}
    extra["stepwise.max_empty_rounds"] = 2
    with pytest.raises(RuntimeError, match="2 mining rounds in a row kept no pair"):
        recipe.main(["--config", "toy/lpo", *overrides(tiny_dirs["sd15"], tmp_path / "run", **extra)])


def test_config_checks(tmp_path):
    def load(*extra: str):
        args = [f"model.path={tmp_path}", f"run.output_dir={tmp_path}", *extra]
        return dconfig.load("toy/spo", args, schema=dconfig.StepwisePrefConfig)

    assert dconfig.schema_for_recipe("recipes/stepwise_pref.py") is dconfig.StepwisePrefConfig
    assert load().stepwise.scorer.name == "toy_decoded"
    assert type(dconfig.load("toy/lpo", [f"model.path={tmp_path}"])) is dconfig.StepwisePrefConfig  # recipe: key
    pair_loss = tmp_path / "dpo.yaml"
    pair_loss.write_text(dconfig.dumps(load()).replace("name: spo\n  beta: 10.0\n  eps: 0.1", "name: dpo"))
    with pytest.raises(dconfig.ConfigError, match="is a pair loss; stepwise_pref needs a step loss"):
        dconfig.load(pair_loss)
    with pytest.raises(dconfig.ConfigError, match="is a config for recipe 'stepwise_pref', not 'offline_pref'"):
        dconfig.load("toy/spo", schema=dconfig.OfflinePrefConfig)
    with pytest.raises(dconfig.ConfigError, match=r"model\.family='sd3' is not supported"):
        load("model.family=sd3")
    with pytest.raises(dconfig.ConfigError, match="did you mean 'toy_latent'"):
        load("stepwise.scorer.name=toy_latnt")
    with pytest.raises(dconfig.ConfigError, match=r"stepwise\.branch_start=4"):
        load("stepwise.branch_start=4")
    with pytest.raises(dconfig.ConfigError, match=r"unknown key 'stepwise\.treshold'"):
        load("stepwise.treshold=0.3")


@pytest.mark.parametrize("name", ["sd15/spo_lora", "sdxl/spo_lora", "sd15/lpo_lora", "sdxl/lpo_lora"])
def test_paper_configs_load(name):
    cfg = dconfig.load(name, schema=dconfig.StepwisePrefConfig)
    assert cfg.stepwise.num_steps == 20 and cfg.stepwise.guidance_scale == 5.0 and cfg.stepwise.eta == 1.0
    assert cfg.loss.params["beta"] == (10.0 if "spo" in name else 500.0)


def _state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(out / "checkpoints") / "trainable.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tiny_dirs, tmp_path):
    """Kill -9 once checkpoint 2 of 6 exists, resume with latest: LoRA, pair queue and exported LoRA all equal the
    uninterrupted run's (which runs alongside, to save wall time)."""
    common = {"run.max_steps": 6, "run.save_every": 1, "run.keep_last": 10, "optim.batch_size": 3}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_cmd = command("toy/lpo", overrides(tiny_dirs["sd15"], ref_out, **common))
    ref_log = open(tmp_path / "ref.log", "w")  # noqa: SIM115 (closed below; a pipe could fill and block)
    ref = subprocess.Popen(ref_cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=ref_log)
    cmd = command("toy/lpo", overrides(tiny_dirs["sd15"], cut_out, **common))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (cut_out / "checkpoints" / "step-00000002" / "COMPLETE").exists():
        time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(cut_out / "checkpoints").name in {f"step-0000000{i}" for i in range(2, 6)}
    assert not (cut_out / "lora").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref.wait(timeout=300)
    ref_log.close()
    assert ref.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    a, b = _state(ref_out), _state(cut_out)
    assert a.keys() == b.keys() and any(k.startswith("queue.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref_lora = load_file(str(ref_out / "lora" / "pytorch_lora_weights.safetensors"))
    cut_lora = load_file(str(cut_out / "lora" / "pytorch_lora_weights.safetensors"))
    assert ref_lora.keys() == cut_lora.keys() and all(torch.equal(ref_lora[k], cut_lora[k]) for k in ref_lora)


@pytest.mark.slow
def test_two_processes_mine_and_train_like_one(recipe, tiny_dirs, tmp_path, free_port):
    """accelerate, 2 CPU processes with 2 prompts / 2 pairs each == one process with 4 / 4 (opt-in: ~30 s)."""
    common = {"run.max_steps": 2, "run.log_every": 1, "stepwise.save_pairs": "true"}
    one = tmp_path / "one"
    one_args = {"stepwise.sample_batch_size": 4, "optim.batch_size": 4, **common}
    recipe.main(["--config", "toy/lpo", *overrides(tiny_dirs["sd15"], one, **one_args)])
    two = tmp_path / "two"
    two_args = {"stepwise.sample_batch_size": 2, "optim.batch_size": 2, **common}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--main_process_port", str(free_port)]
    cmd = [*launch, *command("toy/lpo", overrides(tiny_dirs["sd15"], two, **two_args))[1:]]
    done = subprocess.run(
        cmd, cwd=ROOT, env=child_env() | {"ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr
    a = MinedPairs.load(one / "pairs" / "round-00000000.safetensors")
    b = MinedPairs.load(two / "pairs" / "round-00000000.safetensors")
    assert a.prompts == b.prompts and torch.equal(a.step_index, b.step_index)
    for key, value in a.tensors().items():
        torch.testing.assert_close(b.tensors()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    first, second = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert first[0]["loss"] == second[0]["loss"] == LOG2
    # after one update, all-reduce rounding (~1e-8 in the LoRA) is amplified by beta = 500
    assert second[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-3)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_one_process_resumes_a_two_process_run_with_the_same_global_batches(tiny_dirs, tmp_path):
    """A 2-process LPO run (2 pairs x 2 processes a step, 2 prompts x 2 processes a mining round), checkpointed at
    step 2, resumes on 1 process with the same global batches: the queue (global, identical on every process) and
    the round counter carry over, round r mines prompt positions [4r, 4r + 4) either way, so the same pairs train in
    the same steps (step 4 mines a round). Keeping the per-process sample_batch_size is refused before any model
    loads, naming the value to set (~60 s, opt-in)."""
    common = {"run.max_steps": 5, "run.save_every": 1, "run.keep_last": 10, "run.log_every": 1}
    two = tmp_path / "two"
    args = overrides(tiny_dirs["sd15"], two, **common, **{"optim.batch_size": 2})
    cmd = two_process_command("toy/lpo", args, recipe="stepwise_pref")
    done = run_subprocess(cmd, ROOT, env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    ref = _losses(two)
    assert checkpoint.saved_state(checkpoint.step_dir(two / "checkpoints", 2))["num_processes"] == 2

    def resume(name: str, **settings: object) -> tuple[Path, subprocess.CompletedProcess]:
        out = tmp_path / name
        shutil.copytree(two, out)
        shutil.rmtree(out / "lora")
        for step in range(3, 6):
            shutil.rmtree(checkpoint.step_dir(out / "checkpoints", step))
        args = overrides(tiny_dirs["sd15"], out, **common, **settings, **{"run.resume_from": "latest"})
        return out, run_subprocess(command("toy/lpo", args), ROOT)

    # the per-process mining batch kept: round 1 would mine positions [2, 4) again on 1 process
    out, refused = resume("kept", **{"optim.batch_size": 4})
    assert refused.returncode != 0
    assert "set stepwise.sample_batch_size=4" in refused.stderr and "resumed from" not in refused.stderr
    line = next(x for x in refused.stderr.splitlines() if "cannot resume" in x)
    assert "Traceback" not in refused.stderr and "stepwise.sample_batch_size=2 (4 over all processes)" in line

    # each micro-batch the pairs one process had, summed over 2 micro-batches as the all-reduce summed 2 processes:
    # the same float operations (a + b, then the exact / 2), so bitwise here; mining 4 prompts in one batch instead
    # of 2 + 2 is the one place where CPU kernels could round differently (they did not on this machine).
    same = {"optim.batch_size": 2, "optim.grad_accum": 2, "stepwise.sample_batch_size": 4}
    out, resumed = resume("accum", **same)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming on 1 processes a checkpoint of 2" in resumed.stderr
    got = _losses(out)
    assert [got[s] for s in range(3, 6)] == pytest.approx([ref[s] for s in range(3, 6)], rel=1e-6, abs=0)
    a, b = _state(two), _state(out)
    assert a.keys() == b.keys() and any(k.startswith("queue.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)

    # one micro-batch of 4 pairs: the loss is a mean over 4 instead of two means over 2 (fp32 rounding ~1e-7), which
    # LPO's beta = 500 amplifies in the next steps' log-ratios, as in test_two_processes_mine_and_train_like_one
    out, resumed = resume("whole", **{"optim.batch_size": 4, "stepwise.sample_batch_size": 4})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _losses(out)
    assert got[3] == pytest.approx(
        ref[3], rel=1e-6
    )  # the checkpoint's LoRA on the checkpoint's queue: only the step's own sums differ
    assert [got[s] for s in range(4, 6)] == pytest.approx([ref[s] for s in range(4, 6)], rel=1e-3)


def test_resume_on_another_process_count_keeps_both_global_batches(monkeypatch, tmp_path):
    """The config check of a resume on another process count (no model): a 2-process checkpoint (2 pairs, 3 prompts a
    round per process) resumes on 1 process with 4 pairs and 6 prompts; every other split is refused in one line
    naming each key and value to set, or why no whole value exists."""
    from diffalign.training import rundir

    def cfg(*extra: str):
        return dconfig.load("toy/lpo", [f"run.output_dir={tmp_path}", *extra])

    saved = dconfig.to_dict(cfg("optim.batch_size=2", "stepwise.sample_batch_size=3"))
    monkeypatch.setattr(checkpoint, "saved_state", lambda path: {"config": saved, "num_processes": 2})
    ok = cfg("optim.batch_size=4", "stepwise.sample_batch_size=6")
    assert rundir.resume_problem(ok, tmp_path, 1) is None
    assert (
        rundir.resume_problem(
            cfg("optim.batch_size=2", "optim.grad_accum=2", "stepwise.sample_batch_size=6"), tmp_path, 1
        )
        is None
    )
    kept = rundir.resume_problem(cfg("optim.batch_size=4", "stepwise.sample_batch_size=3"), tmp_path, 1)
    assert kept.endswith("stepwise.sample_batch_size=3 (6 over all processes); set stepwise.sample_batch_size=6")
    both = rundir.resume_problem(cfg("optim.batch_size=2", "stepwise.sample_batch_size=3"), tmp_path, 1)
    assert "set optim.batch_size x optim.grad_accum to 4 per process and stepwise.sample_batch_size=6" in both
    uneven = rundir.resume_problem(cfg("optim.batch_size=1", "stepwise.sample_batch_size=1"), tmp_path, 4)
    assert "stepwise.sample_batch_size=1.5 (not a whole number: resume on a process count that divides 6)" in uneven
    assert all("\n" not in problem for problem in (kept, both, uneven))
    # the same process count: the per-process value is the run's own setting, as any other key
    monkeypatch.setattr(checkpoint, "saved_state", lambda path: {"config": saved, "num_processes": 1})
    assert "stepwise.sample_batch_size: 3 -> 6" in rundir.resume_problem(ok, tmp_path, 1)
