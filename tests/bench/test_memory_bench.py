"""bench/memory.py on CPU: real-size configs on the meta device, exact byte counts, and a clear GPU note."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.recipes.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_table_counts_the_published_models(bench, capsys):
    bench.main(["--device", "cpu", "--models", "sd35-medium", "flux1-dev", "--rank", "4"])
    out = capsys.readouterr().out
    assert "need a CUDA GPU" in out
    flux_rows = [line for line in out.splitlines() if line.startswith("| flux1-dev")]
    assert len(flux_rows) == len(bench.OPTIONS)
    assert "| 11.90 B |" in flux_rows[0]  # FLUX.1-dev transformer: 11.9 B parameters


def test_sd35_medium_lora_reaches_the_dual_attention_blocks(bench):
    spec = bench.MODELS["sd35-medium"]
    model = bench.build(spec, "meta", None)
    bench.add_lora(spec, model, 4)
    hit = {n.split(".attn2.")[0] for n, _ in model.named_parameters() if ".attn2." in n and "lora_A" in n}
    assert hit == {f"transformer_blocks.{i}" for i in range(13)}  # dual_attention_layers 0-12


def test_step_code_path_runs_on_cpu_with_tiny_configs(bench, tmp_path, monkeypatch):
    """The GPU table's step (DPO pair step, plain step, no-grad forward through the adapters' own ``predict``)
    on tiny configs of each architecture, on CPU: finite times, and the quantized options refuse the CPU."""
    import json

    from diffalign.models import tiny

    tiny_models = {
        "tiny-flux": (tiny.flux(0)["transformer"], bench.Spec("", "flux", 4, 8, 32, 16)),
        "tiny-sd35": (tiny.sd35(0)["transformer"], bench.Spec("", "sd3", 4, 8, 32, 32)),
        "tiny-sdxl": (tiny.sdxl(0)["unet"], bench.Spec("", "sdxl", 4, 8, 32, 16)),
    }
    for name, (model, spec) in tiny_models.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"_class_name": type(model).__name__, **dict(model.config)}, default=list))
        monkeypatch.setitem(bench.MODELS, name, bench.Spec(str(path), *list(vars(spec).values())[1:]))
        result = bench.run_one(name, "bf16+ckpt", 4, 1, device="cpu", resolution=128)
        assert all(result[k] > 0 for k in ("dpo", "plain", "fwd")), name
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bench.run_one("tiny-flux", "nf4+ckpt+8bit", 4, 1, device="cpu", resolution=128)


def test_full_table_bytes_by_hand(bench, capsys):
    """The full fine-tuning rows: optimizer state by hand for one matrix and one vector, FSDP2 and ZeRO-3 shard what
    DDP replicates (per-tensor padding vs flat partitions), ZeRO-2 replicates the bf16 weights, reference and EMA."""
    assert bench.optimizer_bytes((1280, 320), "adamw") == 8 * 1280 * 320
    assert bench.optimizer_bytes((1280, 320), "adamw8bit") == 2 * 1280 * 320 + 8 * (1280 * 320 // 256)
    assert bench.optimizer_bytes((320,), "adamw8bit") == 8 * 320  # under 4096 elements: 32-bit moments
    assert bench.optimizer_bytes((1280, 320), "adafactor") == 4 * (1280 + 320)
    assert bench.optimizer_bytes((320, 4, 3, 3), "adafactor") == 4 * (320 * 4 * 3 + 320 * 4 * 3)
    assert bench.optimizer_bytes((320,), "adafactor") == 4 * 320
    shapes = [(5, 3), (7,)]  # 22 parameters; FSDP2 on 2: (3, 3) + (4,) = 13 per process
    assert bench.full_bytes(shapes, "DDP", 1, "adamw") == {
        "weights": 88,
        "grads": 88,
        "optim": 176,
        "ref": 44,
        "ema": 88,
    }
    assert bench.full_bytes(shapes, "FSDP2", 2, "adamw") == {
        "weights": 52,
        "grads": 52,
        "optim": 104,
        "ref": 26,
        "ema": 52,
    }
    zero2 = bench.full_bytes(shapes, "ZeRO-2", 2, "adamw")
    assert zero2 == {"weights": 44, "grads": 22, "optim": 88 + 44, "ref": 44, "ema": 88}
    zero3 = bench.full_bytes(shapes, "ZeRO-3", 2, "adamw")
    assert zero3 == {"weights": 22, "grads": 22, "optim": 88 + 44, "ref": 22, "ema": 44}
    assert (
        bench.fits(24 * bench.GB) == "24"
        and bench.fits(24 * bench.GB + 1) == "48"
        and bench.fits(81 * bench.GB) == "-"
    )
    bench.main(["--full", "--models", "sd15"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sd15")]
    assert len(rows) == 1 + 3 * 3 and all("| 0.86 B |" in r for r in rows)  # SD1.5 UNet: 859.5 M parameters
    assert rows[0].split(" | ")[11] == "17.6"  # DDP with AdamW: 4 + 4 + 8 + 2 + 4 = 22 bytes per parameter


def test_cpu_table_counts_the_issue_24_models(bench, capsys):
    """Qwen-Image 20.4 B (38.05 GiB of bf16 = the release's 40.86 GB of safetensors), FLUX.2-dev 32.2 B, Z-Image 6.2 B;
    their text encoders' resident bf16 sizes are listed, and every row names the smallest GPU its static state fits."""
    bench.main(["--device", "cpu", "--models", "qwen-image", "flux2-dev", "z-image-turbo", "--rank", "4"])
    out = capsys.readouterr().out
    rows = {name: [ln for ln in out.splitlines() if ln.startswith(f"| {name} ")] for name in bench.MODELS}
    assert "| 20.43 B |" in rows["qwen-image"][0] and "| 38.05 |" in rows["qwen-image"][0]
    assert "| 32.22 B |" in rows["flux2-dev"][0] and "| 6.15 B |" in rows["z-image-turbo"][0]
    assert all(row.rstrip(" |").endswith("GB") for name in ("qwen-image", "flux2-dev") for row in rows[name])
    assert "flux2: Mistral-Small-3.1-24B = 44.7 GB" in out
