"""bench/memory.py rows of the video family: Wan2.1-T2V-1.3B and -14B from their published configs on the meta device
(exact parameter and byte counts per base option, LoRA at the wan targets), and the step code path on tiny configs."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.recipes.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory_wan", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "params", "lora_r32"),
    [
        ("wan21-1.3b", 1_418_996_800, 23_592_960),  # 30 blocks x (attn1 + attn2) x 4 projections x 32 x (1536 + 1536)
        ("wan21-14b", 14_288_491_584, 104_857_600),  # 40 blocks x 8 projections x 32 x (5120 + 5120)
    ],
)
def test_wan_rows_count_the_published_transformers(bench, name, params, lora_r32):
    spec = bench.MODELS[name]
    model = bench.build(spec, "meta", None)
    bench.add_lora(spec, model, 32)
    counts = bench.count(model)
    assert counts["linear"] + counts["other"] == params and counts["lora"] == lora_r32
    bf16, nf4 = bench.static_bytes(counts, "bf16"), bench.static_bytes(counts, "nf4+ckpt+8bit")
    assert bf16["base"] == 2 * params
    assert nf4["base"] == counts["linear"] * (0.5 + 4 / 64) + counts["other"] * 2
    assert bench.static_bytes(counts, "float8")["base"] == counts["linear"] + 2 * counts["other"]
    assert bf16["lora+grad"] == bf16["optim"] == 8 * lora_r32 and nf4["optim"] == 2 * lora_r32


def test_cpu_table_prints_the_wan_rows_and_umt5(bench, capsys):
    bench.main(["--device", "cpu", "--models", "wan21-1.3b", "--rank", "32"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| wan21-1.3b")]
    assert len(rows) == len(bench.OPTIONS) and "| 1.42 B | 23.6 M | bf16 | 2.64 |" in rows[0]
    assert "wan: UMT5-XXL encoder = 10.6 GB" in out


def test_wan_step_code_path_runs_on_cpu_with_a_tiny_config(bench, tmp_path, monkeypatch):
    """The GPU table's DPO pair step / plain step / forward through ``models.wan.Adapter.predict`` on 5-D latents."""
    monkeypatch.setitem(bench.MODELS, "wan21-1.3b", bench.tiny_specs(["wan21-1.3b"], tmp_path)["wan21-1.3b"])
    x, _, cond = bench.inputs(bench.MODELS["wan21-1.3b"], 2, 1024, "cpu")
    assert x.shape == (2, 4, 2, 2, 2) and list(cond) == ["encoder_hidden_states"]
    result = bench.run_one("wan21-1.3b", "bf16+ckpt", 4, 1, device="cpu")
    assert all(result[k] > 0 for k in ("dpo", "plain", "fwd"))
