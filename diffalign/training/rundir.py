"""A training run's output folder: what an earlier run left there, and the rules that keep it safe.

* A fresh run (``run.resume_from`` unset) into a folder that holds another run's checkpoints, LoRA or metrics is
  refused (``previous_run_problem``): it would overwrite ``step-N`` folders and ``lora/``, cut ``metrics.jsonl``,
  and leave ``latest`` pointing at the old run. The two ways on are named in the message: continue that run
  (``run.resume_from=latest``) or ``run.overwrite=true``, which moves it to a dated sibling folder
  (``fileio.move_aside``; nothing is deleted) before the new run starts.
* A resume continues the run that wrote the checkpoint: a config that changes its training is refused
  (``resume_problem``), naming each changed key.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any

from diffalign import config as dconfig
from diffalign.fileio import move_aside
from diffalign.training import checkpoint


logger = logging.getLogger("diffalign.train")


def _when(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _last_metrics_step(path: Path) -> int | None:
    last = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            last = row["step"]
    return last


def previous_run(out: Path) -> str | None:
    """What an earlier run left in ``out`` (checkpoints, LoRA, metrics) as a short phrase, or None."""
    found = []
    root = out / "checkpoints"
    steps = sorted(p for p in root.iterdir() if checkpoint.STEP_DIR.match(p.name)) if root.is_dir() else []
    if steps:
        done = checkpoint.list_complete(root)
        last = done[-1] if done else steps[-1]
        found.append(f"checkpoints to {last.name}, written {_when(last)}")
    lora = out / "lora"
    if lora.is_dir() and any(lora.iterdir()):
        found.append(f"lora/ written {_when(lora)}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        step = _last_metrics_step(metrics)
        found.append(f"metrics.jsonl to step {step}" if step is not None else "metrics.jsonl")
    return "; ".join(found) or None


def previous_run_problem(cfg: Any) -> str | None:
    """The refusal of a fresh run into a folder with another run's work; None when the run may start."""
    run = cfg.run
    if run.resume_from is not None or run.overwrite:
        return None
    out = Path(run.output_dir)
    what = previous_run(out) if out.is_dir() else None
    if what is None:
        return None
    return (
        f"run.output_dir={run.output_dir} already holds a run ({what}): continue it with run.resume_from=latest, "
        f"or start afresh with run.overwrite=true (moves it to {out.name}.old-<date> beside it; nothing is "
        "deleted), or choose another run.output_dir"
    )


def clear_for_fresh_run(cfg: Any) -> Path | None:
    """``run.overwrite=true``: move whatever is in the output folder aside (main process, lock held)."""
    out = Path(cfg.run.output_dir)
    if not cfg.run.overwrite or not out.is_dir() or not any(p.name != ".lock" for p in out.iterdir()):
        return None
    dest = move_aside(out)
    logger.warning("run.overwrite=true: moved the previous contents of %s to %s", out, dest)
    return dest


# Keys a resumed run may change: where and how often it logs, saves, validates, and how long it runs (a longer
# ``run.max_steps`` also stretches a decaying LR schedule from the resume step on). Anything else would make the
# resumed run differ from the run that wrote the checkpoint, so it is refused.
RESUME_MAY_CHANGE = (
    "run.output_dir",
    "run.resume_from",
    "run.overwrite",
    "run.max_steps",
    "run.log_every",
    "run.save_every",
    "run.keep_last",
    "run.report_to",
    "data.num_workers",
    "data.max_bad_fraction",
    "validation.",
)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config dicts to dotted keys (scalars only; other values as strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _is_default(cfg: Any, key: str, value: Any) -> bool:
    """Whether dotted ``key`` of ``cfg`` holds its schema default (as ``flat`` writes it): a key a checkpoint of an
    older diffalign does not have (e.g. ``train.mode``) resumes when it is left at what that version did."""
    obj, *path, last = [cfg, *key.split(".")]
    for part in path:
        obj = getattr(obj, part, None)
    if obj is None or not dataclasses.is_dataclass(obj):
        return False
    field = {f.name: f for f in dataclasses.fields(obj)}.get(last)
    if field is None:
        return False
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    return flat({last: default}).get(last) == value


# Per-process sizes that a recipe's state counts in globally (``stepwise_pref``'s mining round of
# ``sample_batch_size x processes`` prompts: the round counter and the prompt positions in its checkpoint): on
# another process count, the per-process value must change so that the global size stays the same.
PER_PROCESS_BATCHES = ("stepwise.sample_batch_size",)


def _process_count_problem(path: Path, before: dict, now: dict, saved_procs: int, num_processes: int) -> str | None:
    """Why a checkpoint of ``saved_procs`` processes may not resume on ``num_processes`` (``before``/``now``: the
    flat saved and new configs): the global batch, or a global ``PER_PROCESS_BATCHES`` size, would change. One line
    naming every key and the value to set, or None."""
    batch = ("optim.batch_size", "optim.grad_accum")
    global_before = before.get(batch[0], 1) * before.get(batch[1], 1) * saved_procs
    global_now = now.get(batch[0], 1) * now.get(batch[1], 1) * num_processes
    trained = (
        f"a global batch of {global_before} ({before.get(batch[0])} x {before.get(batch[1])} accumulation x "
        f"{saved_procs} processes)"
    )
    fixes, totals = [], []
    if global_before != global_now:
        fixes.append(f"optim.batch_size x optim.grad_accum to {global_before / num_processes:g} per process")
        totals.append(global_before)
    for key in PER_PROCESS_BATCHES:
        if key not in before:
            continue
        kept = before[key] * saved_procs
        if now.get(key, 0) * num_processes != kept:
            trained += f", {key}={before[key]} ({kept} over all processes)"
            fixes.append(f"{key}={kept / num_processes:g}")
            totals.append(kept)
    if not fixes:
        return None
    uneven = [t for t in totals if t % num_processes]
    hint = f" (not a whole number: resume on a process count that divides {uneven[0]})" if uneven else ""
    return (
        f"cannot resume from {path} on {num_processes} processes: it was trained with {trained}; "
        f"set {' and '.join(fixes)}{hint}"
    )


def resume_problem(cfg: Any, path: Path, num_processes: int | None = None) -> str | None:
    """Why ``cfg`` may not resume from checkpoint ``path`` (every changed key outside ``RESUME_MAY_CHANGE``,
    saved -> new), or None. The allowed changes are logged.

    ``num_processes`` (this run's): a checkpoint that records its process count may be resumed on another one when
    ``optim.batch_size`` and ``optim.grad_accum`` change so that the global batch (per-process batch x accumulation x
    processes) stays the same: the groups of every optimizer step are then the same (e.g. 2 x 2 -> 1 x 4); and so must a recipe's
    ``PER_PROCESS_BATCHES`` (``stepwise.sample_batch_size`` x processes). Otherwise one line names the values to set."""
    state = checkpoint.saved_state(path)
    saved = state.get("config")
    if saved is None:
        logger.warning("%s stores no config (written by an older diffalign): resuming without checking it", path)
        return None
    before, now = flat(saved), flat(dconfig.to_dict(cfg))
    missing = object()
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k, missing) != now.get(k, missing))
    diffs = {k: f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed}
    may_change = RESUME_MAY_CHANGE
    saved_procs = state.get("num_processes")
    if num_processes is not None and saved_procs is not None and saved_procs != num_processes:
        problem = _process_count_problem(path, before, now, saved_procs, num_processes)
        if problem is not None:
            return problem
        may_change = (*may_change, "optim.batch_size", "optim.grad_accum", *PER_PROCESS_BATCHES)
        logger.info(
            "resuming on %d processes a checkpoint of %d (global batch %d)",
            num_processes,
            saved_procs,
            now.get("optim.batch_size", 1) * now.get("optim.grad_accum", 1) * num_processes,
        )
    refused = [
        diffs[k]
        for k in changed
        if not k.startswith(may_change) and not (k not in before and _is_default(cfg, k, now.get(k)))
    ]
    if refused:
        return (
            f"cannot resume from {path}: the config differs from the one it was trained with in "
            f"{'; '.join(refused)}. A resume continues that run exactly; change only "
            f"{', '.join(RESUME_MAY_CHANGE)}, or start a new run (another run.output_dir, or run.overwrite=true)"
        )
    for k in changed:
        if k not in ("run.resume_from", "run.overwrite"):
            logger.info("resuming with a changed setting, applied from now on: %s", diffs[k])
    return None
