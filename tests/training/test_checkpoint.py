"""Checkpoint format: exact round trips without pickle, atomic writes, rotation, latest/resume resolution."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import threading

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


def _save(root, step, keep_last=3, value=None):
    return checkpoint.save(
        root,
        step,
        trainable={"w": torch.full((2,), float(step if value is None else value))},
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


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even ``except Exception`` clean-up)."""


def _killer(kill_at):
    """Wraps file-system functions so that the ``kill_at``-th call (0-based, over all of them) is "killed"."""
    seen = itertools.count()

    def wrap(fn):
        def call(*args, **kwargs):
            if next(seen) == kill_at:
                raise _Killed
            return fn(*args, **kwargs)

        return call

    return wrap


def test_a_kill_anywhere_in_a_resave_leaves_latest_complete(tmp_path, monkeypatch):
    """A resumed run re-saves an existing step-4: kill it before the 1st, 2nd, ... file-system change (unlink, rmdir,
    rename) in turn. Every time, every ``step-*`` folder is complete and ``latest`` loads, old or new content."""
    root = tmp_path / "ckpt"
    for kill_at in itertools.count():
        shutil.rmtree(root, ignore_errors=True)
        _save(root, 2)
        _save(root, 4)
        killing = _killer(kill_at)
        with monkeypatch.context() as m:
            for name in ("unlink", "rmdir", "rename", "replace"):
                m.setattr(os, name, killing(getattr(os, name)))
            try:
                _save(root, 4, value=9.0)
                finished = True
            except _Killed:
                finished = False
        for folder in root.glob("step-*"):  # exists => complete (loads), whatever the file order of a deletion
            assert checkpoint.load(folder)["trainable"]["w"].tolist() in ([4.0, 4.0], [9.0, 9.0], [2.0, 2.0]), kill_at
        newest = checkpoint.latest(root)
        assert newest.name in ("step-00000002", "step-00000004"), kill_at
        if finished:
            assert checkpoint.load(newest)["trainable"]["w"].tolist() == [9.0, 9.0] and kill_at > 2
            break


def test_latest_verifies_the_listed_files_and_orders_by_step(tmp_path):
    root = tmp_path / "ckpt"
    for step in (100, 9, 10):  # saved out of order: step 10 is the newest folder, step 100 the latest step
        _save(root, step, keep_last=0)
    assert checkpoint.latest(root).name == "step-00000100"
    (root / "step-00000100" / "trainable.safetensors").write_bytes(b"short")  # marker present, file torn
    assert checkpoint.latest(root).name == "step-00000010"
    (root / "step-00000010" / "optimizer.json").unlink()
    assert checkpoint.latest(root).name == "step-00000009"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(root / "step-00000100"), root)


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite"):
        checkpoint.save(tmp_path, 1, trainable={"w": torch.tensor([1.0, float("inf")])}, optimizer={}, state={})
    assert not list(tmp_path.iterdir())


def test_a_kill_anywhere_in_rotation_leaves_no_step_folder_without_weights(tmp_path, monkeypatch):
    """keep_last=1 deletes step-2 when step-4 is saved: kill it at each file-system change in turn. Every ``step-*``
    folder left is complete (the deletion renames it to ``.step-2.deleting`` first), and ``clean_incomplete``
    removes the leftover."""
    root = tmp_path / "ckpt"
    for kill_at in itertools.count():
        shutil.rmtree(root, ignore_errors=True)
        _save(root, 2, keep_last=1)
        killing = _killer(kill_at)
        with monkeypatch.context() as m:
            for name in ("unlink", "rmdir", "rename", "replace"):
                m.setattr(os, name, killing(getattr(os, name)))
            try:
                _save(root, 4, keep_last=1)
                finished = True
            except _Killed:
                finished = False
        assert all(checkpoint.is_complete(folder) for folder in root.glob("step-*")), kill_at
        removed = checkpoint.clean_incomplete(root)
        assert all(p.name == ".step-00000002.deleting" for p in removed), (kill_at, removed)
        assert not list(root.glob(".*.deleting"))
        assert checkpoint.latest(root).name in ("step-00000002", "step-00000004")
        if finished:
            assert [p.name for p in root.iterdir()] == ["step-00000004"] and not removed
            break


def test_clean_incomplete_removes_only_leftovers_older_than_latest(tmp_path):
    """A step folder half-deleted by an older diffalign (its weights gone) and older than latest is removed; complete
    ones stay, and so does an incomplete folder newer than latest (it may be a step being written)."""
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step, keep_last=3)
    (root / "step-00000002" / "trainable.safetensors").unlink()  # killed inside the old shutil.rmtree
    (root / "step-00000008").mkdir()
    (root / "step-00000008" / "state.json").write_text("{}")
    (root / ".step-00000001.deleting").mkdir()
    (root / ".step-00000001.deleting" / "optimizer.json").write_text("{}")
    removed = checkpoint.clean_incomplete(root)
    assert sorted(p.name for p in removed) == [".step-00000001.deleting", "step-00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006", "step-00000008"]
    assert checkpoint.latest(root).name == "step-00000006"
    assert checkpoint.clean_incomplete(root) == [] and checkpoint.clean_incomplete(tmp_path / "none") == []
    shutil.rmtree(root / "step-00000004")
    shutil.rmtree(root / "step-00000006")
    assert checkpoint.clean_incomplete(root) == []  # no complete checkpoint: nothing is "older than latest"
    assert (root / "step-00000008").is_dir()


def test_per_rank_tensors_come_back_to_their_own_process(tmp_path):
    """Two processes (threads with a barrier) save one checkpoint, each with its own ``per_rank`` tensors: each
    lands in ``extra-rank<R>.safetensors`` inside the atomic folder (listed in ``COMPLETE``) and ``load`` gives
    process R its own back. A process the checkpoint holds no file for is refused in one line naming the file."""
    root, sync = tmp_path / "ckpt", threading.Barrier(2)
    own = {r: {"buf.x": torch.full((2, 3), float(r)), "buf.t": torch.arange(4) + 10 * r} for r in (0, 1)}
    errors = []

    def process(rank):
        try:
            checkpoint.save(
                root, 1, trainable={"w": torch.ones(2)}, optimizer={}, state={"step": 1},
                per_rank=own[rank], rank=rank, barrier=sync.wait,
            )  # fmt: skip
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            sync.abort()

    workers = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    path = checkpoint.latest(root)
    listed = json.loads((path / checkpoint.MARKER).read_text())["files"]
    assert {"extra-rank0.safetensors", "extra-rank1.safetensors"} <= set(listed)
    assert checkpoint.per_rank_ranks(path) == [0, 1]
    for rank in (0, 1):
        back = checkpoint.load(path, rank=rank)["per_rank"]
        assert back.keys() == own[rank].keys() and all(torch.equal(back[k], own[rank][k]) for k in back)
    # a resumed run with more processes: process 2 has no buffer of its own (nor RNG state: ``load`` says that first)
    with pytest.raises(FileNotFoundError) as missing:
        checkpoint.load_per_rank(path, 2)
    message = str(missing.value)
    assert "\n" not in message and str(checkpoint.per_rank_file(path, 2)) in message
    assert "processes [0, 1] only" in message and "resume on 2 processes" in message
    (path / "extra-rank1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"extra-rank1\.safetensors is missing"):
        checkpoint.load(path, rank=1)
    # a checkpoint saved without per_rank holds none for any process: None, not an error
    assert checkpoint.load(_save(tmp_path / "plain", 3))["per_rank"] is None
