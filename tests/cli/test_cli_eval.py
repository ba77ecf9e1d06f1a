"""``diffalign eval score | generate | compare`` end to end, in-process through ``main``.

Scorers: a real ``pickscore`` loaded from a tiny CLIP checkpoint saved in the published layout, and a scorer of
our own loaded by import path (``module:factory``), both through the command line's scorer specs.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli.main import main


CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tokenizers" / "clip"
PLUGIN = """
import numpy as np
import torch


class Brightness:
    name = "brightness"
    variant = "mean-rgb"

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=64):
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def __call__(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])
"""


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> Path:
    """A tiny CLIPModel + CLIP tokenizer + 32 px image processor in one folder (the PickScore_v1 layout)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    text |= {"max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
    }
    cfg = CLIPConfig(text_config=text, vision_config=vision | {"patch_size": 8}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(out)
    for f in CLIP_TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3).save_pretrained(
        out
    )
    return out


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_scorers.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorers:Brightness"


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four 24x40 images (not square, so the scorer's resize + crop runs), two prompts, sidecar .txt files."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(["a red cube", "a red cube", "a blue ball", "a blue ball"]):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(prompt)
    return root


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]


def test_eval_score_with_real_and_plugin_scorers(folder, pickscore_dir, plugin, tmp_path, capsys):
    from diffalign import scorers

    out = tmp_path / "run"
    spec = f"pickscore,path={pickscore_dir},processor_path={pickscore_dir},batch_size=3"
    assert main(["eval", "score", str(folder), "--scorer", spec, "--scorer", plugin, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split()[:2] == ["scorer", "mean"]
    assert "pickscore" in stdout and "brightness" in stdout and "report.html" in stdout
    rows = _rows(out)
    images = [Image.open(folder / r["path"]).convert("RGB") for r in rows]
    direct = scorers.load("pickscore", path=pickscore_dir, processor_path=pickscore_dir)(
        images, [r["prompt"] for r in rows]
    )
    assert [r["pickscore"] for r in rows] == pytest.approx(direct.tolist(), abs=1e-5)
    assert [r["brightness"] for r in rows] == pytest.approx([np.asarray(im).mean() / 255 for im in images])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorers"]["pickscore"]["variant"] == str(pickscore_dir)
    assert summary["stats"]["pickscore"]["n_prompts"] == 2
    assert (out / "report.html").read_text().count("<svg") == 2


def test_eval_compare_prints_and_writes(folder, plugin, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", "score", str(folder), "--scorer", plugin, "--out", str(a), "--no-report"]) == 0
    for p in folder.glob("*.png"):  # B: every image darker -> A wins every prompt
        Image.fromarray(np.asarray(Image.open(p)) // 2).save(p)
    assert main(["eval", "score", str(folder), "--scorer", plugin, "--out", str(b), "--no-report"]) == 0
    assert not (a / "report.html").exists()
    capsys.readouterr()
    cmp_dir = tmp_path / "cmp"
    assert main(["eval", "compare", str(a), str(b), "--labels", "new", "old", "--out", str(cmp_dir)]) == 0
    out = capsys.readouterr().out
    assert "win new>old" in out and "2/0/0" in out and "100.0%" in out
    cmp = json.loads((cmp_dir / "compare.json").read_text())
    assert cmp["scorers"]["brightness"]["win_rate"]["win_rate"] == 1.0
    assert (cmp_dir / "report.html").is_file()
    assert main(["eval", "compare", str(a), str(b), "--out", str(cmp_dir)]) == 1
    assert "compare.json exists" in capsys.readouterr().err


def test_eval_generate_tiny_sd15(tmp_path, plugin, capsys):
    from diffalign.models import tiny

    model = tiny.save("sd15", tmp_path / "model")
    out = tmp_path / "gen"
    argv = ["eval", "generate", "--family", "sd15", "--model", str(model), "--prompts", "validation", "--limit", "2"]
    argv += ["--steps", "2", "--cfg", "2.0", "--seed", "5", "--images-per-prompt", "2", "--resolution", "32"]
    argv += ["--scheduler", "ddim", "--scorer", plugin, "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert '"scheduler": "DDIMScheduler"' in stdout and '"steps": 2' in stdout
    rows = _rows(out)
    assert [r["seed"] for r in rows] == [5, 6, 7, 8]
    assert Image.open(out / rows[0]["path"]).size == (32, 32)
    protocol = json.loads((out / "summary.json").read_text())["protocol"]
    assert (protocol["guidance_scale"], protocol["height"], protocol["images_per_prompt"]) == (2.0, 32, 2)


def test_eval_generate_with_a_foreign_lora_is_one_line(tmp_path, plugin, capsys):
    from safetensors.torch import save_file

    from diffalign.models import tiny

    model = tiny.save("sd15", tmp_path / "model")
    (tmp_path / "lora").mkdir()
    save_file({"down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    argv = ["eval", "generate", "--family", "sd15", "--model", str(model), "--lora", str(tmp_path / "lora")]
    argv += ["--prompts", "validation", "--limit", "1", "--steps", "1", "--resolution", "32", "--scorer", plugin]
    assert main([*argv, "--out", str(tmp_path / "gen")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot load LoRA {tmp_path / 'lora'} into the sd15 pipeline: ValueError")
    assert not any("Traceback" in line for line in err)


def test_eval_errors_are_one_line(folder, plugin, tmp_path, capsys):
    assert main(["eval", "score", str(folder), "--scorer", "pickscor", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown scorer 'pickscor'; did you mean 'pickscore'") and "Traceback" not in err
    assert main(["eval", "score", str(folder), "--scorer", "no_such_module:X", "--out", str(tmp_path / "y")]) == 1
    assert "cannot import 'X' from 'no_such_module'" in capsys.readouterr().err
    assert (
        main(["eval", "score", str(folder), "--scorer", "clipscore,clip_at_zro=true", "--out", str(tmp_path / "w")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(
        "error: scorer spec 'clipscore,clip_at_zro=true': scorer 'clipscore' has no option 'clip_at_zro'"
    )
    assert "did you mean 'clip_at_zero'" in err and "Traceback" not in err
    (folder / "0.txt").unlink()
    assert main(["eval", "score", str(folder), "--scorer", plugin, "--out", str(tmp_path / "z")]) == 1
    assert "1 images have no sidecar .txt prompt" in capsys.readouterr().err
    argv = ["eval", "generate", "--family", "sd15", "--model", str(tmp_path / "no_model"), "--scorer", plugin]
    assert main([*argv, "--out", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --model=") and "no such folder" in err and "python -m diffalign.models.tiny sd15" in err
    )
    assert main(["eval", "compare", str(tmp_path / "nope"), str(tmp_path / "nope2")]) == 1
    assert "no scores.jsonl" in capsys.readouterr().err
    assert main(["eval"]) == 2
