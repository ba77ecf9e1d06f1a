"""Checkpoint format: exact round trips without pickle, atomic writes, rotation, latest/resume resolution."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from diffalign.training import checkpoint, state_io


def test_state_io_round_trip_keeps_types(tmp_path):
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7], "foreach": None, "name": "x"}],
        "np": np.arange(4, dtype=np.int32),
        "flag": True,
    }
    state_io.save(obj, tmp_path / "s")
    back = state_io.load(tmp_path / "s")
    assert set(back["state"]) == {0, 7}  # int keys survive JSON
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(back["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert back["np"].dtype == np.int32 and back["np"].tolist() == [0, 1, 2, 3]
    assert back["flag"] is True and back["param_groups"][0]["foreach"] is None


def test_state_io_refuses_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        state_io.save({"f": object()}, tmp_path / "s")


def _save(root, step, keep_last=3):
    return checkpoint.save(
        root,
        step,
        trainable={"w": torch.full((2,), float(step))},
        optimizer={"k": 1},
        state={"step": step},
        keep_last=keep_last,
    )


def test_latest_ignores_incomplete_and_rotation_keeps_last(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6, 8):
        _save(root, step, keep_last=2)
    assert [p.name for p in checkpoint.list_complete(root)] == ["step-00000006", "step-00000008"]
    # a crash mid-write leaves only a hidden temp folder, or a folder without COMPLETE: both are ignored
    (root / ".step-00000010.tmp").mkdir()
    (root / "step-00000012").mkdir()
    assert checkpoint.latest(root).name == "step-00000008"
    assert checkpoint.resolve("latest", root).name == "step-00000008"
    assert checkpoint.resolve(None, root) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(root / "step-00000012"), root)
    assert checkpoint.resolve("latest", tmp_path / "empty") is None


def test_save_replaces_stale_temp_and_restores_rng(tmp_path):
    root = tmp_path / "ckpt"
    (root / ".step-00000005.tmp").mkdir(parents=True)
    (root / ".step-00000005.tmp" / "junk").write_text("partial")
    torch.manual_seed(123)
    random.seed(5)
    path = _save(root, 5)
    expected = (torch.rand(3), random.random())
    assert not (root / ".step-00000005.tmp").exists() and not (path / "junk").exists()
    ck = checkpoint.load(path)
    assert (torch.rand(3).tolist(), random.random()) == (expected[0].tolist(), expected[1])
    assert ck["trainable"]["w"].tolist() == [5.0, 5.0] and ck["state"] == {"step": 5}
    assert json.loads((path / "optimizer.json").read_text())  # human-readable skeleton
    with pytest.raises(FileNotFoundError, match="process 1"):
        checkpoint.load(path, rank=1)


def test_latest_is_the_highest_step_not_the_newest_folder(tmp_path):
    """Saves out of step order (a resume from an earlier checkpoint re-saves older steps): step number decides."""
    root = tmp_path / "ckpt"
    for i, step in enumerate((30, 10, 20)):  # step-10 and step-20 written after step-30 ...
        path = _save(root, step, keep_last=3)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # ... and their folders look newer, whatever the clock
    assert [p.name for p in checkpoint.list_complete(root)] == ["step-00000010", "step-00000020", "step-00000030"]
    assert checkpoint.latest(root).name == "step-00000030"
    assert checkpoint.resolve("latest", root).name == "step-00000030"
