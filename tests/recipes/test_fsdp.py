"""Sharded (FSDP2) training on 2 CPU processes (gloo), launched as a user does: ``accelerate launch --config_file
diffalign/recipes/accelerate/fsdp.yaml`` (what ``diffalign run --distributed fsdp`` runs).

The tolerances follow test_offline_pref.py::test_two_processes_match_one_process_first_step, whose docstring derives
them: what differs between an FSDP2 run and a DDP run of the same global batch is only the order of the sums (the
reduce-scatter of the shards against the one flat all-reduce), so the same fp32 rounding bounds hold. Compared are the
step figures and the averaged gradients read back from the AdamW first moments (linear in the gradient), never the
weights after Adam's steps (an element whose gradient is near 0 moves by up to lr on whichever side rounding puts it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign import config as dconfig
from diffalign import models
from diffalign.models import lora
from diffalign.training import checkpoint, state_io
from tests.conftest import unused_port
from tests.recipes.conftest import (
    ROOT,
    kill_once_saved,
    recipe_command,
    run_subprocess,
    toy_overrides,
    two_process_command,
)
from tests.recipes.test_offline_pref import GRAD_RTOL


BETA = 5000  # toy/dpo's loss.beta
BETA_ROUNDING = BETA / 2 * 4e-6  # DPO scales the errors' rounding (rel 1e-6, four of them) by beta / 2
COMMON = {"run.max_steps": 4, "run.log_every": 1, "run.save_every": 1, "run.keep_last": 10, "optim.batch_size": 2}
FSDP_CONFIG = ROOT / "diffalign" / "recipes" / "accelerate" / "fsdp.yaml"


def fsdp_command(overrides: list[str], config: str = "toy/dpo", recipe: str = "offline_pref") -> list[str]:
    """``recipe_command`` under ``accelerate launch --config_file fsdp.yaml --num_processes 2`` (a free port)."""
    cmd = recipe_command(config, overrides, recipe)
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2"]
    return [cmd[0], *launch, "--main_process_port", str(unused_port()), *cmd[1:]]


CPU = {"ACCELERATE_USE_CPU": "true"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def names(tiny_dirs) -> list[str]:
    """The trained parameters' names in the optimizer's order (what an unsharded checkpoint's ids count)."""
    cfg = dconfig.load("toy/dpo", [f"model.path={tiny_dirs['sd15']}"])
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    lora.add_lora(adapter, lora.LoraSpec(**dconfig.to_dict(cfg.lora)))
    return list(lora.trainable_parameters(adapter))


def first_moments(path: Path, names: list[str]) -> tuple[torch.Tensor, float]:
    """The AdamW first moments of checkpoint ``path`` as one float64 vector in ``names`` order, and beta1; from either
    layout (sharded: ``optim/state.<name>.exp_avg``, unsharded: optimizer state ids in parameter order)."""
    if checkpoint.is_sharded(path):
        tensors = checkpoint.read_sharded(path)
        settings = state_io.decode(json.loads((path / "optimizer.json").read_text()), {})
        b1 = settings[f"param_groups.{names[0]}.betas"][0]
        return torch.cat([tensors[f"optim/state.{n}.exp_avg"].double().flatten() for n in names]), b1
    saved = state_io.load(path / "optimizer")
    m = torch.cat([saved["state"][i]["exp_avg"].double().flatten() for i in range(len(names))])
    return m, saved["param_groups"][0]["betas"][0]


def gradients(paths: list[Path], names: list[str]) -> list[torch.Tensor]:
    """The averaged gradient each step applied: ``g_t = (m_t - b1 m_{t-1}) / (1 - b1)``, from consecutive
    checkpoints ``paths`` (the first one's step must be 1, or the list starts with the checkpoint before)."""
    grads, before = [], None
    for path in paths:
        m, b1 = first_moments(path, names)
        if before is not None or checkpoint.saved_state(path)["step"] == 1:
            grads.append((m - (b1 * before if before is not None else 0)) / (1 - b1))
        before = m
    return grads


def steps(out: Path, *numbers: int) -> list[Path]:
    return [checkpoint.step_dir(out / "checkpoints", n) for n in numbers]


@pytest.fixture(scope="module")
def fsdp_run(tiny_dirs, tmp_path_factory) -> Path:
    """The uninterrupted sharded run: 2 processes x batch 2, 4 steps, a checkpoint every step."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = run_subprocess(fsdp_command(toy_overrides(tiny_dirs["sd15"], out, **COMMON)), ROOT, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and "FSDP2: unet sharded" in done.stderr
    return out


def test_fsdp_checkpoints_are_sharded_safetensors_and_the_lora_one_file(fsdp_run, stock_pipes):
    """Every process wrote its shard (safetensors, no pickle), COMPLETE lists them; the export is one LoRA file that a
    stock pipeline loads."""
    path = checkpoint.latest(fsdp_run / "checkpoints")
    assert path.name == "step-00000004" and checkpoint.is_sharded(path) and checkpoint.is_complete(path)
    listed = json.loads((path / checkpoint.MARKER).read_text())["files"]
    shards = sorted(n for n in listed if n.startswith("sharded/"))
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards), shards
    assert not (path / "trainable.safetensors").exists()
    assert sorted(p.name for p in (fsdp_run / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    stock_pipes["sd15"].load_lora_weights(str(fsdp_run / "lora"))
    stock_pipes["sd15"].unload_lora_weights()


def test_fsdp_lora_dpo_equals_ddp(fsdp_run, tiny_dirs, tmp_path, names):
    """LoRA-mode DPO under FSDP2 == the same 2 x 2 run under DDP (diffalign's one flat all-reduce), step by step.

    Step 1: policy == reference (LoRA B = 0), so the figures differ by summation order only: rel 1e-6; the averaged
    gradient by ``GRAD_RTOL`` norm-wise. Step 2: DPO's beta scales the errors' rounding: ``GRAD_RTOL +
    BETA_ROUNDING`` on the gradient, ``BETA_ROUNDING`` on the loss; the reference errors do not depend on training:
    rel 1e-6. A gradient reduced twice (FSDP's reduce-scatter and the all-reduce) is off by a factor 2, one not
    reduced by ~0.2 (a process's own batch-2 gradient against the batch-4 one).
    """
    ddp = tmp_path / "ddp"
    overrides = toy_overrides(tiny_dirs["sd15"], ddp, **{**COMMON, "run.max_steps": 2})
    done = run_subprocess(two_process_command("toy/dpo", overrides), ROOT, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    (d1, d2), (f1, f2) = rows(ddp), rows(fsdp_run)[:2]
    for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l"):
        assert f1[key] == pytest.approx(d1[key], rel=1e-6, abs=1e-9), key
    for key in ("loss/ref_err_w", "loss/ref_err_l"):
        assert f2[key] == pytest.approx(d2[key], rel=1e-6), key
    assert f2["loss"] == pytest.approx(d2["loss"], rel=BETA_ROUNDING)
    assert f1["grad_norm"] == pytest.approx(d1["grad_norm"], rel=GRAD_RTOL)
    (g1_d, g2_d), (g1_f, g2_f) = gradients(steps(ddp, 1, 2), names), gradients(steps(fsdp_run, 1, 2), names)
    assert g1_d.norm() > 0 and g2_d.norm() > 0
    assert (g1_f - g1_d).norm() <= GRAD_RTOL * g1_d.norm(), float((g1_f - g1_d).norm() / g1_d.norm())
    tol = GRAD_RTOL + BETA_ROUNDING
    assert (g2_f - g2_d).norm() <= tol * g2_d.norm(), float((g2_f - g2_d).norm() / g2_d.norm())


@pytest.mark.slow  # 106 s on 2 busy cores: a killed launch and a resumed one
def test_fsdp_sigkill_then_resume_equals_uninterrupted(fsdp_run, tiny_dirs, tmp_path):
    """kill -9 (the launcher and both trainers) once checkpoint 2 of 4 is complete, resume with latest on 2 processes:
    the sharded state, the optimizer state and the exported LoRA equal the uninterrupted run's bit for bit (same
    process count, same shards, same order of every sum)."""
    cut = tmp_path / "cut"
    cmd = fsdp_command(toy_overrides(tiny_dirs["sd15"], cut, **COMMON))
    kill_once_saved(cmd, cut, 2, CPU)
    assert checkpoint.latest(cut / "checkpoints").name in {"step-00000002", "step-00000003"}
    assert not (cut / "lora").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT, env=CPU)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = (checkpoint.read_sharded(checkpoint.latest(d / "checkpoints")) for d in (fsdp_run, cut))
    assert a.keys() == b.keys() and any(k.endswith(".exp_avg") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    from safetensors.torch import load_file

    ref_lora, cut_lora = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (fsdp_run, cut))
    assert ref_lora.keys() == cut_lora.keys() and all(torch.equal(ref_lora[k], cut_lora[k]) for k in ref_lora)


def test_one_process_resumes_a_two_process_sharded_checkpoint(fsdp_run, tiny_dirs, tmp_path, names):
    """Step 2 of the 2 x 2 sharded run resumed on ONE unsharded process with batch 4 (the same global batch; another
    global batch is refused in one line): steps 3 and 4 equal the sharded run's. The resumed state is the same
    weights and moments (DCP reassembles the shards); the steps then differ by summation order and DPO's beta:
    ``BETA_ROUNDING`` on the loss, ``GRAD_RTOL + BETA_ROUNDING`` on the averaged gradients."""
    start = checkpoint.step_dir(fsdp_run / "checkpoints", 2)
    one = tmp_path / "one"
    base = toy_overrides(tiny_dirs["sd15"], one, **{**COMMON, "run.resume_from": start})
    refused = run_subprocess(recipe_command("toy/dpo", base), ROOT)  # batch 2 on 1 process: half the global batch
    assert refused.returncode != 0
    assert "global batch of 4 (2 x 1 accumulation x 2 processes); set optim.batch_size" in refused.stderr
    done = run_subprocess(recipe_command("toy/dpo", [*base, "optim.batch_size=4"]), ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 processes" in done.stderr and f"resumed from {start} at step 2" in done.stderr
    resumed, sharded = rows(one), rows(fsdp_run)
    assert [r["step"] for r in resumed] == [3, 4]
    for r, s in zip(resumed, sharded[2:], strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=BETA_ROUNDING), r["step"]
        for key in ("loss/ref_err_w", "loss/ref_err_l"):
            assert r[key] == pytest.approx(s[key], rel=1e-6), (r["step"], key)
    g_one = gradients([start, *steps(one, 3, 4)], names)
    g_two = gradients(steps(fsdp_run, 2, 3, 4), names)
    tol = GRAD_RTOL + BETA_ROUNDING
    for a, b in zip(g_one, g_two, strict=True):
        assert (a - b).norm() <= tol * b.norm(), float((a - b).norm() / b.norm())


def test_take_over_refuses_fsdp1_and_reads_the_plan():
    """Unit checks without a launch: the FSDP1 refusal of ``sharding.take_over`` (one line) and the plan it reads."""
    from diffalign.errors import UserError
    from diffalign.training import sharding

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
    with pytest.raises(UserError, match="fsdp_version: 2"):
        sharding.take_over(env)
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "A, B",
    }
    sharding.take_over(env)
    assert env["ACCELERATE_USE_FSDP"] == "false" and env[sharding.FLAG] == "1"
    assert sharding.plan(env) == sharding.Plan(offload=True, reshard_after_forward=True, wrap_classes=("A", "B"))
    assert sharding.plan({}) is None


@pytest.mark.slow  # 144 s on 2 busy cores: a 1-process and a 2-process launch, then a 1-process resume
def test_full_mode_dpo_under_fsdp_equals_one_process(tiny_dirs, tmp_path):
    """Full fine-tuning (every UNet weight, a frozen fp32 reference copy, EMA) under FSDP2 on 2 processes x batch 2
    == the 1-process full-mode run with batch 4, with the reference copy sharded too.

    The same derivation as the LoRA tests: at step 1 the trained UNet equals its reference copy, so every DPO weight
    is sigmoid(0) and the two runs differ by summation order only (batch 4 in one kernel against 2 + 2 and the
    reduce-scatter): rel 1e-6 on the step's figures, ``GRAD_RTOL`` norm-wise on the averaged gradient of all 203k
    weights; step 2 adds DPO's beta amplification, ``BETA_ROUNDING``. The export of the sharded run is one diffusers
    folder (gathered from the shards, EMA weights) with every weight of the 1-process export. The sharded step-1
    checkpoint (weights, AdamW state and EMA shards, 2 processes) resumed on 1 process gives step 2 again (loss within
    ``BETA_ROUNDING``, the EMA's step count carried, its shadows within Adam's lr-per-element rounding)."""
    from diffusers import UNet2DConditionModel

    from diffalign.models import full

    common = {**COMMON, "run.max_steps": 2, "train.mode": "full", "ema.enabled": "true", "optim.lr": 1e-5}
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_subprocess(
        recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], one, **{**common, "optim.batch_size": 4})), ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_subprocess(fsdp_command(toy_overrides(tiny_dirs["sd15"], two, **common)), ROOT, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2: unet and its frozen reference copy sharded" in done.stderr
    (o1, o2), (t1, t2) = rows(one), rows(two)
    for key in ("loss", "loss/policy_err_w", "loss/policy_err_l", "loss/ref_err_w", "loss/ref_err_l"):
        assert t1[key] == pytest.approx(o1[key], rel=1e-6, abs=1e-9), key
    for key in ("loss/ref_err_w", "loss/ref_err_l"):  # the frozen copy does not train: the same on both sides
        assert t2[key] == pytest.approx(o2[key], rel=1e-6), key
    assert t2["loss"] == pytest.approx(o2["loss"], rel=BETA_ROUNDING)
    adapter = models.load("sd15", str(tiny_dirs["sd15"]))
    full.make_full(adapter)
    names = list(lora.trainable_parameters(adapter))
    (g1_o, g2_o), (g1_t, g2_t) = gradients(steps(one, 1, 2), names), gradients(steps(two, 1, 2), names)
    assert g1_o.norm() > 0
    assert (g1_t - g1_o).norm() <= GRAD_RTOL * g1_o.norm(), float((g1_t - g1_o).norm() / g1_o.norm())
    tol = GRAD_RTOL + BETA_ROUNDING
    assert (g2_t - g2_o).norm() <= tol * g2_o.norm(), float((g2_t - g2_o).norm() / g2_o.norm())
    a, b = (UNet2DConditionModel.from_pretrained(str(d / "unet")).state_dict() for d in (one, two))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    # the sharded step-1 checkpoint (weights, AdamW state, EMA shards) resumed on 1 process gives step 2 again
    start, again = checkpoint.step_dir(two / "checkpoints", 1), tmp_path / "again"
    overrides = {**common, "optim.batch_size": 4, "run.resume_from": start}
    done = run_subprocess(recipe_command("toy/dpo", toy_overrides(tiny_dirs["sd15"], again, **overrides)), ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (r2,) = rows(again)
    assert r2["loss"] == pytest.approx(t2["loss"], rel=BETA_ROUNDING)
    saved = checkpoint.read_sharded(checkpoint.step_dir(two / "checkpoints", 2))
    from safetensors.torch import load_file

    ema_one = load_file(str(checkpoint.step_dir(again / "checkpoints", 2) / "trainable.safetensors"))
    ema_keys = [k for k in ema_one if k.startswith("train_ema.") and not k.endswith("#step")]
    assert len(ema_keys) == len(names)
    assert int(ema_one["train_ema.#step"]) == int(saved["extra/train_ema.#step"]) == 2  # the EMA was resumed
    for k in ema_keys:  # step 2's weights differ by Adam's rounding: at most lr per element on either side
        torch.testing.assert_close(ema_one[k], saved[f"extra/{k}"], rtol=0, atol=2 * 1e-5)


def test_every_family_has_its_wrap_units():
    """``Adapter.shard_blocks`` names classes every family's denoiser has (what ``fsdp_transformer_layer_cls_to_wrap``
    defaults to); a class the model lacks, named in an accelerate config, is a one-line error listing its classes."""
    from diffalign.errors import UserError
    from diffalign.models import tiny
    from diffalign.training import sharding

    for family in tiny.FAMILIES:
        components = getattr(tiny, family)(0)
        adapter_cls = models.get(tiny.adapter_family(family)).Adapter
        denoiser = components[adapter_cls.denoiser_name]
        units = sharding.wrap_units(denoiser, adapter_cls.shard_blocks, explicit=False)
        blocks = [m for m in denoiser.children() if isinstance(m, torch.nn.ModuleList)]  # down/up/transformer blocks
        assert len(units) >= sum(len(b) for b in blocks) > 0, family
    with pytest.raises(UserError, match="NoSuchBlock"):
        sharding.wrap_units(denoiser, ("NoSuchBlock",), explicit=True)
