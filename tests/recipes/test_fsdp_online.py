"""online_rl (Flow-GRPO), reward_grad (ReFL, DRaFT-K), stepwise_pref (LPO) and selfnpo sharded with FSDP2 on 2 CPU processes (gloo), launched as
``diffalign run --distributed fsdp`` does (``accelerate launch --config_file fsdp.yaml``), against the same 2 x batch
runs under DDP, and resumed on one process and on two.

Both recipes sample with the policy before they train: under FSDP2 every process runs the same denoiser calls in the
same order (same per-process rollout size, same grid, the same method draws from seeds shared by all processes), the
no-grad sampling gathers the shards like the training forward, and the rollout's log-probs come from the same
function as the update's (the first ratio is exactly 1). The forwards see the same whole weights as DDP's (FSDP's
all-gather copies them), so round 1's samples and rewards are bitwise DDP's; what differs is the order of the
gradient sums (the reduce-scatter against DDP's one flat all-reduce). Tolerances as in
test_online_rl.py::test_two_processes_train_like_one and test_offline_pref.py (fp32 rounding, u = 6e-8): the first
step's averaged gradient (read back from the AdamW first moments, linear in the gradient) rel 1e-5 norm-wise; the
second step samples with weights one Adam update apart, whose rounding the advantages (GRPO) divide by the reward
std: rel 1e-4. Weights after Adam steps are compared only between runs with the same process count and shards
(bitwise), never across layouts (an element whose gradient is near 0 moves by up to lr on either side).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config as dconfig
from diffalign import models
from diffalign.models import lora
from diffalign.training import checkpoint
from tests.recipes.conftest import ROOT, kill_once_saved, recipe_module, run_subprocess, two_process_command
from tests.recipes.test_fsdp import CPU, fsdp_command, gradients, rows, steps
from tests.recipes.test_reward_grad import FAST


STEP1_RTOL = 1e-5  # the same weights, sums in another order
STEP2_RTOL = 1e-4  # weights one Adam update apart (rounding), scaled by the advantage normalisation


def overrides(tiny_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {"model.path": str(tiny_dir), "run.output_dir": str(out_dir), "run.report_to": "[]", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def lora_names(family: str, path: Path, config: str) -> list[str]:
    """The trained parameters' names in the optimizer's order (what an unsharded checkpoint's ids count)."""
    cfg = dconfig.load(config, [f"model.path={path}", "run.output_dir=x"])
    adapter = models.load(family, str(path))
    lora.add_lora(adapter, lora.LoraSpec(**dconfig.to_dict(cfg.lora)))
    return list(lora.trainable_parameters(adapter))


def launch(kind: str, config: str, recipe: str, args: list[str]) -> None:
    cmd = fsdp_command(args, config, recipe) if kind == "fsdp" else two_process_command(config, args, recipe)
    done = run_subprocess(cmd, ROOT, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr
    assert ("sharded over the processes" in done.stderr) == (kind == "fsdp")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_gradients_match(runs: dict[str, Path], family: str, path: Path, config: str) -> None:
    """Steps 1 and 2's averaged gradients of the FSDP2 run against the DDP run's (``STEP1_RTOL``, ``STEP2_RTOL``)."""
    names = lora_names(family, path, config)
    (g1_f, g2_f), (g1_d, g2_d) = (gradients(steps(runs[k], 1, 2), names) for k in ("fsdp", "ddp"))
    assert g1_d.norm() > 0 and g2_d.norm() > 0
    assert relative(g1_f, g1_d) <= STEP1_RTOL, relative(g1_f, g1_d)
    assert relative(g2_f, g2_d) <= STEP2_RTOL, relative(g2_f, g2_d)


# ---- online_rl: toy Flow-GRPO on tiny SD3, 2 rounds ----------------------------------------------------------------
GRPO = {"run.max_steps": 2, "run.save_every": 1, "run.keep_last": 10, "optim.grad_accum": 3}


@pytest.fixture(scope="module")
def grpo_runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """2 processes x 4 samples per round (2 prompts x group 4), 2 rounds, under FSDP2 and under DDP."""
    root = tmp_path_factory.mktemp("grpo_fsdp")
    for kind in ("fsdp", "ddp"):
        launch(kind, "toy/grpo", "online_rl", overrides(tiny_dirs["sd3"], root / kind, **GRPO))
    return {kind: root / kind for kind in ("fsdp", "ddp")}


# 40 s (63 s on 2 busy cores): an FSDP2 and a DDP launch, the fixture shared with the next test
def test_grpo_under_fsdp_equals_ddp(grpo_runs, tiny_dirs):
    """Rollouts with sharded weights == DDP's bitwise (round 1); the ratio of the first update is exactly 1 (rollout
    and update log-probs are one function over the gathered weights); the averaged gradients agree to rounding."""
    (f1, f2), (d1, d2) = rows(grpo_runs["fsdp"]), rows(grpo_runs["ddp"])
    assert f1["reward/toy_pixel/mean"] == d1["reward/toy_pixel/mean"]
    assert f1["reward/toy_pixel/std"] == d1["reward/toy_pixel/std"]
    assert f1["loss/ratio_min"] == f1["loss/ratio_max"] == 1.0 and f1["groups"] == d1["groups"] == 24
    assert f1["grad_norm"] == pytest.approx(d1["grad_norm"], rel=STEP1_RTOL)
    assert f2["reward/toy_pixel/mean"] == pytest.approx(d2["reward/toy_pixel/mean"], rel=STEP1_RTOL)
    assert f2["loss/kl"] > 0  # the sharded reference pass (LoRA off) sees the moved policy's base weights
    assert_gradients_match(grpo_runs, "sd3", tiny_dirs["sd3"], "toy/grpo")


# 4 s after the fixture of the test above (44 s alone)
def test_grpo_sharded_checkpoint_resumes_on_one_process(grpo_runs, tiny_dirs, tmp_path):
    """Round 1's sharded checkpoint (2 processes) resumed on ONE unsharded process with the same global batch (one
    process, 2 micro-batches x 3 steps): round 2 samples the same rewards and applies the same gradient as the sharded
    run's round 2 (DCP reassembles the shards; the sums then run in another order: ``STEP2_RTOL``)."""
    start, one = checkpoint.step_dir(grpo_runs["fsdp"] / "checkpoints", 1), tmp_path / "one"
    args = overrides(tiny_dirs["sd3"], one, **{**GRPO, "optim.grad_accum": 6, "run.resume_from": start})
    result = recipe_module("online_rl").main(["--config", "toy/grpo", *args])
    assert result["step"] == 2 and result["rounds"] == 2
    (r2,), (_, s2) = rows(one), rows(grpo_runs["fsdp"])
    assert r2["reward/toy_pixel/mean"] == pytest.approx(s2["reward/toy_pixel/mean"], rel=STEP1_RTOL)
    names = lora_names("sd3", tiny_dirs["sd3"], "toy/grpo")
    g2_one = gradients([start, *steps(one, 2)], names)[-1]
    g2_two = gradients(steps(grpo_runs["fsdp"], 1, 2), names)[-1]
    assert relative(g2_one, g2_two) <= STEP2_RTOL, relative(g2_one, g2_two)


# 37 s after the fixture of the tests above (2 busy cores): one FSDP2 launch killed after round 1, one resumed launch
def test_grpo_fsdp_sigkill_then_resume_equals_uninterrupted(grpo_runs, tiny_dirs, tmp_path):
    """kill -9 (the launcher and both trainers) once round 1's sharded checkpoint is complete, resume with latest on 2
    processes under FSDP2: round 2 samples and trains as the uninterrupted run (``grpo_runs['fsdp']``) did, so the
    sharded weights, the AdamW state and the exported LoRA equal it bit for bit (same shards, same order of every sum,
    every random draw from seeds of (run seed, round, sample))."""
    cut = tmp_path / "cut"
    cmd = fsdp_command(overrides(tiny_dirs["sd3"], cut, **GRPO), "toy/grpo", "online_rl")
    kill_once_saved(cmd, cut, 1, CPU)
    assert checkpoint.latest(cut / "checkpoints").name == "step-00000001"  # round 2 had not finished
    assert not (cut / "lora").exists()

    resumed = run_subprocess([*cmd, "run.resume_from=latest"], ROOT, env=CPU)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "sharded over the processes" in resumed.stderr
    ref = grpo_runs["fsdp"]
    assert [r["step"] for r in rows(cut)][-1] == 2
    assert rows(cut)[-1]["reward/toy_pixel/mean"] == rows(ref)[-1]["reward/toy_pixel/mean"]
    a, b = (checkpoint.read_sharded(checkpoint.latest(d / "checkpoints")) for d in (ref, cut))
    assert checkpoint.latest(cut / "checkpoints").name == "step-00000002"
    assert a.keys() == b.keys() and any(k.endswith(".exp_avg") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    ref_lora, cut_lora = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (ref, cut))
    assert ref_lora.keys() == cut_lora.keys() and all(torch.equal(ref_lora[k], cut_lora[k]) for k in ref_lora)


# ---- reward_grad: ReFL on tiny SD1.5, the reward's gradient through the sampler's last step -------------------------
REFL = {
    **FAST,
    "run.save_every": 1,
    "run.keep_last": 10,
    "run.max_steps": 3,
}


@pytest.fixture(scope="module")
def refl_runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """2 processes x 2 prompts, 3 steps under FSDP2, 2 under DDP."""
    root = tmp_path_factory.mktemp("refl_fsdp")
    launch("fsdp", "toy/refl_world", "reward_grad", overrides(tiny_dirs["sd15"], root / "fsdp", **REFL))
    ddp = overrides(tiny_dirs["sd15"], root / "ddp", **{**REFL, "run.max_steps": 2})
    launch("ddp", "toy/refl_world", "reward_grad", ddp)
    return {kind: root / kind for kind in ("fsdp", "ddp")}


# 38 s (61 s on 2 busy cores): an FSDP2 and a DDP launch, the fixture shared with the next test
def test_refl_under_fsdp_equals_ddp(refl_runs, tiny_dirs):
    """ReFL's no-grad steps with sharded weights, then the grad-enabled step and the reward's backward through the
    decoded x0 into the shards: the rewards of step 1 are DDP's bitwise, the averaged gradients agree to rounding."""
    (f1, f2, _), (d1, d2) = rows(refl_runs["fsdp"]), rows(refl_runs["ddp"])
    for key in ("reward/toyreward", "guard/toyfaithfulness", "loss", "rollout/grad_start"):
        assert f1[key] == d1[key], key
    assert f2["rollout/grad_start"] == d2["rollout/grad_start"]
    assert f2["reward/toyreward"] == pytest.approx(d2["reward/toyreward"], rel=STEP1_RTOL)
    assert_gradients_match(refl_runs, "sd15", tiny_dirs["sd15"], "toy/refl_world")


# 22 s after the fixture of the test above (60 s alone): a resumed launch and a 1-process resume
def test_refl_sharded_resume_equals_uninterrupted(refl_runs, tiny_dirs, tmp_path):
    """Step 1's sharded checkpoint resumed on 2 processes (FSDP2) to step 3: the sharded weights, AdamW state and the
    exported LoRA equal the uninterrupted run's bitwise (same shards, same order of every sum); resumed on ONE
    process with batch 4 (the same global batch), step 3's gradient agrees to rounding (``STEP2_RTOL``)."""
    start = checkpoint.step_dir(refl_runs["fsdp"] / "checkpoints", 1)
    two = tmp_path / "two"
    resumed = overrides(tiny_dirs["sd15"], two, **{**REFL, "run.resume_from": start})
    launch("fsdp", "toy/refl_world", "reward_grad", resumed)
    a, b = (checkpoint.read_sharded(checkpoint.step_dir(d / "checkpoints", 3)) for d in (refl_runs["fsdp"], two))
    assert a.keys() == b.keys() and any(k.endswith(".exp_avg") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    from safetensors.torch import load_file

    want, got = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (refl_runs["fsdp"], two))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    one = tmp_path / "one"
    start2 = checkpoint.step_dir(refl_runs["fsdp"] / "checkpoints", 2)
    args = overrides(tiny_dirs["sd15"], one, **{**REFL, "optim.batch_size": 4, "run.resume_from": start2})
    result = recipe_module("reward_grad").main(["--config", "toy/refl_world", *args])
    assert result["step"] == 3
    (r3,), s3 = rows(one), rows(refl_runs["fsdp"])[2]
    assert r3["rollout/grad_start"] == s3["rollout/grad_start"]
    assert r3["reward/toyreward"] == pytest.approx(s3["reward/toyreward"], rel=STEP1_RTOL)
    names = lora_names("sd15", tiny_dirs["sd15"], "toy/refl_world")
    (g3_one,) = gradients([start2, *steps(one, 3)], names)
    g3_two = gradients(steps(refl_runs["fsdp"], 2, 3), names)[-1]
    assert relative(g3_one, g3_two) <= STEP2_RTOL, relative(g3_one, g3_two)


# 21 s: a 2-process FSDP2 launch and a 1-process run
def test_full_mode_draft_with_kl_under_fsdp_equals_one_process(tiny_dirs, tmp_path):
    """Full mode (every SD3 transformer weight, a frozen fp32 reference copy for the KL, both sharded) with DRaFT-K:
    the reward's gradient flows back through the last 2 sampler steps, recomputed under gradient checkpointing (a
    second gathered forward per block). 2 processes x 2 prompts == 1 process x 4: step 1 has the same weights on both
    sides (``STEP1_RTOL`` on the averaged gradient of all weights, the rewards equal to fp32 rounding); the KL to the
    sharded copy is 0 at step 1 and positive at step 2; the export is one diffusers folder with every weight."""
    from diffalign.models import full

    extra = {
        **REFL,
        "model.family": "sd3",
        "train.mode": "full",
        "train.reference_dtype": "fp32",
        "optim.lr": 1e-5,
        "run.max_steps": 2,
        "reward_grad.k": 2,
        "reward_grad.guidance_scale": 1.0,
        "reward_grad.kl_coeff": 10.0,
        "reward_grad.checkpointing": "true",
    }
    two, one = tmp_path / "two", tmp_path / "one"
    launch("fsdp", "toy/draft_world", "reward_grad", overrides(tiny_dirs["sd3"], two, **extra))
    args = overrides(tiny_dirs["sd3"], one, **{**extra, "optim.batch_size": 4})
    recipe_module("reward_grad").main(["--config", "toy/draft_world", *args])
    (t1, t2), (o1, _) = rows(two), rows(one)
    assert t1["kl"] == 0.0 and t2["kl"] > 0
    assert t1["reward/toyreward"] == pytest.approx(o1["reward/toyreward"], rel=STEP1_RTOL)
    adapter = models.load("sd3", str(tiny_dirs["sd3"]))
    full.make_full(adapter)
    names = list(lora.trainable_parameters(adapter))
    (g1_two,), (g1_one,) = (gradients(steps(d, 1), names) for d in (two, one))
    assert g1_one.norm() > 0 and relative(g1_two, g1_one) <= STEP1_RTOL, relative(g1_two, g1_one)
    from diffusers import SD3Transformer2DModel  # the export: one diffusers folder gathered from the shards

    a, b = (SD3Transformer2DModel.from_pretrained(str(d / "transformer")).state_dict() for d in (one, two))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


# ---- stepwise_pref: LPO on tiny SD1.5, mining rounds sampled with the sharded policy -------------------------------
# 39 s (66 s on 2 busy cores): two FSDP2 launches and a 1-process run
def test_lpo_under_fsdp_mines_and_trains_like_one_process_and_resumes_there(tiny_dirs, tmp_path):
    """2 processes x 2 prompts / 2 pairs under FSDP2 == 1 process x 4 / 4 (DDP == 1 process is
    test_stepwise_pref.py::test_two_processes_mine_and_train_like_one): the mining round sampled with the sharded
    policy gives the same pairs (rel 1e-6, as there), step 1's loss is -logsigmoid(0) exactly on both, and step 2's
    loss agrees to rel 1e-3 (LPO's beta 500 amplifies the rounding of one update). The sharded step-2 checkpoint
    (with the pair queue) resumed on 2 processes gives the uninterrupted step 3 bitwise (weights, AdamW state, queue).
    (Another process count resumes when ``stepwise.sample_batch_size`` x processes is kept, as
    test_stepwise_pref.py::test_one_process_resumes_a_two_process_run_with_the_same_global_batches checks.)"""
    from diffalign.terms.stepwise import MinedPairs

    common = {"run.max_steps": 3, "run.log_every": 1, "run.save_every": 1, "run.keep_last": 10}
    common["stepwise.save_pairs"] = "true"
    two, one, again = tmp_path / "two", tmp_path / "one", tmp_path / "again"
    per_two = {"stepwise.sample_batch_size": 2, "optim.batch_size": 2}
    launch("fsdp", "toy/lpo", "stepwise_pref", overrides(tiny_dirs["sd15"], two, **common, **per_two))
    recipe = recipe_module("stepwise_pref")
    per_one = {"stepwise.sample_batch_size": 4, "optim.batch_size": 4}
    recipe.main(["--config", "toy/lpo", *overrides(tiny_dirs["sd15"], one, **common, **per_one)])
    a = MinedPairs.load(one / "pairs" / "round-00000000.safetensors")
    b = MinedPairs.load(two / "pairs" / "round-00000000.safetensors")
    assert a.prompts == b.prompts and torch.equal(a.step_index, b.step_index)
    for key, value in a.tensors().items():
        torch.testing.assert_close(b.tensors()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    (o1, o2, _), (t1, t2, t3) = rows(one), rows(two)
    assert o1["loss"] == t1["loss"] == torch.tensor(2.0).log().item()
    assert t2["loss"] == pytest.approx(o2["loss"], rel=1e-3)
    start = checkpoint.step_dir(two / "checkpoints", 2)
    launch(
        "fsdp",
        "toy/lpo",
        "stepwise_pref",
        overrides(tiny_dirs["sd15"], again, **common, **per_two, **{"run.resume_from": start}),
    )
    x, y = (checkpoint.read_sharded(checkpoint.step_dir(d / "checkpoints", 3)) for d in (two, again))
    assert x.keys() == y.keys() and any(k.startswith("extra/queue.") for k in x)
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:3]
    assert rows(again)[-1]["loss"] == t3["loss"]


# ---- selfnpo and dro: 3 steps on the Pick-a-Pic fixture, a checkpoint and a metrics row each ---------------------
THREE_STEPS = {
    "data.path": ROOT / "assets" / "pickapic_tiny",
    "run.max_steps": 3,
    "run.save_every": 1,
    "run.keep_last": 10,
    "run.log_every": 1,
}


# ---- selfnpo: the EMA teacher's per-sample number of DDIM steps, in lockstep ---------------------------------------
# 53 s (74 s on 2 busy cores): three 2-process launches
def test_selfnpo_under_fsdp_equals_ddp_with_unequal_teacher_steps(tiny_dirs, tmp_path):
    """Self-NPO's teacher runs ``min(max_teacher_steps, k + 1)`` DDIM steps for a sample drawn at grid index k, so
    with 1 sample per process the processes need different numbers of teacher forwards (the logged mean of 2 integers
    is not one). Under FSDP2 each makes the maximum over processes (``sharding.max_over_processes``; the spare calls
    are discarded) and the EMA teacher swapped into the sharded LoRA: 3 steps equal DDP's. Step 1: the same weights,
    the loss and the gradient norm to summation-order rounding (rel 1e-6 and ``STEP1_RTOL``); steps 2-3 sample the
    teacher and student with weights an Adam update apart (lr 1e-5 per element at most): rel 1e-4 (measured 2e-7 and
    1e-5 on loss and norm). The sharded step-2 checkpoint resumed on 2 processes gives step 3 bitwise (the teacher's
    EMA shards loaded in place)."""
    extra = {
        **THREE_STEPS,
        "optim.batch_size": 1,
        "optim.lr": 1e-5,
        "selfnpo.num_ddim_steps": 8,
        "selfnpo.max_teacher_steps": 8,
        "selfnpo.ema_decay": 0.5,
    }
    for kind in ("fsdp", "ddp"):
        launch(kind, "toy/selfnpo", "selfnpo", overrides(tiny_dirs["sd15"], tmp_path / kind, **extra))
    sharded, ddp = rows(tmp_path / "fsdp"), rows(tmp_path / "ddp")
    assert any(r["teacher/steps"] != int(r["teacher/steps"]) for r in sharded)  # the processes' counts differed
    assert [r["teacher/steps"] for r in sharded] == [r["teacher/steps"] for r in ddp]
    assert sharded[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=1e-6)
    assert sharded[0]["grad_norm"] == pytest.approx(ddp[0]["grad_norm"], rel=STEP1_RTOL)
    for s, d in zip(sharded[1:], ddp[1:], strict=True):
        assert s["loss"] == pytest.approx(d["loss"], rel=STEP2_RTOL) and s["grad_norm"] == pytest.approx(
            d["grad_norm"], rel=STEP2_RTOL
        )
    # the sharded step-2 checkpoint (LoRA, AdamW state and the teacher's EMA shards) resumed on 2 processes: step 3 bitwise
    start = checkpoint.step_dir(tmp_path / "fsdp" / "checkpoints", 2)
    again = overrides(tiny_dirs["sd15"], tmp_path / "again", **{**extra, "run.resume_from": start})
    launch("fsdp", "toy/selfnpo", "selfnpo", again)
    x, y = (checkpoint.read_sharded(checkpoint.step_dir(tmp_path / d / "checkpoints", 3)) for d in ("fsdp", "again"))
    assert x.keys() == y.keys() and any(k.startswith("extra/ema.") for k in x)
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:3]


# ---- dro: snapshot rollouts into per-process replay buffers -------------------------------------------------------
@pytest.mark.slow  # 65 s (76 s on 2 busy cores): three 2-process launches
def test_dro_under_fsdp_equals_ddp_and_resumes_sharded(tiny_dirs, tmp_path):
    """Diffusion-DRO: the policy snapshot (the trained LoRA's shards, swapped in) samples each group's trajectory,
    the same DDIM steps on every process, into each process's buffer; then one ranking forward. 3 steps under FSDP2
    equal DDP's: step 1 the same weights (loss rel 1e-6, gradient norm ``STEP1_RTOL``); later steps weights an Adam
    update apart (lr 1e-5): the loss is margin + a difference of O(1) errors, so its rounding is absolute: 1e-6
    (measured 3e-8), the gradient norm ``STEP2_RTOL`` (measured 2e-5). The sharded step-2 checkpoint resumed on 2
    processes loads the weights and the snapshot shards in place and each process its own replay buffer
    (``extra-rank<R>.safetensors``, next to the shards): step 3 is the uninterrupted one bitwise (its metrics row, every
    sharded tensor, every process's buffer)."""
    extra = {**THREE_STEPS, "optim.lr": 1e-5}
    for kind in ("fsdp", "ddp"):
        launch(kind, "toy/dro", "dro", overrides(tiny_dirs["sd15"], tmp_path / kind, **extra))
    sharded, ddp = rows(tmp_path / "fsdp"), rows(tmp_path / "ddp")
    assert sharded[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=1e-6)
    assert sharded[0]["grad_norm"] == pytest.approx(ddp[0]["grad_norm"], rel=STEP1_RTOL)
    for s, d in zip(sharded[1:], ddp[1:], strict=True):
        assert s["loss"] == pytest.approx(d["loss"], abs=1e-6)
        assert s["grad_norm"] == pytest.approx(d["grad_norm"], rel=STEP2_RTOL)
    start = checkpoint.step_dir(tmp_path / "fsdp" / "checkpoints", 2)
    launch(
        "fsdp",
        "toy/dro",
        "dro",
        overrides(tiny_dirs["sd15"], tmp_path / "again", **{**extra, "run.resume_from": start}),
    )
    folders = [checkpoint.step_dir(tmp_path / d / "checkpoints", 3) for d in ("fsdp", "again")]
    x, y = (checkpoint.read_sharded(f) for f in folders)
    assert x.keys() == y.keys() and any(k.startswith("extra/dro.snapshot.") for k in x)
    assert not any(k.startswith("extra/dro.buffer.") for k in x)  # the buffers are per process
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:3]
    for rank in (0, 1):
        mine, theirs = (checkpoint.load_per_rank(f, rank) for f in folders)
        assert mine and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert rows(tmp_path / "again")[-1] == sharded[-1]
