"""Atomic, pickle-free training checkpoints with rotation and ``resume_from: latest``.

Layout of ``<output_dir>/checkpoints/step-00000500/``::

    trainable.safetensors        LoRA (trainable) tensors by parameter name, bitwise
    optimizer.{safetensors,json} optimizer state
    state.json                   step, lr-scheduler and data-sampler state, user metadata
    rng-rank<R>.{safetensors,json}  every process's torch / numpy / python RNG state
    COMPLETE                     written last: JSON ``{"step", "files": {name: size in bytes}}``

A checkpoint is assembled in a hidden temporary folder and swapped into place with renames
(``fileio.swap_dir``), also when a resumed run saves a step that already exists: a crash (even SIGKILL) at any
point leaves the old ``step-N`` or the new one, never a half-written or half-deleted one. Rotation (``keep_last``)
renames a step to the hidden ``.step-N.deleting`` before deleting it, and ``clean_incomplete`` (at the start of
every run) removes what a kill left of such deletions. ``latest`` (and
``resolve``) only return a checkpoint whose ``COMPLETE`` lists every file it needs and whose listed files are all
there with their recorded sizes; among those, the highest step number wins (not the newest file).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffalign.fileio import fresh_temp_dir, swap_dir, temp_dir
from diffalign.training import state_io


STEP_DIR = re.compile(r"^step-(\d{8})$")
DELETING = re.compile(r"^\.step-\d{8}\.deleting$")
MARKER = "COMPLETE"
REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """True when ``path/COMPLETE`` lists the required files and every listed file exists with its recorded size."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        return set(REQUIRED) <= set(files) and all((path / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, in step order (oldest first)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(root: Path) -> Path | None:
    done = list_complete(root)
    return done[-1] if done else None


def resolve(resume_from: str | None, root: Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None; a path -> that checkpoint."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest(root)
    path = Path(resume_from)
    if not is_complete(path):
        raise FileNotFoundError(f"run.resume_from={resume_from!r} is not a complete checkpoint folder")
    return path


def saved_state(path: Path) -> dict[str, Any]:
    """The ``state`` dict a checkpoint was saved with (step, schedule, data position, metadata); no tensors read."""
    return state_io.decode(json.loads((path / "state.json").read_text()), {})


def set_aside(path: Path, reason: str) -> Path:
    """Rename checkpoint ``path`` to ``<name>.<reason>`` so ``latest`` no longer picks it (kept for inspection)."""
    aside = path.with_name(f"{path.name}.{reason}")
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    return aside


def _discard(path: Path) -> None:
    """Delete checkpoint ``path``: first renamed to ``.<name>.deleting`` (one atomic step, so a kill never leaves a
    ``step-N`` without its weights), then removed; ``clean_incomplete`` finishes a deletion a kill cut short."""
    gone = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(gone, ignore_errors=True)
    path.rename(gone)
    shutil.rmtree(gone)


def clean_incomplete(root: Path) -> list[Path]:
    """Remove what killed runs left under ``root`` that can never be resumed from; returns the removed folders.

    Call it at the start of a run, on the main process, holding the output folder's lock (``loop.start``): then no
    other process of this run writes here. Removed: ``.step-N.deleting`` (a rotation cut short) and an incomplete
    ``step-N`` OLDER than the latest complete one (e.g. half-deleted by a diffalign before the rename in
    ``_discard``): nothing resumes from it, and rotation, which only lists complete folders, would never remove it.
    Kept: every complete checkpoint, and an incomplete ``step-N`` newer than the latest complete one: it may be a
    step still being written (another writer on a shared file system, which a pid lock does not see) and it is
    the user's evidence of what happened; ``latest`` ignores it, and a run that reaches step N replaces it.
    """
    if not root.is_dir():
        return []
    newest = latest(root)
    newest_step = int(STEP_DIR.match(newest.name).group(1)) if newest is not None else None
    removed = []
    for path in sorted(root.iterdir()):
        match = STEP_DIR.match(path.name)
        stale_step = (
            match is not None
            and newest_step is not None
            and int(match.group(1)) < newest_step
            and not is_complete(path)
        )
        if (DELETING.match(path.name) and path.is_dir()) or stale_step:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically; every process calls it (each saves its RNG state).

    ``barrier`` must synchronise all processes (``accelerator.wait_for_everyone``). Non-finite ``trainable``
    tensors are refused (``FloatingPointError``) before anything is written: a checkpoint is never named good
    with weights that exploded.
    """
    bad = [k for k, v in trainable.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not saving step {step}: non-finite trainable tensors {bad[:3]}")
    final = step_dir(root, step)
    tmp = temp_dir(final)
    if rank == 0:
        fresh_temp_dir(final).mkdir()
    barrier()
    state_io.save(rng_state(), tmp / f"rng-rank{rank}")
    barrier()
    if rank == 0:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        state_io.save(optimizer, tmp / "optimizer")
        (tmp / "state.json").write_text(json.dumps(state_io.encode(state, {}), indent=1))
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        swap_dir(tmp, final)
        for old in list_complete(root)[:-keep_last] if keep_last > 0 else []:
            _discard(old)
    barrier()
    return final


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """Everything ``save`` wrote; this process's RNG state is restored as a side effect."""
    rng_file = path / f"rng-rank{rank}"
    if not rng_file.with_suffix(".json").is_file():
        raise FileNotFoundError(
            f"{path} has no RNG state for process {rank}: it was written by a run with fewer processes"
        )
    set_rng_state(state_io.load(rng_file))
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": state_io.load(path / "optimizer"),
        "state": saved_state(path),
    }
