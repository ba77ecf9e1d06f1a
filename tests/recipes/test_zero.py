"""DeepSpeed ZeRO-2 / ZeRO-3 (``training.zero``) on 2 CPU processes (gloo), launched as a user does: ``accelerate launch
--config_file diffalign/recipes/accelerate/zero2.yaml`` (what ``diffalign run --distributed zero2`` runs; zero3 alike).

Tolerances as in test_fsdp.py, whose docstring derives them: a ZeRO run and a DDP run of the same global batch see the
same weights and data and differ only in the order of the gradient sums (DeepSpeed's reduce-scatter / all-reduce of
``loss * n * W / count`` against diffalign's one flat all-reduce of the sums), so step 1's figures agree to rel 1e-6 and
its averaged gradient (read back from the AdamW first moments of the consolidated checkpoints) to ``GRAD_RTOL``;
step 2 adds DPO's beta amplification (``BETA_ROUNDING``). Runs with the same process count and stage are bitwise
equal (a resumed run against the uninterrupted one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.errors import UserError
from diffalign.training import checkpoint, state_io, zero
from tests.conftest import unused_port
from tests.recipes.conftest import (
    ROOT,
    kill_once_saved,
    recipe_command,
    run_subprocess,
    toy_overrides,
    two_process_command,
)
from tests.recipes.test_fsdp import BETA_ROUNDING, CPU, gradients, rows, steps
from tests.recipes.test_fsdp_online import STEP1_RTOL, STEP2_RTOL, lora_names, overrides, relative
from tests.recipes.test_offline_pref import GRAD_RTOL
from tests.recipes.test_reward_grad import FAST


COMMON = {"run.max_steps": 4, "run.log_every": 1, "run.save_every": 1, "run.keep_last": 10, "optim.batch_size": 2}


def zero_command(kind: str, overrides: list[str], config: str = "toy/dpo", recipe: str = "offline_pref") -> list[str]:
    """``recipe_command`` under ``accelerate launch --config_file <kind>.yaml --num_processes 2`` (a free port)."""
    cmd = recipe_command(config, overrides, recipe)
    shipped = ROOT / "diffalign" / "recipes" / "accelerate" / f"{kind}.yaml"
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(shipped), "--num_processes", "2"]
    return [cmd[0], *launch, "--main_process_port", str(unused_port()), *cmd[1:]]


def launch(cmd: list[str], stage: int | None) -> str:
    done = run_subprocess(cmd, ROOT, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    assert (f"DeepSpeed ZeRO-{stage} over the" in done.stderr) == (stage is not None)
    return done.stderr


def tensors_equal(a: Path, b: Path) -> None:
    """Two consolidated checkpoints (or LoRA folders) hold bitwise the same tensors."""
    name = "trainable.safetensors" if (a / "trainable.safetensors").exists() else "pytorch_lora_weights.safetensors"
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), [
        k for k in x if not torch.equal(x[k], y[k])
    ]
    if name == "trainable.safetensors":
        p, q = state_io.load(a / "optimizer"), state_io.load(b / "optimizer")
        assert p["state"].keys() == q["state"].keys()
        for i in p["state"]:
            assert all(torch.equal(p["state"][i][k], q["state"][i][k]) for k in p["state"][i]), i


@pytest.fixture(scope="module")
def dpo_runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """LoRA DPO, 2 processes x batch 2: 4 steps under ZeRO-2, 2 under ZeRO-3 and under DDP, a checkpoint every step."""
    root = tmp_path_factory.mktemp("zero")
    out = {k: root / k for k in ("zero2", "zero3", "ddp")}
    launch(zero_command("zero2", toy_overrides(tiny_dirs["sd15"], out["zero2"], **COMMON)), 2)
    two = {**COMMON, "run.max_steps": 2}
    launch(zero_command("zero3", toy_overrides(tiny_dirs["sd15"], out["zero3"], **two)), 3)
    launch(two_process_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], out["ddp"], **two)), None)
    return out


# ~60 s: three 2-process launches (the fixture shared with the next three tests)
def test_lora_dpo_under_zero2_and_zero3_equals_ddp(dpo_runs, tiny_dirs):
    """Both stages against DDP, step by step (module docstring): the figures of step 1 to rel 1e-6, its averaged
    gradient to ``GRAD_RTOL``; step 2 to ``BETA_ROUNDING`` (loss) and ``GRAD_RTOL + BETA_ROUNDING`` (gradient). A
    gradient divided once more by the accumulation or the process count, or reduced twice, is off by a factor 2."""
    names = lora_names("sd15", tiny_dirs["sd15"], "toy/dpo")
    d1, d2 = rows(dpo_runs["ddp"])
    g1_d, g2_d = gradients(steps(dpo_runs["ddp"], 1, 2), names)
    assert g1_d.norm() > 0 and g2_d.norm() > 0
    for kind in ("zero2", "zero3"):
        z1, z2 = rows(dpo_runs[kind])[:2]
        for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l"):
            assert z1[key] == pytest.approx(d1[key], rel=1e-6, abs=1e-9), (kind, key)
        assert z1["grad_norm"] == pytest.approx(d1["grad_norm"], rel=GRAD_RTOL), kind
        assert z2["loss"] == pytest.approx(d2["loss"], rel=BETA_ROUNDING), kind
        g1, g2 = gradients(steps(dpo_runs[kind], 1, 2), names)
        assert relative(g1, g1_d) <= GRAD_RTOL, (kind, relative(g1, g1_d))
        assert relative(g2, g2_d) <= GRAD_RTOL + BETA_ROUNDING, (kind, relative(g2, g2_d))


def test_zero_checkpoints_are_consolidated_and_the_lora_loads(dpo_runs, stock_pipes):
    """A ZeRO checkpoint is the unsharded layout (whole trained tensors, torch's optimizer state by parameter order,
    safetensors, every process's RNG); the ZeRO-3 export is gathered whole: a stock pipeline loads both LoRAs, and
    step 2's LoRA of ZeRO-2 and ZeRO-3 agree to Adam's rounding."""
    for kind in ("zero2", "zero3"):
        path = checkpoint.latest(dpo_runs[kind] / "checkpoints")
        assert checkpoint.is_complete(path) and not checkpoint.is_sharded(path)
        listed = json.loads((path / checkpoint.MARKER).read_text())["files"]
        assert {"trainable.safetensors", "rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(listed), listed
        saved = state_io.load(path / "optimizer")
        assert len(saved["param_groups"]) == 1 and set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(saved["state"][0]["step"]) == checkpoint.saved_state(path)["step"]
        stock_pipes["sd15"].load_lora_weights(str(dpo_runs[kind] / "lora"))
        stock_pipes["sd15"].unload_lora_weights()
    a = load_file(str(checkpoint.step_dir(dpo_runs["zero2"] / "checkpoints", 2) / "trainable.safetensors"))
    b = load_file(str(dpo_runs["zero3"] / "lora" / "pytorch_lora_weights.safetensors"))
    assert len(a) == len(b) > 0
    for (ka, va), vb in zip(sorted(a.items()), [b[k] for k in sorted(b)], strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=2 * 1e-3, msg=ka)  # lr 1e-3 per Adam step, 2 steps


# ~20 s: one 1-process run
def test_one_process_resumes_a_zero_checkpoint(dpo_runs, tiny_dirs, tmp_path):
    """Step 2 of the 2 x 2 ZeRO-2 run resumed on ONE process with batch 4 (the same global batch): steps 3 and 4
    agree with the ZeRO-2 run's (``BETA_ROUNDING`` on the loss, ``GRAD_RTOL + BETA_ROUNDING`` on the gradients)."""
    start, one = checkpoint.step_dir(dpo_runs["zero2"] / "checkpoints", 2), tmp_path / "one"
    args = toy_overrides(tiny_dirs["sd15"], one, **{**COMMON, "optim.batch_size": 4, "run.resume_from": start})
    done = run_subprocess(recipe_command("toy/dpo", args), ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {start} at step 2" in done.stderr
    resumed, z = rows(one), rows(dpo_runs["zero2"])
    assert [r["step"] for r in resumed] == [3, 4]
    for r, s in zip(resumed, z[2:], strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=BETA_ROUNDING), r["step"]
    names = lora_names("sd15", tiny_dirs["sd15"], "toy/dpo")
    for a, b in zip(
        gradients([start, *steps(one, 3, 4)], names), gradients(steps(dpo_runs["zero2"], 2, 3, 4), names), strict=True
    ):
        assert relative(a, b) <= GRAD_RTOL + BETA_ROUNDING, relative(a, b)


# ~45 s: a killed launch and a resumed one
def test_zero2_sigkill_then_resume_equals_uninterrupted(dpo_runs, tiny_dirs, tmp_path):
    """kill -9 (the launcher and both trainers) once checkpoint 2 of 4 is complete, resume with latest on 2 ZeRO-2
    processes: the weights, the AdamW state and the exported LoRA equal the uninterrupted run's bit for bit (the
    consolidated state goes back into the same partitions; the sums run in the same order)."""
    cut = tmp_path / "cut"
    cmd = zero_command("zero2", toy_overrides(tiny_dirs["sd15"], cut, **COMMON))
    kill_once_saved(cmd, cut, 2, CPU)
    assert checkpoint.latest(cut / "checkpoints").name in {"step-00000002", "step-00000003"}
    assert not (cut / "lora").exists()
    err = launch([*cmd, "run.resume_from=latest"], 2)
    assert "resumed from" in err
    tensors_equal(*(checkpoint.latest(d / "checkpoints") for d in (dpo_runs["zero2"], cut)))
    tensors_equal(dpo_runs["zero2"] / "lora", cut / "lora")


# ~60 s: a 1-process run, a 2-process ZeRO-3 launch and its resume
def test_full_mode_dpo_under_zero3_equals_one_process(tiny_dirs, tmp_path):
    """Full fine-tuning (every UNet weight trained, a frozen fp32 reference copy partitioned like them) under ZeRO-3 on
    2 processes x batch 2 == the 1-process full-mode run with batch 4 (the derivation of the module docstring over all
    203k weights); the export is one diffusers folder gathered from the partitions; step 1's checkpoint resumed on
    2 ZeRO-3 processes gives step 2's weights and AdamW state bit for bit."""
    from diffusers import UNet2DConditionModel

    from diffalign import models
    from diffalign.models import full, lora

    common = {**COMMON, "run.max_steps": 2, "train.mode": "full", "optim.lr": 1e-5}
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    done = run_subprocess(
        recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], one, **{**common, "optim.batch_size": 4})), ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    err = launch(zero_command("zero3", toy_overrides(tiny_dirs["sd15"], two, **common)), 3)
    assert "ZeRO-3: the frozen reference copy is partitioned" in err
    (o1, o2), (t1, t2) = rows(one), rows(two)
    for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l"):
        assert t1[key] == pytest.approx(o1[key], rel=1e-6, abs=1e-9), key
    for key in ("loss/ref_err_w", "loss/ref_err_l"):  # the partitioned frozen copy gives the same reference errors
        assert t2[key] == pytest.approx(o2[key], rel=1e-6), key
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    full.make_full(adapter)
    names = list(lora.trainable_parameters(adapter))
    (g1_o, g2_o), (g1_t, g2_t) = gradients(steps(one, 1, 2), names), gradients(steps(two, 1, 2), names)
    assert relative(g1_t, g1_o) <= GRAD_RTOL, relative(g1_t, g1_o)
    assert relative(g2_t, g2_o) <= GRAD_RTOL + BETA_ROUNDING, relative(g2_t, g2_o)
    a, b = (UNet2DConditionModel.from_pretrained(str(d / "unet")).state_dict() for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:  # two Adam steps of lr 1e-5 apart at most
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2 * 1e-5 + 1e-6, msg=k)
    start = checkpoint.step_dir(two / "checkpoints", 1)
    launch(zero_command("zero3", toy_overrides(tiny_dirs["sd15"], again, **{**common, "run.resume_from": start})), 3)
    tensors_equal(checkpoint.step_dir(two / "checkpoints", 2), checkpoint.step_dir(again / "checkpoints", 2))


# ~45 s: a ZeRO-3 and a DDP launch of 2 rounds
def test_grpo_under_zero3_equals_ddp(tiny_dirs, tmp_path):
    """Flow-GRPO's rollouts with partitioned weights (every process samples the same calls: the forwards gather the
    weights) are DDP's bitwise in round 1; the first ratio is exactly 1; the gradients agree to rounding."""
    runs = {k: tmp_path / k for k in ("zero3", "ddp")}
    grpo = {"run.max_steps": 2, "run.save_every": 1, "run.keep_last": 10, "optim.grad_accum": 3}
    launch(zero_command("zero3", overrides(tiny_dirs["sd3"], runs["zero3"], **grpo), "toy/grpo", "online_rl"), 3)
    launch(two_process_command("toy/grpo", overrides(tiny_dirs["sd3"], runs["ddp"], **grpo), "online_rl"), None)
    (z1, z2), (d1, d2) = rows(runs["zero3"]), rows(runs["ddp"])
    assert z1["reward/toy_pixel/mean"] == d1["reward/toy_pixel/mean"]
    assert z1["loss/ratio_min"] == z1["loss/ratio_max"] == 1.0 and z1["groups"] == d1["groups"] == 24
    assert z2["reward/toy_pixel/mean"] == pytest.approx(d2["reward/toy_pixel/mean"], rel=STEP1_RTOL)
    names = lora_names("sd3", tiny_dirs["sd3"], "toy/grpo")
    (g1_z, g2_z), (g1_d, g2_d) = (gradients(steps(runs[k], 1, 2), names) for k in ("zero3", "ddp"))
    assert relative(g1_z, g1_d) <= STEP1_RTOL and relative(g2_z, g2_d) <= STEP2_RTOL, (
        relative(g1_z, g1_d),
        relative(g2_z, g2_d),
    )


# ~40 s: a ZeRO-2 and a DDP launch of 2 steps
def test_refl_under_zero2_equals_ddp(tiny_dirs, tmp_path):
    """ReFL's reward gradient through the decoded x0 under ZeRO-2 == DDP (step 1's rewards bitwise, the gradients to
    rounding), with clipping by DeepSpeed (``optim.max_grad_norm``) reporting the same norm as diffalign's."""
    runs = {k: tmp_path / k for k in ("zero2", "ddp")}
    refl = {**FAST, "run.save_every": 1, "run.keep_last": 10, "run.max_steps": 2}
    launch(
        zero_command("zero2", overrides(tiny_dirs["sd15"], runs["zero2"], **refl), "toy/refl_world", "reward_grad"), 2
    )
    launch(
        two_process_command("toy/refl_world", overrides(tiny_dirs["sd15"], runs["ddp"], **refl), "reward_grad"), None
    )
    (z1, z2), (d1, d2) = rows(runs["zero2"]), rows(runs["ddp"])
    for key in ("reward/toyreward", "loss", "rollout/grad_start"):
        assert z1[key] == d1[key], key
    assert z1["grad_norm"] == pytest.approx(d1["grad_norm"], rel=STEP1_RTOL)
    assert z2["reward/toyreward"] == pytest.approx(d2["reward/toyreward"], rel=STEP1_RTOL)
    names = lora_names("sd15", tiny_dirs["sd15"], "toy/refl_world")
    (g1_z, g2_z), (g1_d, g2_d) = (gradients(steps(runs[k], 1, 2), names) for k in ("zero2", "ddp"))
    assert relative(g1_z, g1_d) <= STEP1_RTOL and relative(g2_z, g2_d) <= STEP2_RTOL


# ---- on a GPU (the GPU suite's pytest part: pytest -m gpu) -----------------------------------------------------
def zero_one_process_matches_plain(tiny_dirs, tmp_path, kind: str, env: dict[str, str], extra: dict) -> None:
    """One process under ZeRO (``kind``) against the plain 1-process run of the same config: step 1's figures (the
    same weights and kernels: rel 1e-5), its averaged gradient (the scaling ``loss * n / count`` against the sum then
    the division: ``GRAD_RTOL``) and step 2's loss (one Adam update's rounding through DPO's beta: ``BETA_ROUNDING``).
    """
    runs = {k: tmp_path / k for k in (kind, "plain")}
    settings = {**COMMON, "run.max_steps": 2, "optim.batch_size": 4, **extra}
    cmd = recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], runs[kind], **settings))
    shipped = ROOT / "diffalign" / "recipes" / "accelerate" / f"{kind}.yaml"
    launch_args = ["-m", "accelerate.commands.launch", "--config_file", str(shipped), "--num_processes", "1"]
    cmd = [cmd[0], *launch_args, "--main_process_port", str(unused_port()), *cmd[1:]]
    done = run_subprocess(cmd, ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{kind[-1]} over the unet" in done.stderr
    plain = run_subprocess(
        recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], runs["plain"], **settings)), ROOT
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    (z1, z2), (p1, p2) = rows(runs[kind]), rows(runs["plain"])
    for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l", "grad_norm"):
        assert z1[key] == pytest.approx(p1[key], rel=1e-5, abs=1e-9), key
    assert z2["loss"] == pytest.approx(p2["loss"], rel=BETA_ROUNDING)
    names = lora_names("sd15", tiny_dirs["sd15"], "toy/dpo")
    (g1,) = gradients(steps(runs[kind], 1), names)
    (g1_p,) = gradients(steps(runs["plain"], 1), names)
    assert relative(g1, g1_p) <= GRAD_RTOL, relative(g1, g1_p)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_zero_on_one_gpu_equals_the_plain_run(tiny_dirs, tmp_path, kind):
    """On CUDA with nccl, bf16 autocast and torch's fused AdamW stepping DeepSpeed's fp32 partitions: what the CPU
    tests above cannot reach (``zero_one_process_matches_plain``)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    zero_one_process_matches_plain(tiny_dirs, tmp_path, kind, {}, {"run.mixed_precision": "bf16"})


# ---- without a launch -------------------------------------------------------------------------------------------
def test_take_over_and_the_plan_from_accelerates_variables(tmp_path):
    """``sharding.take_over`` turns a DeepSpeed launch into diffalign's; the plan reads the stage and offload devices
    accelerate launch exported, or a user's DeepSpeed JSON (its zero_optimization section as it is); stage 1 and a
    JSON that is not are one line each."""
    from diffalign.training import sharding

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] = env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] = "cpu"
    sharding.take_over(env)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "false" and env[zero.FLAG] == "1"
    assert sharding.plan(env) is None  # not an FSDP run
    spec = zero.plan(env)
    assert spec.zero_section() == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert zero.plan({zero.FLAG: "1", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}).zero_section() == {
        "stage": 2
    }
    assert zero.plan({}) is None
    with pytest.raises(UserError, match="zero_stage=1: diffalign runs ZeRO stage 2 or 3"):
        zero.plan({zero.FLAG: "1", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000}}))
    spec = zero.plan({zero.FLAG: "1", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(own)})
    assert spec.stage == 3 and spec.zero_section() == {"stage": 3, "stage3_max_live_parameters": 1000}
    own.write_text("{}")
    with pytest.raises(UserError, match=r"zero_optimization\.stage must be 2 or 3"):
        zero.plan({zero.FLAG: "1", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(own)})


def test_the_engine_config_is_diffaligns_and_the_refusals_name_the_key():
    """The DeepSpeed config: accumulation 1 (the loop sets the boundary), clipping = optim.max_grad_norm (0: none),
    no DeepSpeed precision (accelerate's autocast); what ZeRO cannot honour is one line naming the key."""
    cfg = dconfig.load("toy/dpo", ["optim.max_grad_norm=0.5"])
    ds = zero.ds_config(zero.Spec(stage=3), cfg)
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3} and not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == cfg.optim.batch_size
    assert zero.config_problem(cfg, 3) is None
    for key, needle in [
        ("optim.name=adamw8bit", "optim.name=adamw8bit under DeepSpeed"),
        ("run.mixed_precision=fp16", "fp16 under DeepSpeed"),
        ("lora.text_encoder=true", "lora.text_encoder=true under DeepSpeed"),
    ]:
        assert needle in zero.config_problem(dconfig.load("toy/dpo", [key]), 2), key
    full = dconfig.load("toy/dpo", ["train.mode=full", "export.lora_rank=4"])
    assert zero.config_problem(full, 2) is None
    assert "export.lora_rank=4 under ZeRO-3" in zero.config_problem(full, 3)
