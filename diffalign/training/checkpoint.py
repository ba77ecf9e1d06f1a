"""Atomic, pickle-free training checkpoints with rotation and ``resume_from: latest``.

Layout of ``<output_dir>/checkpoints/step-00000500/``::

    trainable.safetensors        LoRA (trainable) tensors by parameter name, bitwise
    optimizer.{safetensors,json} optimizer state
    state.json                   step, lr-scheduler and data-sampler state, user metadata
    rng-rank<R>.{safetensors,json}  every process's torch / numpy / python RNG state
    extra-rank<R>.safetensors    every process's own tensors (``per_rank``, e.g. Diffusion-DRO's replay buffer),
                                 when the run passes them
    COMPLETE                     written last: JSON ``{"step", "files": {name: size in bytes}}``

A checkpoint of a sharded (FSDP2) run has ``sharded/`` instead of ``trainable.safetensors`` and ``optimizer.*``: a
``torch.distributed.checkpoint`` folder in the safetensors format (``HuggingFaceStorageWriter``: each process writes
its own shards of the trained tensors and of their optimizer state, ``model/<name>``, ``optim/state.<name>.<key>``,
``extra/<key>``, with their offsets in the safetensors header), plus ``optimizer.json`` with the optimizer's
non-tensor settings (``save_sharded``). DCP's default format pickles its ``.metadata``; this one pickles nothing.
``load_sharded`` reads it into a model sharded over any number of processes, or into a plain one-process model
(DCP reshards), and ``read_sharded`` gives its tensors whole, without a process group.

State that differs between processes and is not a shard of anything (a recipe's per-process buffer) goes in
``per_rank``: each process writes its own ``extra-rank<R>.safetensors`` next to its RNG file, inside the same
temporary folder, so it is listed in ``COMPLETE`` and swapped in atomically with the rest; ``load`` /
``load_sharded`` / ``load_per_rank`` give process R back its own file's tensors, and refuse (one line naming the
missing file) a process R of a resumed run with more processes than the checkpoint has files for.

A checkpoint is assembled in a hidden temporary folder and swapped into place with renames
(``fileio.swap_dir``), also when a resumed run saves a step that already exists: a crash (even SIGKILL) at any
point leaves the old ``step-N`` or the new one, never a half-written or half-deleted one. Rotation (``keep_last``)
renames a step to the hidden ``.step-N.deleting`` before deleting it, and ``clean_incomplete`` (at the start of
every run) removes what a kill left of such deletions. ``latest`` (and
``resolve``) only return a checkpoint whose ``COMPLETE`` lists every file it needs and whose listed files are all
there with their recorded sizes; among those, the highest step number wins (not the newest file).
"""

from __future__ import annotations

import dataclasses
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
SHARDED = "sharded"
REQUIRED_SHARDED = ("optimizer.json", "state.json")  # and at least one sharded/*.safetensors
PER_RANK = re.compile(r"^extra-rank(\d+)\.safetensors$")


def per_rank_file(path: Path, rank: int) -> Path:
    """The file of process ``rank``'s own tensors (``per_rank``) in checkpoint ``path``."""
    return path / f"extra-rank{rank}.safetensors"


def per_rank_ranks(path: Path) -> list[int]:
    """The processes whose ``per_rank`` tensors checkpoint ``path`` holds (``[]``: none saved any)."""
    return sorted(int(m.group(1)) for f in path.iterdir() if (m := PER_RANK.match(f.name)))


def load_per_rank(path: Path, rank: int = 0) -> dict[str, torch.Tensor] | None:
    """Process ``rank``'s own tensors saved with ``per_rank``; ``None`` when the checkpoint holds none for any
    process (written without ``per_rank``, e.g. before it existed). A checkpoint that holds them for other processes
    but not for ``rank`` (a resumed run with more processes than the saving run) raises ``FileNotFoundError`` in one
    line naming the missing file: that process has no state of its own to resume, and inventing one (empty, or a
    copy of another process's) would make the resume silently inexact."""
    saved = per_rank_ranks(path)
    if not saved:
        return None
    mine = per_rank_file(path, rank)
    if rank not in saved:
        raise FileNotFoundError(
            f"{mine} is missing: the checkpoint holds the per-process state of processes {saved} only (written by "
            f"a run of {len(saved)} processes), so process {rank} has none to resume; resume on {len(saved)} processes"
        )
    return load_file(str(mine))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """True when ``path/COMPLETE`` lists the required files and every listed file exists with its recorded size."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        if is_sharded(path):
            shards = [n for n in files if n.startswith(f"{SHARDED}/") and n.endswith(".safetensors")]
            if not shards or not set(REQUIRED_SHARDED) <= set(files):
                return False
        elif not set(REQUIRED) <= set(files):
            return False
        return all((path / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` was written by a sharded run (``save_sharded``)."""
    return (path / SHARDED).is_dir()


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
    per_rank: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically; every process calls it (each saves its RNG state, and its own
    ``per_rank`` tensors, when given, to ``extra-rank<rank>.safetensors``: pass them on every process or on none).

    ``barrier`` must synchronise all processes (``accelerator.wait_for_everyone``). Non-finite ``trainable``
    tensors are refused (``FloatingPointError``) before anything is written: a checkpoint is never named good
    with weights that exploded.
    """
    bad = [k for k, v in trainable.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not saving step {step}: non-finite trainable tensors {bad[:3]}")
    final, tmp = _begin(root, step, rank, barrier, per_rank)
    barrier()
    if rank == 0:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        state_io.save(optimizer, tmp / "optimizer")
        _finish(root, tmp, final, step, state, keep_last)
    barrier()
    return final


def _begin(
    root: Path, step: int, rank: int, barrier: Callable[[], None], per_rank: dict[str, torch.Tensor] | None = None
) -> tuple[Path, Path]:
    """Every process: checkpoint ``step``'s final folder and its hidden temp folder, made fresh by the main process
    (a stale one from a crashed save removed) before the barrier, with this process's RNG state and ``per_rank``
    tensors (when given) written into it."""
    final = step_dir(root, step)
    tmp = temp_dir(final)
    if rank == 0:
        fresh_temp_dir(final).mkdir()
    barrier()
    state_io.save(rng_state(), tmp / f"rng-rank{rank}")
    if per_rank is not None:
        own = {k: v.detach().cpu().contiguous().clone() for k, v in per_rank.items()}  # safetensors: no views
        save_file(own, str(per_rank_file(tmp, rank)))
    return final, tmp


def _finish(root: Path, tmp: Path, final: Path, step: int, state: dict[str, Any], keep_last: int) -> None:
    """Main process, once every file is in ``tmp``: ``state.json``, then ``COMPLETE`` listing every file (also those
    in subfolders) with its size, fsync, the swap into ``final`` and the rotation."""
    (tmp / "state.json").write_text(json.dumps(state_io.encode(state, {}), indent=1))
    paths = sorted(f for f in tmp.rglob("*") if f.is_file())
    files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in paths}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))
    for f in [*paths, tmp / MARKER]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    swap_dir(tmp, final)
    for old in list_complete(root)[:-keep_last] if keep_last > 0 else []:
        _discard(old)


def _sharded_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)


def _sharded_tensors(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The trained tensors of ``model`` (``DTensor`` shards or plain) and the optimizer's flattened state, as torch's
    ``get_*_state_dict`` give them by parameter name, and one flat dict of their tensors for DCP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _sharded_options()
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    tensors = {f"model/{k}": v for k, v in model_sd.items()}
    tensors.update({f"optim/{k}": v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)})
    return model_sd, optim_sd, tensors


def save_sharded(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    per_rank: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 3,
) -> Path:
    """``save`` for a sharded run: every process calls it and writes its shards of ``model``'s trained parameters and
    their optimizer state (``torch.distributed.checkpoint``) into the same hidden folder, then the main process
    writes ``state.json`` and ``COMPLETE`` and swaps it into place: the atomic rules of ``save``. ``extra``: tensors
    the same on every process (or ``DTensor`` shards), written once; ``per_rank``: this process's own tensors, as in
    ``save``.

    Non-finite trained values on any process are refused (``FloatingPointError``, on every process alike) before
    anything is written.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from diffalign.training.sharding import local

    _, optim_sd, tensors = _sharded_tensors(model, optimizer)
    tensors.update({f"extra/{k}": v.contiguous() for k, v in (extra or {}).items()})  # safetensors: no views
    trained = [k for k in tensors if k.startswith("model/")]
    bad = torch.tensor([float(not bool(local(tensors[k]).detach().isfinite().all())) for k in trained])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad)
    if bool((bad > 0).any()):
        names = [k.removeprefix("model/") for k, b in zip(trained, bad.tolist(), strict=True) if b > 0]
        raise FloatingPointError(f"not saving step {step}: non-finite trainable tensors {names[:3]}")
    final, tmp = _begin(root, step, rank, barrier, per_rank)
    writer = dcp.HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True)
    dcp.save(tensors, storage_writer=writer)  # a collective: every process writes its shards
    barrier()
    if rank == 0:
        settings = {k: v for k, v in optim_sd.items() if not isinstance(v, torch.Tensor)}
        (tmp / "optimizer.json").write_text(json.dumps(state_io.encode(settings, {})))
        _finish(root, tmp, final, step, state, keep_last)
    barrier()
    return final


def load_sharded(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    rank: int = 0,
    extra_like: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Load a ``save_sharded`` checkpoint into ``model`` and ``optimizer`` (sharded over any number of processes, or
    plain on one: DCP reads each process's part of every tensor); returns ``{"state", "extra", "per_rank"}``
    (``extra`` whole on every process, or loaded in place into the tensors of ``extra_like`` with the same key, e.g.
    ``DTensor`` shards of an EMA; ``per_rank``: ``load_per_rank``'s, which refuses a process with no file of its own).
    This process's RNG state is restored when the checkpoint has one for its rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    per_rank = load_per_rank(path, rank)  # refused before anything is loaded
    rng_file = path / f"rng-rank{rank}"
    if rng_file.with_suffix(".json").is_file():
        set_rng_state(state_io.load(rng_file))
    model_sd, optim_sd, tensors = _sharded_tensors(model, optimizer)
    saved, like = _saved_tensors(path), extra_like or {}
    tensors.update(
        {
            k: like[k.removeprefix("extra/")]
            if k.removeprefix("extra/") in like
            else torch.empty(meta.size, dtype=meta.properties.dtype)
            for k, meta in saved.items()
            if k.startswith("extra/")
        }
    )
    missing, unexpected = sorted(set(tensors) - set(saved)), sorted(set(saved) - set(tensors))
    if missing or unexpected:
        raise KeyError(
            f"{path} does not match the trained parameters: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    no_dist = not (dist.is_available() and dist.is_initialized())
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDED)), no_dist=no_dist)
    model_sd.update({k: tensors[f"model/{k}"] for k in model_sd})
    optim_sd.update({k: tensors[f"optim/{k}"] for k, v in optim_sd.items() if isinstance(v, torch.Tensor)})
    optim_sd.update(state_io.decode(json.loads((path / "optimizer.json").read_text()), {}))
    options = dataclasses.replace(_sharded_options(), strict=False)  # the frozen weights are not in it
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    extra = {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}
    return {"state": saved_state(path), "extra": extra, "per_rank": per_rank}


def _saved_tensors(path: Path) -> dict[str, Any]:
    """Key -> DCP tensor metadata (``.size``, ``.properties.dtype``) of a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp

    return dict(dcp.HuggingFaceStorageReader(str(path / SHARDED)).read_metadata().state_dict_metadata)


def read_sharded(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole (plain CPU tensors, no process group needed): ``model/<name>``,
    ``optim/state.<name>.<key>``, ``extra/<key>``. For export, inspection and tests."""
    import torch.distributed.checkpoint as dcp

    tensors = {k: torch.empty(meta.size, dtype=meta.properties.dtype) for k, meta in _saved_tensors(path).items()}
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDED)), no_dist=True)
    return tensors


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """Everything ``save`` wrote; this process's RNG state is restored as a side effect. ``"per_rank"``: this
    process's own tensors (``load_per_rank``: ``None`` when the checkpoint holds none)."""
    rng_file = path / f"rng-rank{rank}"
    if not rng_file.with_suffix(".json").is_file():
        raise FileNotFoundError(
            f"{path} has no RNG state for process {rank}: it was written by a run with fewer processes"
        )
    per_rank = load_per_rank(path, rank)
    set_rng_state(state_io.load(rng_file))
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": state_io.load(path / "optimizer"),
        "state": saved_state(path),
        "per_rank": per_rank,
    }
