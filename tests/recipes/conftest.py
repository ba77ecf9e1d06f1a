"""Helpers to run recipes in-process (cheap) or as subprocesses (for SIGKILL and multi-process tests)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.training import checkpoint, state_io
from tests.conftest import unused_port


ROOT = Path(__file__).resolve().parents[2]


def recipe_module(name: str = "offline_pref"):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the recipe look their module up
    spec.loader.exec_module(module)
    return module


def toy_overrides(tiny_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {
        "model.path": str(tiny_dir),
        "data.path": str(ROOT / "assets" / "pickapic_tiny"),
        "run.output_dir": str(out_dir),
        "run.report_to": "[]",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def recipe_command(config: str, overrides: list[str], recipe: str = "offline_pref") -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--config", config, *overrides]


def two_process_command(config: str, overrides: list[str], recipe: str = "offline_pref") -> list[str]:
    """``recipe_command`` under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU, a free port)."""
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd = recipe_command(config, overrides, recipe)
    return [cmd[0], *launch, "--main_process_port", str(unused_port()), *cmd[1:]]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def kill_once_saved(cmd: list[str], out: Path, step: int, env: dict[str, str] | None = None) -> None:
    """Start ``cmd`` (a launch writing into ``out``) in its own session and SIGKILL that whole group (launcher and
    trainers, the processes this call started) as soon as checkpoint ``step`` is complete; it must still be running."""
    import signal
    import time

    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env() | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = checkpoint.step_dir(out / "checkpoints", step) / checkpoint.MARKER
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not marker.exists():
            time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def recipe():
    return recipe_module()


def run_subprocess(
    cmd: list[str], cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = child_env() | (env or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def averaged_gradients(out: Path, steps: int) -> list[torch.Tensor]:
    """The (clipped) gradient each optimizer step applied, read back from the AdamW first moments of the
    checkpoints ``step-1 .. step-<steps>``: ``m_t = b1 m_{t-1} + (1 - b1) g_t``, so ``g_t = (m_t - b1 m_{t-1}) /
    (1 - b1)``, one flat float64 vector per step. Linear in the gradients, unlike the weights Adam moves."""
    grads, before = [], None
    for step in range(1, steps + 1):
        saved = state_io.load(checkpoint.step_dir(out / "checkpoints", step) / "optimizer")
        b1 = saved["param_groups"][0]["betas"][0]
        m = torch.cat([saved["state"][k]["exp_avg"].double().flatten() for k in sorted(saved["state"])])
        grads.append((m - (b1 * before if before is not None else 0)) / (1 - b1))
        before = m
    return grads


@pytest.fixture(scope="module")
def stock_pipes(tiny_dirs):
    """A stock diffusers pipeline of every tiny family (``models.tiny.PIPELINES``), to load the LoRAs recipes export."""
    import diffusers

    from diffalign.models import tiny

    pipes = {}
    for family in tiny.FAMILIES:
        pipe = getattr(diffusers, tiny.PIPELINES[family]).from_pretrained(str(tiny_dirs[family]))
        pipe.set_progress_bar_config(disable=True)
        pipes[family] = pipe
    return pipes
