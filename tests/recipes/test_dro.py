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
from tests.recipes.conftest import recipe_module, toy_overrides


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


def _ema(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared EMA's shadows (``training.ema``, saved by ``loop.save``), without its step count."""
    return {k: v for k, v in _part(state, loop.EMA_PREFIX).items() if k != "#step"}


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
    assert a.keys() == b.keys() and any(k.startswith("dro.buffer.cond.") for k in a)
    assert not any(k.startswith("dro.ema.") for k in a)  # the recipe keeps no EMA of its own
    for key in a:
        assert torch.equal(a[key], b[key]), key

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
