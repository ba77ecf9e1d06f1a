"""bench/gpu_suite.py on the CPU: one part end to end in --smoke, a part killed at its budget, a part skipped."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_suite(out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--smoke", str(out), *args], capture_output=True, text=True, timeout=170
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_smoke_step_part_writes_both_files_with_its_row(tmp_path):
    results, md = run_suite(tmp_path, "--parts", "step")
    assert [p["part"] for p in results["parts"]] == ["step"]
    part = results["parts"][0]
    assert part["status"] == "ok", part
    (row,) = part["rows"]
    assert row["name"] == "tiny" and row["status"] == "ok" and row["mode"] == "eager"
    assert row["plain_ms"] > 0 and row["dpo_ms"] > 0 and row["fwd_ms"] > 0
    assert math.isfinite(row["extra_fwd"]) and math.isfinite(row["dpo_over_plain"])
    assert results["env"]["torch"] == torch.__version__ and results["suite"]["device"] == "cpu"
    command = "python bench/step_cost.py --device cpu --dtype bf16 --sizes tiny --skip-memory --warmup 1 --repeats 2"
    assert part["command"] == command  # the suite's own --json path is left out
    lines = [ln for ln in md.splitlines() if ln.startswith("| tiny |")]
    assert len(lines) == 1
    assert f"CPU, torch {torch.__version__}" in lines[0] and "| bf16 |" in lines[0] and f"`{command}`" in lines[0]
    assert "| step | ok |" in md


def test_a_part_past_its_budget_is_killed_and_the_next_skipped(tmp_path):
    # 22 s: whatever the machine's speed, the 3 s that step is given leave memory less than its minimum of 20 s
    results, md = run_suite(tmp_path, "--parts", "step,memory", "--timeout", "step=3", "--budget", "22")
    step, memory = results["parts"]
    assert step["status"] == "timeout" and step["reason"] == "killed at its budget of 3 s"
    assert step["rows"] == [
        {"name": "tiny", "status": "not run", "reason": "not reached: the part's time budget ran out"}
    ]
    with pytest.raises(ProcessLookupError):
        os.kill(step["pid"], 0)  # killed with its process group and reaped
    assert memory["status"] == "skipped" and "of the 22 s budget, this part needs at least 20 s" in memory["reason"]
    assert "## Parts that failed or timed out" in md and "| memory | skipped |" in md


def test_memory_rows_that_cannot_run_here_are_skipped_up_front(suite, tmp_path):
    env = {"packages": {"bitsandbytes": "0.45.0", "torchao": None}, "capability": "9.0"}
    part = suite.memory_part(False, "cuda", env, tmp_path)
    skipped = {r["name"]: r["reason"] for r in part.skipped_rows}
    assert set(skipped) == {"flux1-dev float8+ckpt", "flux1-dev float8"}
    assert all("torchao is not installed" in reason for reason in skipped.values())
    command = next(r["command"] for r in part.skipped_rows if r["name"] == "flux1-dev float8")
    assert command == "python bench/memory.py --device cuda --rows flux1-dev:float8 --repeats 2 --timeout 150"
    assert part.expect[0] == "flux1-dev nf4+ckpt"  # the 24 GB target row first
    assert "--json" in part.args and "--json" not in part.command()
