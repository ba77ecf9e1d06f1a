"""Self-NPO, Diffusion-DRO and LPO (stepwise_pref) under DeepSpeed ZeRO-2 / ZeRO-3 (``training.zero``) on 2 CPU
processes (gloo), launched as ``diffalign run --distributed zero2|zero3`` does, against the same 2-process runs under
DDP (test_zero.py launches them; test_fsdp_online.py runs the same recipes under FSDP2).

Self-NPO's EMA teacher and DRO's policy snapshot are swapped into the one denoiser for their no-grad rollouts: under
ZeRO-2 the module holds the whole weights (their storage is pointed at the copy, as under DDP); under ZeRO-3 the
copies are gathered whole from the fp32 partitions (``zero.trained_values``) and written into the module's partitions
for the rollout and back after it (``zero.swapped_in``: ``GatheredParameters``). Every process makes the same
forwards under ZeRO-3 (``run.lockstep``: Self-NPO's teacher makes the maximum number of DDIM steps over processes).
The forwards see DDP's weights, so step 1's figures agree to summation-order rounding (rel 1e-6), its averaged
gradient (AdamW first moments of the consolidated checkpoints) to ``STEP1_RTOL``; step 2 runs with weights one Adam
update apart: ``STEP2_RTOL`` (LPO: its beta 500 amplifies that rounding, rel 1e-3 on the loss as in
test_fsdp_online.py). Self-NPO and DRO train at lr 1e-3 so that the copy swapped in at step 2 differs enough from the
trained weights to show: ``zero.swapped_in`` leaving the trained weights in place under ZeRO-3 makes step 2's gradient
off by rel 7.5e-3 (Self-NPO) and 7.7e-4 (DRO; ``loss.margin: 1`` keeps every pair in the hinge), against 5e-6 and
4e-7 measured when right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.training import checkpoint
from tests.recipes.conftest import two_process_command
from tests.recipes.test_fsdp import gradients, rows, steps
from tests.recipes.test_fsdp_online import STEP1_RTOL, STEP2_RTOL, THREE_STEPS, lora_names, overrides, relative
from tests.recipes.test_zero import launch, tensors_equal, zero_command


TWO_STEPS = {**THREE_STEPS, "run.max_steps": 2}
STAGES = {"zero2": 2, "zero3": 3, "ddp": None}


def launch_all(tiny_dir: Path, root: Path, config: str, recipe: str, kinds: dict[str, dict]) -> dict[str, Path]:
    """One 2-process launch per kind (zero2, zero3 or ddp) with its own overrides; the output folders by kind."""
    out = {}
    for kind, extra in kinds.items():
        out[kind] = root / kind
        args = overrides(tiny_dir, out[kind], **extra)
        cmd = two_process_command(config, args, recipe) if kind == "ddp" else zero_command(kind, args, config, recipe)
        launch(cmd, STAGES[kind])
    return out


def assert_equals_ddp(runs: dict[str, Path], tiny_dir: Path, config: str, step2_rtol: float = STEP2_RTOL):
    """Every ZeRO run against the DDP run: step 1's loss (rel 1e-6) and gradient norm, the averaged gradient of step 1
    (``STEP1_RTOL``); step 2's loss and averaged gradient (``step2_rtol``)."""
    names = lora_names("sd15", tiny_dir, config)
    d1, d2 = rows(runs["ddp"])[:2]
    g1_d, g2_d = gradients(steps(runs["ddp"], 1, 2), names)
    assert d1["grad_norm"] > 0 and d2["grad_norm"] > 0  # step 2 has a gradient (not rounding noise) to compare
    for kind in (k for k in runs if k != "ddp"):
        z1, z2 = rows(runs[kind])[:2]
        assert z1["loss"] == pytest.approx(d1["loss"], rel=1e-6, abs=1e-9), kind
        assert z1["grad_norm"] == pytest.approx(d1["grad_norm"], rel=STEP1_RTOL), kind
        assert z2["loss"] == pytest.approx(d2["loss"], rel=step2_rtol, abs=1e-6), kind
        g1, g2 = gradients(steps(runs[kind], 1, 2), names)
        assert relative(g1, g1_d) <= STEP1_RTOL, (kind, relative(g1, g1_d))
        assert relative(g2, g2_d) <= step2_rtol, (kind, relative(g2, g2_d))


# 59 s (up to 150 s on 2 busy cores): three 2-process launches of 3 steps and a resumed one
def test_selfnpo_under_zero2_and_zero3_equals_ddp(tiny_dirs, tmp_path):
    """Self-NPO with 1 sample per process: the processes need different numbers of teacher DDIM steps (the logged
    mean of two integers is not one), so under ZeRO-3 each makes the maximum (the spare forwards discarded); the EMA
    teacher is gathered whole and swapped into the partitions. Both stages equal DDP (module docstring), and the EMA
    in the checkpoints (updated from the gathered weights) equals DDP's to Adam's rounding. The ZeRO-3 step-2
    checkpoint resumed under ZeRO-3 gives step 3 bitwise (weights, AdamW state, the teacher's EMA)."""
    from safetensors.torch import load_file

    extra = {
        **THREE_STEPS,
        "optim.batch_size": 1,
        "optim.lr": 1e-3,
        "selfnpo.num_ddim_steps": 8,
        "selfnpo.max_teacher_steps": 8,
        "selfnpo.ema_decay": 0.9,
    }
    runs = launch_all(tiny_dirs["sd15"], tmp_path, "toy/selfnpo", "selfnpo", dict.fromkeys(STAGES, extra))
    ddp = rows(runs["ddp"])
    assert any(r["teacher/steps"] != int(r["teacher/steps"]) for r in ddp)  # the processes' counts differed
    for kind in ("zero2", "zero3"):
        assert [r["teacher/steps"] for r in rows(runs[kind])] == [r["teacher/steps"] for r in ddp], kind
    assert_equals_ddp(runs, tiny_dirs["sd15"], "toy/selfnpo")
    want = load_file(str(steps(runs["ddp"], 3)[0] / "trainable.safetensors"))
    for kind in ("zero2", "zero3"):
        got = load_file(str(steps(runs[kind], 3)[0] / "trainable.safetensors"))
        ema = [k for k in want if k.startswith("ema.")]  # the teacher, saved whole by every stage
        assert ema and got.keys() == want.keys(), kind
        for k in ema:  # the same CPU runs every time: measured 0 (ZeRO-2) and 3e-7 (ZeRO-3)
            assert (got[k] - want[k]).abs().max() <= 1e-5, (kind, k)
    # the ZeRO-3 step-2 checkpoint resumed under ZeRO-3 (the teacher's EMA loaded whole): step 3 bitwise
    again = overrides(
        tiny_dirs["sd15"], tmp_path / "again", **{**extra, "run.resume_from": steps(runs["zero3"], 2)[0]}
    )
    launch(zero_command("zero3", again, "toy/selfnpo", "selfnpo"), 3)
    tensors_equal(*(steps(d, 3)[0] for d in (runs["zero3"], tmp_path / "again")))


# 59 s (up to 120 s on 2 busy cores): three 2-process launches of 2 steps and a resumed one
def test_dro_under_zero2_and_zero3_equals_ddp(tiny_dirs, tmp_path):
    """DRO's policy snapshot (the trained weights at the last refresh; ZeRO-3: gathered whole, swapped into the
    partitions for the rollout) fills each process's replay buffer; both stages equal DDP (module docstring). The
    toy config's shared EMA runs under ZeRO-2; ZeRO-3 refuses ``ema.enabled`` (``zero.config_problem``), so that run
    has none (the EMA does not enter training: the snapshot is of the trained weights). The ZeRO-3 step-1 checkpoint
    resumed under ZeRO-3 gives step 2 bitwise (weights, AdamW state, snapshot, every process's buffer)."""
    extra = {**TWO_STEPS, "optim.lr": 1e-3, "loss.margin": 1.0}  # every pair in the hinge at step 2 too
    kinds = {"zero2": extra, "zero3": {**extra, "ema.enabled": "false"}, "ddp": extra}
    runs = launch_all(tiny_dirs["sd15"], tmp_path, "toy/dro", "dro", kinds)
    assert_equals_ddp(runs, tiny_dirs["sd15"], "toy/dro")
    # the ZeRO-3 step-1 checkpoint resumed under ZeRO-3 (the snapshot whole, each process its own buffer): step 2
    # bitwise, the weights, AdamW state and every process's buffer
    start = steps(runs["zero3"], 1)[0]
    again = overrides(tiny_dirs["sd15"], tmp_path / "again", **{**kinds["zero3"], "run.resume_from": start})
    launch(zero_command("zero3", again, "toy/dro", "dro"), 3)
    folders = [steps(d, 2)[0] for d in (runs["zero3"], tmp_path / "again")]
    tensors_equal(*folders)
    for rank in (0, 1):
        mine, theirs = (checkpoint.load_per_rank(f, rank) for f in folders)
        assert mine and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# 43 s (up to 110 s on 2 busy cores): three 2-process launches of 2 steps
def test_lpo_under_zero2_and_zero3_mines_and_trains_like_ddp(tiny_dirs, tmp_path):
    """LPO's mining round sampled with partitioned weights (ZeRO-3: every process the same forwards) gives DDP's
    pairs; step 1's loss is -logsigmoid(0) exactly on all; step 1's averaged gradient equals DDP's to ``STEP1_RTOL``,
    step 2's loss and gradient to rel 1e-3 (LPO's beta 500 amplifies the rounding of one update: measured 8e-5 and
    5e-5 under ZeRO-3)."""
    from diffalign.terms.stepwise import MinedPairs

    extra = {
        "run.max_steps": 2,
        "run.log_every": 1,
        "run.save_every": 1,
        "run.keep_last": 10,
        "stepwise.save_pairs": "true",
        "stepwise.sample_batch_size": 2,
        "optim.batch_size": 2,
    }
    runs = launch_all(tiny_dirs["sd15"], tmp_path, "toy/lpo", "stepwise_pref", dict.fromkeys(STAGES, extra))
    a = MinedPairs.load(runs["ddp"] / "pairs" / "round-00000000.safetensors")
    for kind in ("zero2", "zero3"):
        b = MinedPairs.load(runs[kind] / "pairs" / "round-00000000.safetensors")
        assert a.prompts == b.prompts and torch.equal(a.step_index, b.step_index), kind
        for key, value in a.tensors().items():
            torch.testing.assert_close(b.tensors()[key], value, rtol=1e-6, atol=1e-6, msg=(kind, key))
        assert rows(runs[kind])[0]["loss"] == rows(runs["ddp"])[0]["loss"] == torch.tensor(2.0).log().item()
    assert_equals_ddp(runs, tiny_dirs["sd15"], "toy/lpo", step2_rtol=1e-3)
