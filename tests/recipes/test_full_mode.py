"""Full fine-tuning (``train.mode: full``) through the recipes on tiny models: the DPO loss at init, the reference
copy only for objectives that need one, the exports (a diffusers UNet folder a stock pipeline uses, the SVD LoRA, the
EMA weights in both), Adafactor's factored states over the full parameter set, and exact resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign.training import checkpoint, loop, state_io
from tests.recipes.conftest import (
    ROOT,
    averaged_gradients,
    child_env,
    recipe_command,
    recipe_module,
    run_subprocess,
    toy_overrides,
    two_process_command,
)


FULL = {"train.mode": "full", "run.log_every": 1}


def _trainable(out, step):
    return load_file(str(checkpoint.step_dir(out / "checkpoints", step) / "trainable.safetensors"))


def test_full_dpo_exports_ema_unet_for_a_stock_pipeline_and_an_svd_lora(recipe, tiny_dirs, stock_pipes, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    extra = {**FULL, "run.max_steps": 3, "run.save_every": 3, "optim.lr": 1e-2, "ema.enabled": "true"}
    extra.update({"ema.decay": 0.5, "export.lora_rank": 2, "validation.every": 3, "validation.num_inference_steps": 2})
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == the frozen copy
    assert len(list((out / "validation" / "step-00000003").glob("*.png"))) == 4
    assert result["model_dir"] == out / "unet" and result["lora_dir"] == out / "lora"

    saved = _trainable(out, 3)
    assert int(saved[loop.EMA_PREFIX + "#step"]) == 3
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    exported = unet.state_dict()
    for key, value in exported.items():  # the export is the EMA, not the last weights
        assert torch.equal(value, saved[f"{loop.EMA_PREFIX}unet.{key}"]), key
    assert any(not torch.equal(exported[k], saved[f"unet.{k}"]) for k in exported)

    base = stock_pipes["sd15"]
    before = _sample(base)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd15"]), unet=unet)
    pipe.set_progress_bar_config(disable=True)
    assert not torch.equal(_sample(pipe), before)
    base.load_lora_weights(str(out / "lora"), adapter_name="svd")
    try:
        assert not torch.equal(_sample(base), before)
    finally:
        base.delete_adapters("svd")


FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_dpo_on_every_family_starts_at_log2_and_exports_a_denoiser_a_stock_pipeline_uses(
    recipe, tiny_dirs, stock_pipes, tmp_path, family
):
    import diffusers

    from diffalign.models import tiny

    extra = {**FULL, "run.max_steps": 1, "optim.lr": 1e-2, "model.family": tiny.adapter_family(family)}
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs[family], tmp_path / "run", **extra)])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = stock_pipes[family]
    name = "unet" if family in {"sd15", "sdxl"} else "transformer"
    assert result["model_dir"].name == name
    trained = type(getattr(pipe, name)).from_pretrained(str(result["model_dir"]))
    swapped = type(pipe)(**{**pipe.components, name: trained})
    swapped.set_progress_bar_config(disable=True)
    assert not torch.equal(_sample(swapped), _sample(pipe))
    assert isinstance(swapped, diffusers.DiffusionPipeline)


# the other recipes in full mode, one step on tiny SD1.5 (GRPO on SD3, as its toy config): they train every denoiser weight,
# keep a reference copy exactly when their objective reads the reference, and export the denoiser folder
ONLINE = {
    "online.num_steps": 3,
    "online.prompts_per_round": 2,
    "online.group_size": 2,
    "optim.batch_size": 4,
    "optim.grad_accum": 2,
}
OTHER = {  # case -> (recipe, config, overrides, a reference copy expected); family: the toy config's
    "grpo": ("online_rl", "toy/grpo", {**ONLINE, "loss.kl_coef": 0.0}, False),  # no KL: no copy
    "grpo_kl": ("online_rl", "toy/grpo", {**ONLINE, "loss.kl_coef": 0.01}, True),
    "refl": (
        "reward_grad",
        "toy/refl_world",
        {"data.max_prompts": 4, "optim.batch_size": 2, "reward_grad.num_steps": 4, "reward_grad.refl_steps": "[2,3]"},
        False,
    ),
    "spo": ("stepwise_pref", "toy/spo", {}, True),
    "selfnpo": ("selfnpo", "toy/selfnpo", {}, False),
    "dro": ("dro", "toy/dro", {}, True),  # its hinge reads the reference; the snapshot is a full copy
}


@pytest.mark.parametrize("case", list(OTHER))
def test_every_training_recipe_runs_in_full_mode(tiny_dirs, tmp_path, case):
    name, config, extra, needs_ref = OTHER[case]
    module = recipe_module(name)
    over = {**FULL, "run.max_steps": 1, "data.resolution": 32, **extra}
    family = "sd3" if name == "online_rl" else "sd15"
    over.update({"model.path": tiny_dirs[family], "run.output_dir": tmp_path / "run", "run.report_to": "[]"})
    if name in ("selfnpo", "dro"):
        over["data.path"] = ROOT / "assets" / "pickapic_tiny"
    cfg = dconfig.load(config, [f"{k}={v}" for k, v in over.items()])
    acc = loop.make_accelerator(cfg)
    loop.start(cfg, acc, case)
    state = module.setup(cfg, acc)
    adapter = state.run.adapter
    assert (adapter.reference_denoiser is not None) == needs_ref
    if name == "dro":  # the policy snapshot copies every trained weight
        assert state.snapshot.keys() == state.params.keys() and len(state.params) > 100
    before = {k: v.detach().clone() for k, v in adapter.denoiser.state_dict().items()}
    if hasattr(module, "train_step"):
        step = partial(module.train_step, state)
    else:  # reward_grad: the shared optimizer step over its micro-step
        step = partial(loop.optimizer_step, state.run, partial(module.micro_step, state))
    result = loop.train(state.run, step)
    assert math.isfinite(result["history"][0]["loss"])
    moved = adapter.denoiser.state_dict()
    assert sum(not torch.equal(moved[k], before[k]) for k in before) > len(before) // 2  # not just attention
    assert (tmp_path / "run" / ("transformer" if family == "sd3" else "unet") / "config.json").is_file()


def test_full_mode_with_text_encoders_exports_them(recipe, tiny_dirs, tmp_path):
    from transformers import CLIPTextModel

    out = tmp_path / "run"
    extra = {**FULL, "run.max_steps": 1, "optim.lr": 1e-2, "train.text_encoders": "true"}
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], out, **extra)])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    base = CLIPTextModel.from_pretrained(str(tiny_dirs["sd15"] / "text_encoder")).state_dict()
    trained = CLIPTextModel.from_pretrained(str(out / "text_encoder")).state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def _setup(recipe, tiny_dirs, tmp_path, config, **extra):
    overrides = toy_overrides(tiny_dirs["sd15"], tmp_path / config.replace("/", "-"), **FULL, **extra)
    cfg = dconfig.load(config, overrides)
    return recipe.setup(cfg, loop.make_accelerator(cfg))


def test_reference_copy_only_for_objectives_that_need_one(recipe, tiny_dirs, tmp_path):
    mapo = _setup(recipe, tiny_dirs, tmp_path, "toy/mapo", **{"run.max_steps": 1})
    assert mapo.run.adapter.reference_denoiser is None  # MaPO is reference-free: no copy in memory
    dpo = _setup(recipe, tiny_dirs, tmp_path, "toy/dpo", **{"run.max_steps": 1, "train.reference_dtype": "bf16"})
    ref = dpo.run.adapter.reference_denoiser
    assert ref is not None and {p.dtype for p in ref.parameters()} == {torch.bfloat16}


def test_adafactor_full_mode_resumes_exactly_with_ema(recipe, tiny_dirs, tmp_path):
    """4 steps straight, and 2 + a resume of 2 into another folder: the step-4 weights, Adafactor state and EMA
    are bitwise equal. Adafactor keeps factored (row, column) second moments for the 2-D and 4-D weights."""
    extra = {**FULL, "run.max_steps": 4, "run.save_every": 2, "run.keep_last": 5, "optim.name": "adafactor"}
    extra.update({"optim.lr": 1e-3, "ema.enabled": "true", "ema.decay": 0.9})
    a, b = tmp_path / "a", tmp_path / "b"
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], a, **extra)])
    resume = {**extra, "run.resume_from": checkpoint.step_dir(a / "checkpoints", 2)}
    recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], b, **resume)])
    ta, tb = _trainable(a, 4), _trainable(b, 4)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    oa = state_io.load(checkpoint.step_dir(a / "checkpoints", 4) / "optimizer")
    ob = state_io.load(checkpoint.step_dir(b / "checkpoints", 4) / "optimizer")
    for k, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][k][name])), (k, name)
    kinds = {frozenset(s) for s in oa["state"].values()}
    assert {"exp_avg_sq_row", "exp_avg_sq_col", "step", "RMS"} in [set(k) for k in kinds]  # factored, 2-D+
    assert {"exp_avg_sq", "step", "RMS"} in [set(k) for k in kinds]  # biases and norms: full second moment
    assert len(oa["state"]) == sum(1 for k in ta if k.startswith("unet."))  # the full parameter set


def test_adamw8bit_trains_the_full_parameter_set(recipe, tiny_dirs, tmp_path):
    pytest.importorskip("bitsandbytes", reason="optim.name=adamw8bit needs the 'memory' extra (bitsandbytes)")
    extra = {**FULL, "run.max_steps": 2, "optim.name": "adamw8bit"}
    result = recipe.main(["--config", "toy/dpo", *toy_overrides(tiny_dirs["sd15"], tmp_path / "r", **extra)])
    assert result["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(h["loss"]) for h in result["history"])


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_in_full_mode(tiny_dirs, tmp_path):
    """Kill -9 right after checkpoint 2 of 4 appears, resume with latest: the final weights, EMA and exported UNet
    equal the uninterrupted run's bitwise."""
    common = {**FULL, "run.max_steps": 4, "run.save_every": 2, "run.keep_last": 5, "ema.enabled": "true"}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = run_subprocess(recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], ref_out, **common)), ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cmd = recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], cut_out, **common))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (cut_out / "checkpoints" / "step-00000002" / "COMPLETE").exists():
        time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(cut_out / "checkpoints").name in {"step-00000002", "step-00000004"}
    assert not (cut_out / "unet").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _trainable(ref_out, 4), _trainable(cut_out, 4)
    assert a.keys() == b.keys() and any(k.startswith(loop.EMA_PREFIX) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ua = load_file(str(ref_out / "unet" / "diffusion_pytorch_model.safetensors"))
    ub = load_file(str(cut_out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert ua.keys() == ub.keys() and all(torch.equal(ua[k], ub[k]) for k in ua)


def _sample(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=gen, output_type="pt").images


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["train.mode=full", "model.dtype=bf16", "model.quantize=nf4"], "model.quantize='nf4' must be none"),
        (["train.mode=full", "lora.text_encoder=true"], "unset lora.text_encoder"),
        (["train.mode=full", "train.dtype=fp16", "run.mixed_precision=fp16"], "keep train.dtype=fp32"),
        (["export.lora_rank=8"], "export.lora_rank=8 applies to train.mode=full"),
        (["train.reference_dtype=bf16"], "train.reference_dtype='bf16' applies to train.mode=full"),
        (["train.mode=full", "export.lora_rank=0"], "export.lora_rank=0 must be > 0"),
        (["ema.decay=1.5"], "ema.decay=1.5"),
        (["ema.min_decay=0.5", "ema.decay=0.4"], "ema.min_decay=0.5 must be <= ema.decay=0.4"),
        (["train.mode=ful"], "did you mean 'full'"),
        (["train.text_encoders=true"], "train.text_encoders=True applies to train.mode=full"),
        (["train.mode=full", "train.text_encoders=true", "data.latent_cache=/x"], "train.text_encoders=true needs"),
    ],
)
def test_config_rejects_what_full_mode_cannot_do_in_one_line(tmp_path, override, needle):
    with pytest.raises(dconfig.ConfigError) as err:
        dconfig.load("toy/dpo", [f"run.output_dir={tmp_path}", *override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_from_before_train_mode_resumes_when_the_new_keys_keep_their_defaults(monkeypatch, tmp_path):
    from diffalign.training import rundir

    cfg = dconfig.load("toy/dpo", [f"run.output_dir={tmp_path}"])
    old = dconfig.to_dict(cfg)
    for section in ("train", "ema", "export"):
        del old[section]
    del old["optim"]["scale_lr"]
    monkeypatch.setattr(checkpoint, "saved_state", lambda path: {"config": old})
    assert rundir.resume_problem(cfg, tmp_path) is None
    full_cfg = dconfig.load("toy/dpo", [f"run.output_dir={tmp_path}", "train.mode=full"])
    assert "train.mode: '<absent>' -> 'full'" in rundir.resume_problem(full_cfg, tmp_path)


def test_validate_dry_run_prints_salesforce_sdxl_global_batch_of_2048_pairs(capsys):
    from diffalign.cli.main import main

    assert main(["validate", "sdxl/dpo_full", "--dry-run", "--num-processes", "16"]) == 0
    out = capsys.readouterr().out
    assert "effective batch: 2048 pairs = 1 per device x 16 processes x 128 accumulation" in out
    assert "learning rate: 2.048e-05 = 1e-08 x 2048 (optim.scale_lr), adafactor" in out
    for name, n in (("sd15/dpo_full", 16), ("sd15/kto_full", 4), ("flux/grpo_full", 16)):
        assert main(["validate", name, "--dry-run", "--num-processes", str(n)]) == 0
        assert "trains: full denoiser in fp32" in capsys.readouterr().out


def test_flux_grpo_full_dry_runs_sharded_on_16_processes(capsys):
    """DanceGRPO's full-parameter FLUX (online_rl) launches under FSDP2 on 16 processes: no refusal, the fsdp config."""
    from diffalign.cli.main import main

    args = ["run", "--config", "flux/grpo_full", "--distributed", "fsdp", "--num-processes", "16", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "= 1 per device x 16 processes x 108 accumulation" in out
    assert "accelerate/fsdp.yaml --num_processes 16" in out and "online_rl.py" in out


@pytest.mark.slow
def test_two_processes_equal_one_process_first_step_in_full_mode(tiny_dirs, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4 in full mode (plain data parallel: the gradients of every
    denoiser weight all-reduced by ``distributed.reduce_gradients``). Step 1's policy equals the frozen copy, so every
    DPO weight is sigmoid(0) and the comparison is the LoRA test's well-conditioned one
    (``test_offline_pref.test_two_processes_match_one_process_first_step``): loss and reference errors to fp32
    rounding (rel 1e-6), the averaged step-1 gradient read from AdamW's first moments to 1e-4 norm-wise."""
    common = {**FULL, "run.max_steps": 1, "run.save_every": 1, "ema.enabled": "true"}
    one = run_subprocess(
        recipe_command(
            "toy/dpo", toy_overrides(tiny_dirs["sd15"], tmp_path / "one", **common, **{"optim.batch_size": 4})
        ),
        ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = two_process_command(
        "toy/dpo", toy_overrides(tiny_dirs["sd15"], tmp_path / "two", **common, **{"optim.batch_size": 2})
    )
    two = run_subprocess(cmd, ROOT, env={"ACCELERATE_USE_CPU": "true"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr
    rows = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("one", "two")]
    for key in ("loss", "loss/ref_err_w", "loss/ref_err_l"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-6, abs=1e-9), key
    (g_one,), (g_two,) = (averaged_gradients(tmp_path / d, 1) for d in ("one", "two"))
    assert g_one.norm() > 0 and (g_two - g_one).norm() <= 1e-4 * g_one.norm()
    a, b = _trainable(tmp_path / "one", 1), _trainable(tmp_path / "two", 1)
    assert a.keys() == b.keys() and any(k.startswith(loop.EMA_PREFIX) for k in a)
