"""Shared fixtures: offline environment, tiny saved checkpoints (built once per session)."""

from __future__ import annotations

import os
import socket


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path

import pytest
import torch


# Tiny models: one thread is faster than two fighting over 2 cores, and it makes timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-init SD1.5 / SDXL / SD3 pipelines saved as diffusers folders (save_pretrained)."""
    from diffalign.models import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.save(family, root / family, seed=0) for family in tiny.FAMILIES}


def unused_port() -> int:
    """A TCP port that nothing listens on now, for ``--main_process_port`` (a fixed port collides across runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """``unused_port()`` as a fixture."""
    return unused_port()
