"""Everything about a run that can be checked in a second, before a process starts or a model loads.

``problems(cfg, num_processes)`` collects one-line messages, each naming the key, file or row and the fix:

* the batch arithmetic of the recipe on ``num_processes`` processes (``config.launch_problems``);
* every local path the config names: the model and VAE folders (a missing local model is reported as missing,
  with the command that writes a tiny offline one, not as a failed download; a Hub id that is not in the local
  cache while ``HF_HUB_OFFLINE=1`` is named too), the data source and the columns its format reads, the latent
  cache, prompt files, scorer weights, the checkpoint ``run.resume_from`` names;
* ``run.report_to``: known to accelerate and installed;
* the output folder: it can be created and written, no other process trains in it (``probe_lock``), it holds no
  other run unless this one resumes or overwrites it (``training.rundir``), and a resume does not change the
  training config.

``check`` raises them as one ``ConfigError`` (a single line). ``diffalign run`` and ``diffalign validate`` call it
before launching anything, and every recipe calls it (through ``loop.start``) before it loads its model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffalign import config as dconfig
from diffalign import resources
from diffalign.models.loading import source_problem
from diffalign.training import checkpoint, rundir


def check(cfg: Any, num_processes: int = 1, *, probe_lock: bool = False) -> None:
    """Raise ``ConfigError`` with every problem of ``problems`` on one line; return when there is none."""
    dconfig.raise_problems(problems(cfg, num_processes, probe_lock=probe_lock))


def problems(cfg: Any, num_processes: int = 1, *, probe_lock: bool = False) -> list[str]:
    """The one-line problems of running ``cfg`` on ``num_processes`` processes (see the module docstring)."""
    found = list(dconfig.launch_problems(cfg, num_processes))
    found += path_problems(cfg)
    found += tracker_problems(getattr(getattr(cfg, "run", None), "report_to", ()))
    if hasattr(cfg, "run"):
        found += output_problems(cfg, num_processes, probe_lock=probe_lock)
    return found


# ---- paths --------------------------------------------------------------------------------------------------

_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".pt", ".bin", ".ckpt", ".yaml")


def _looks_local(value: str) -> bool:
    """A string that can only be a local file or folder (not a Hub id, not a shipped list name)."""
    return (
        value.startswith(("/", "./", "../", "~", resources.SCHEME))
        or value.count("/") > 1
        or value.lower().endswith(_FILE_SUFFIXES)
    )


def _missing(key: str, value: str) -> str | None:
    try:
        path = resources.resolve(value)
    except FileNotFoundError as e:
        return f"{key}: {e}"
    if _looks_local(value) and not Path(path).expanduser().exists():
        return f"{key}={value!r}: no such file or folder"
    return None


def path_problems(cfg: Any) -> list[str]:
    """Every local path of ``cfg`` that does not exist (see the module docstring)."""
    found: list[str | None] = []
    model = getattr(cfg, "model", None)
    if model is not None:
        found.append(source_problem("model.path", model.path, model.family))
        found.append(source_problem("model.vae_path", model.vae_path, pipeline=False))
    data = getattr(cfg, "data", None)
    if data is not None and hasattr(data, "format"):
        from diffalign.data import check as data_check

        missing_labels = labels_problem(data)
        found += [missing_labels] if missing_labels else data_check.problems(data)
    cache = getattr(data, "latent_cache", None)
    if cache and not Path(cache).expanduser().is_dir():
        found.append(
            f"data.latent_cache={cache!r}: no such folder (write it with "
            "`python -m diffalign.data.latent_cache --config ... data.latent_cache=...`)"
        )
    skip = ("model.", "data.path", "data.latent_cache", "run.")
    for key, value in _strings(dconfig.to_dict(cfg)):
        last = key.rsplit(".", 1)[-1]
        if key.startswith(skip) or not (last.endswith(("path", "file", "prompts", "dir")) or last == "weights"):
            continue
        found.append(_missing(key, value))
    return [f for f in found if f]


def labels_problem(data: Any) -> str | None:
    """A missing label folder of a toy-world config (``data.labelled_by`` names the world's reward): the command
    that writes it."""
    by = getattr(data, "labelled_by", None)
    try:
        path = Path(resources.resolve(data.path)).expanduser()
    except FileNotFoundError:
        return None
    if by is None or path.exists() or resources.is_hub_id(data.path) or any(c in str(path) for c in "*?["):
        return None
    from diffalign.toy import worlds

    world = next((w for w in worlds.WORLDS.values() if w.reward == by), None)
    if world is None:
        return f"data.path={data.path!r}: no such folder; label data with {by} first (`diffalign label ... --scorer {by}`)"
    flag = "" if world.name == "duo" else f" --world {world.name}"
    captions = (
        "; the per-image captions (data.caption_columns) are added by diffalign.label.captions.add_image_captions "
        "with the world's caption writer (`python bench/alignment_toy.py --objectives dcpo` does both)"
        if getattr(data, "caption_columns", None)
        else ""
    )
    return (
        f"data.path={data.path!r}: no such folder; this {world.name}-world config trains on labels ranked by {by}: "
        f"`diffalign quickstart{flag} --objective dpo` writes them to runs/quickstart/labels (run it in this folder)"
        + captions
    )


def _strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _strings(v, f"{key}.{k}" if key else str(k))]
    return [(key, value)] if isinstance(value, str) and value else []


# ---- trackers -----------------------------------------------------------------------------------------------
def tracker_problems(names: Any) -> list[str]:
    """``run.report_to`` names that accelerate does not know or whose package is not installed."""
    if not names:
        return []
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    found = []
    for name in names:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            found.append(f"run.report_to: unknown tracker {name!r}; accelerate knows {known} (or [] for none)")
        elif not getattr(accelerate.utils, f"is_{name}_available", lambda: True)():
            found.append(
                f"run.report_to: tracker {name!r} is not installed: `pip install {name.replace('_', '-')}`, or "
                "drop it from run.report_to"
            )
    return found


# ---- the output folder --------------------------------------------------------------------------------------
def output_problems(cfg: Any, num_processes: int | None = None, *, probe_lock: bool = False) -> list[str]:
    """The output folder can be written, is free, holds no other run, and a resume keeps the training config."""
    out = Path(cfg.run.output_dir).expanduser()
    problem = writable_problem("run.output_dir", out)
    if problem:
        return [problem]
    found = []
    if probe_lock:
        from diffalign.fileio import FolderBusyError, lock_holder

        holder = lock_holder(out)
        if holder is not None:
            found.append(str(FolderBusyError(out, holder)))
    previous = rundir.previous_run_problem(cfg)
    if previous:
        found.append(previous)
    try:
        path = checkpoint.resolve(cfg.run.resume_from, out / "checkpoints")
    except FileNotFoundError as e:
        return [*found, f"{e} (a folder checkpoints/step-N of a run, or latest)"]
    if path is not None:
        problem = rundir.resume_problem(cfg, path, num_processes)
        if problem:
            found.append(problem)
    return found


def writable_problem(key: str, folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written (nothing is created to find out), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={str(folder)!r} cannot be created: {existing} is a file; choose another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}={str(folder)!r} is not writable ({existing} is read-only for this user); choose another folder"
    return None
