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
