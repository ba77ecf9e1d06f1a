"""Generate-and-score with a tiny SD1.5 pipeline and a LoRA: rows, seeds, the recorded protocol, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.eval import EvalError, GenerationProtocol, compare_runs, generate_and_score, load_prompts
from tests.eval.conftest import MeanScorer


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    """A tiny SD1.5 folder and a LoRA for it with non-zero weights (a zero-init LoRA would change nothing)."""
    from diffalign import models
    from diffalign.models import lora, tiny

    root = tmp_path_factory.mktemp("gen")
    model_dir = tiny.save("sd15", root / "model", seed=0)
    adapter = models.load("sd15", str(model_dir))
    lora.add_lora(adapter, lora.LoraSpec(rank=4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in lora.trainable_parameters(adapter).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model_dir, lora.save_lora(adapter, root / "lora")


def _protocol(model_dir, lora_dir=None, **kw):
    base = {"family": "sd15", "model": str(model_dir), "lora": lora_dir, "steps": 2, "guidance_scale": 3.0, "seed": 10}
    return GenerationProtocol(**(base | {"images_per_prompt": 2, "height": 32, "width": 32} | kw))


def _pixels(run, rows):
    return [np.asarray(Image.open(run / r["path"]), dtype=np.int16) for r in rows]


def test_generate_and_score_records_protocol_and_rows(tiny_sd15, tmp_path):
    model_dir, lora_dir = tiny_sd15
    prompts = load_prompts("validation", limit=3)
    out = tmp_path / "lora_run"
    summary = generate_and_score(
        _protocol(model_dir, str(lora_dir)), "validation", [MeanScorer()], out, limit=3, batch_size=4, progress=False
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2
    assert [(r["prompt"], r["prompt_id"], r["seed"]) for r in rows] == [
        (p.prompt, p.prompt_id, 10 + i * 2 + k) for i, p in enumerate(prompts) for k in range(2)
    ]
    assert [r["path"] for r in rows] == [f"images/{i:05d}_{k:02d}.png" for i in range(3) for k in range(2)]
    for r, px in zip(rows, _pixels(out, rows), strict=True):
        assert px.shape == (32, 32, 3)
        assert r["brightness"] == pytest.approx(px.mean() / 255, abs=1e-6)
    proto = summary["protocol"]
    assert proto["scheduler"] == "EulerDiscreteScheduler" and proto["pipeline"] == "StableDiffusionPipeline"
    assert (proto["steps"], proto["guidance_scale"], proto["seed"], proto["images_per_prompt"]) == (2, 3.0, 10, 2)
    assert (proto["height"], proto["width"], proto["lora"], proto["dtype"]) == (32, 32, str(lora_dir), "fp32")
    assert "seed + prompt_index" in proto["seed_rule"] and proto["scheduler_config"]["num_train_timesteps"] == 1000
    assert summary["prompts"]["count"] == 3 and len(summary["prompts"]["sha256"]) == 64
    assert json.loads((out / "summary.json").read_text()) == summary

    # no LoRA, same protocol, two batch sizes: the same seeds; images independent of batching; the LoRA changed images
    base_runs = []
    for batch in (1, 3):
        base = tmp_path / f"base_b{batch}"
        generate_and_score(
            _protocol(model_dir), prompts, [MeanScorer()], base, batch_size=batch, report=False, progress=False
        )
        base_rows = [json.loads(line) for line in (base / "scores.jsonl").read_text().splitlines()]
        assert [r["seed"] for r in base_rows] == [r["seed"] for r in rows]
        base_runs.append(_pixels(base, base_rows))
    for a, b in zip(*base_runs, strict=True):
        assert np.abs(a - b).max() <= 1  # float batching noise may move a uint8 value by one at most
    assert np.abs(base_runs[0][0] - base_runs[0][1]).max() > 5  # different seeds give different images
    diffs = [np.abs(a - b).max() for a, b in zip(_pixels(out, rows), base_runs[0], strict=True)]
    assert min(diffs) > 5, "the LoRA was not applied"

    cmp = compare_runs(out, tmp_path / "base_b1", labels=("lora", "base"))
    assert cmp["scorers"]["brightness"]["win_rate"]["n"] == 3
    assert not [n for n in cmp["notes"] if "protocols differ" in n]  # lora/model are not protocol differences


def test_scheduler_choice_and_bad_protocols(tiny_sd15, tmp_path):
    model_dir, _ = tiny_sd15
    out = tmp_path / "ddim"
    summary = generate_and_score(
        _protocol(model_dir, scheduler="ddim", images_per_prompt=1),
        "validation",
        [MeanScorer()],
        out,
        limit=1,
        report=False,
        progress=False,
    )
    assert summary["protocol"]["scheduler"] == "DDIMScheduler"
    with pytest.raises(EvalError, match="unknown scheduler 'eulr'; did you mean 'euler'"):
        generate_and_score(
            _protocol(model_dir, scheduler="eulr"),
            "validation",
            [MeanScorer()],
            tmp_path / "x",
            limit=1,
            progress=False,
        )
    with pytest.raises(EvalError, match=r"LoRA folder \./no/such/lora does not exist"):
        generate_and_score(
            _protocol(model_dir, lora="./no/such/lora"),
            "validation",
            [MeanScorer()],
            tmp_path / "y",
            limit=1,
            progress=False,
        )
    with pytest.raises(EvalError, match="steps must be >= 1"):
        _protocol(model_dir, steps=0)
    with pytest.raises(EvalError, match="height must be a positive multiple of 8"):
        _protocol(model_dir, height=30)
    with pytest.raises(EvalError, match=r"unknown model family 'sd1\.5'"):
        _protocol(model_dir, family="sd1.5")


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (["down.weight"], "cannot load LoRA .* into the sd15 pipeline: ValueError: "),
        (["unet.nowhere.to_q.lora_A.weight", "unet.nowhere.to_q.lora_B.weight"], "into the sd15 pipeline: "),
        (["nowhere.to_q.lora_A.weight", "nowhere.to_q.lora_B.weight"], "none of its tensor names match"),
    ],
)
def test_lora_with_foreign_tensor_names_is_a_one_line_error(tiny_sd15, tmp_path, keys, needle):
    """diffalign's own LoRA layout is unet.<module>.lora_A/B.weight; anything else is named, never half-loaded."""
    from safetensors.torch import save_file

    model_dir, _ = tiny_sd15
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file({k: torch.zeros(4, 4) for k in keys}, str(lora_dir / "pytorch_lora_weights.safetensors"))
    scorer = MeanScorer()
    with pytest.raises(EvalError, match=needle) as info:
        generate_and_score(
            _protocol(model_dir, lora=str(lora_dir)), "validation", [scorer], tmp_path / "run", limit=1, progress=False
        )
    assert "\n" not in str(info.value) and str(lora_dir) in str(info.value) and scorer.calls == []
