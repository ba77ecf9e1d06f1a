"""End-to-end tests of recipes/dro.py (Diffusion-DRO) on the tiny SD1.5 model and the Pick-a-Pic fixture's winners."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import config
from diffalign.training import checkpoint, loop
from tests.recipes.conftest import ROOT, recipe_module, run_subprocess, toy_overrides, two_process_command


@pytest.fixture(scope="module")
def dro_recipe():
    return recipe_module("dro")


def _state(out: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    folder = checkpoint.latest(out / "checkpoints") if step is None else out / "checkpoints" / f"step-{step:08d}"
    return load_file(str(folder / "trainable.safetensors"))


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(("dro.", loop.EMA_PREFIX))}


def _buffer(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """Process ``rank``'s replay buffer as checkpoint ``folder`` holds it (``extra-rank<rank>.safetensors``)."""
    return load_file(str(checkpoint.per_rank_file(folder, rank)))


def _ema(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared EMA's shadows (``training.ema``, saved by ``loop.save``), without its step count."""
    return {k: v for k, v in _part(state, loop.EMA_PREFIX).items() if k != "#step"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _launch_two(overrides: list[str]) -> None:
    done = run_subprocess(two_process_command("toy/dro", overrides, "dro"), ROOT, env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr


# ~40 s on 2 busy cores: two 2-process launches
def test_two_processes_resume_bitwise_with_every_process_buffer(tiny_dirs, tmp_path):
    """2 processes (DDP, gloo) x batch 2, buffer 6: each process fills its own replay buffer from its own groups. 3
    steps straight == resumed from the step-1 checkpoint on 2 processes, bitwise: the losses of steps 2-3, the
    step-3 LoRA, EMA, snapshot and every process's buffer, and the exported LoRA. Each process resumes its OWN
    buffer (``extra-rank<R>.safetensors``). With the main process's buffer on both (before they were saved per
    process) this fails at the step-2 metrics: the step-1 trajectories stay in the buffer (6 slots, 2 new a step)
    and process 1 draws pairs from process 0's. lr 1e-5 keeps the hinge active (at toy/dro's 1e-3 the margin is met
    after step 1: loss and gradient 0, so a wrong buffer would move nothing)."""
    common = {"run.save_every": 1, "run.keep_last": 5, "run.log_every": 1, "run.max_steps": 3}
    common.update({"dro.buffer_size": 6, "optim.lr": 1e-5})
    ref_out, again_out = tmp_path / "ref", tmp_path / "again"
    _launch_two(toy_overrides(tiny_dirs["sd15"], ref_out, **common))
    start = checkpoint.step_dir(ref_out / "checkpoints", 1)
    _launch_two(toy_overrides(tiny_dirs["sd15"], again_out, **common, **{"run.resume_from": start}))
    ref, again = _rows(ref_out), _rows(again_out)
    assert [r["step"] for r in again] == [2, 3]
    assert all(r["grad_norm"] > 0 for r in ref)  # the hinge is active at every step: the pairs drawn move the LoRA
    assert again == ref[1:]  # every metric bitwise: loss, its terms, the buffer's mean timestep and size
    a, b = (checkpoint.step_dir(d / "checkpoints", 3) for d in (ref_out, again_out))
    sa, sb = _state(ref_out, 3), _state(again_out, 3)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    buffers = [_buffer(a, r) for r in (0, 1)]
    assert any(k.startswith("dro.buffer.") for k in buffers[0])
    assert any(not torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])  # the processes' buffers differ
    for r in (0, 1):
        mine, theirs = _buffer(a, r), _buffer(b, r)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    la, lb = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (ref_out, again_out))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_trains_and_resumes_bitwise_with_buffer_snapshot_and_ema(dro_recipe, tiny_dirs, tmp_path):
    """3 steps straight == 1 step, stop, resume from the step-1 checkpoint, 2 more: LoRA, EMA, snapshot, replay
    buffer and the exported LoRA are bit-identical. toy/dro: batch 2, buffer 3, snapshot every 2 micro-steps, the
    shared EMA (``ema: {enabled: true}``)."""
    common = {"run.save_every": 1, "run.keep_last": 5, "run.log_every": 1}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = dro_recipe.main(
        ["--config", "toy/dro", *toy_overrides(tiny_dirs["sd15"], ref_out, **common, **{"run.max_steps": 3})]
    )
    history = ref["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["loss"] == pytest.approx(0.001, abs=1e-7)  # policy == reference: every pair pays the margin
    lines = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3] and "loss/implicit_acc" in lines[0]
    assert [row["buffer/size"] for row in lines] == [2.0, 3.0, 3.0]  # 2 trajectories a step, the newest 3 kept

    cut = toy_overrides(tiny_dirs["sd15"], cut_out, **common)
    dro_recipe.main(["--config", "toy/dro", *cut, "run.max_steps=1"])
    resumed = dro_recipe.main(["--config", "toy/dro", *cut, "run.max_steps=3", "run.resume_from=latest"])
    assert len(resumed["history"]) == 2 and resumed["history"][-1]["loss"] == history[-1]["loss"]
    a, b = _state(ref_out), _state(cut_out)
    assert a.keys() == b.keys() and not any(k.startswith("dro.buffer.") for k in a)  # the buffer is per process
    assert not any(k.startswith("dro.ema.") for k in a)  # the recipe keeps no EMA of its own
    for key in a:
        assert torch.equal(a[key], b[key]), key
    buf_a, buf_b = (_buffer(checkpoint.latest(d / "checkpoints"), 0) for d in (ref_out, cut_out))
    assert buf_a.keys() == buf_b.keys() and any(k.startswith("dro.buffer.cond.") for k in buf_a)
    assert all(torch.equal(buf_a[k], buf_b[k]) for k in buf_a)

    # the EMA starts as the weights (decay 0 after the first update), then lags them
    s1, s2 = _state(ref_out, 1), _state(ref_out, 2)
    lora1 = _lora(s1)
    assert _ema(s1).keys() == lora1.keys() and int(s1[loop.EMA_PREFIX + "#step"]) == 1
    assert all(torch.equal(_ema(s1)[k], lora1[k]) for k in lora1)
    # the snapshot is refreshed after micro-step 2: at step 3 it holds the LoRA of step 2; at steps 1-2 the init
    assert all(torch.equal(_part(a, "dro.snapshot.")[k], v) for k, v in _lora(s2).items())
    assert all(torch.equal(_part(s2, "dro.snapshot.")[k], _part(s1, "dro.snapshot.")[k]) for k in lora1)
    assert any(not torch.equal(_ema(a)[k], v) for k, v in _lora(a).items() if "lora_B" in k)
    # lora/ is the EMA: each exported tensor is one of the EMA tensors, none is the raw LoRA's lora_B
    exported = load_file(str(ref_out / "lora" / "pytorch_lora_weights.safetensors"))
    ema = list(_ema(a).values())
    assert exported and all(any(v.shape == e.shape and torch.equal(v, e) for e in ema) for v in exported.values())
    assert all(
        torch.equal(exported[k], load_file(str(cut_out / "lora" / "pytorch_lora_weights.safetensors"))[k])
        for k in exported
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dro.snapshot_every=0", "dro.snapshot_every=0 must be > 0"),
        ("dro.use_ema=false", "unknown key 'dro.use_ema'"),  # the shared ema: section replaced it
        ("dro.ema_decay=0.999", "unknown key 'dro.ema_decay'"),
        ("ema.decay=1.5", "ema.decay=1.5 must be in [0, 1]"),
        ("model.family=sd3", "dro.perturb_timesteps=true is not supported on model.family='sd3'"),
        ("model.family=wan", "model.family='wan' is not supported by dro"),
        ("lora.text_encoder=true", "lora.text_encoder=true is not supported by dro"),
        ("train.text_encoders=true", "train.text_encoders=true is not supported by dro"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load("toy/dro", [override], schema=config.DROConfig)


def test_shipped_dro_configs_bind():
    for name in ("toy/dro", "duo/dro", "sd15/dro", "sd3/dro_lora"):
        cfg = config.load(name, [], schema=config.DROConfig)
        assert cfg.loss.name == "dro" and cfg.loss.params == {"margin": 0.001}
        assert cfg.ema.enabled and cfg.ema.decay == 0.9999 and cfg.train.mode == "lora"  # the authors' --use_ema
    sd15 = config.load("sd15/dro", [], schema=config.DROConfig)
    assert (sd15.optim.lr, sd15.optim.batch_size, sd15.optim.grad_accum, sd15.dro.snapshot_every) == (1e-4, 4, 16, 16)
    assert sd15.run.max_steps * sd15.optim.grad_accum == 25600  # the authors' --num_steps, in micro-steps
    assert (sd15.dro.num_steps, sd15.dro.guidance_scale, sd15.dro.buffer_size, sd15.data.proportion_empty_prompts) == (
        20,
        1.0,
        4,
        0.2,
    )
    sd3 = config.load("sd3/dro_lora", [], schema=config.DROConfig)
    assert sd3.model.family == "sd3" and not sd3.dro.perturb_timesteps  # the flow grid has no DDPM offsets


def test_resume_on_fewer_processes_or_from_an_old_checkpoint_warns(dro_recipe, tmp_path, caplog):
    """A checkpoint with the buffers of 2 processes resumed on 1 drops process 1's with a warning; one from before
    the per-process buffers (no ``extra-rank<R>.safetensors``) warns on 2 processes that all resume the main one's;
    the same process count says nothing. (More processes than buffers: ``checkpoint.load_per_rank`` refuses.)"""
    two, old = tmp_path / "two", tmp_path / "old"
    for folder in (two, old):
        folder.mkdir()
    for rank in (0, 1):
        (two / f"extra-rank{rank}.safetensors").write_bytes(b"")  # only the names are read
    with caplog.at_level("WARNING", logger="diffalign.dro"):
        dro_recipe.buffers_resumed(two, 2)
        assert not caplog.records
        dro_recipe.buffers_resumed(two, 1)
        dro_recipe.buffers_resumed(old, 2)
    assert "the buffers of processes [1] are dropped" in caplog.records[0].getMessage()
    assert "main process's replay buffer only" in caplog.records[1].getMessage()
