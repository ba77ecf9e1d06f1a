"""Every accelerator figure of bench/README.md from one prepared run that fits one lent-GPU call (issue 25).

Runs the parts below in order of importance, each as its own subprocess (its own process group) with its own time
budget, and rewrites ``OUT/results.json`` and ``OUT/results.md`` after each part (and marks the running one first),
so a kill keeps what finished. ``OUT/log.txt`` holds each part's output. The tables in results.md are ready to paste
into bench/README.md: every row names the GPU, torch/CUDA versions, dtype and the command that produced it.

Parts (``--parts`` picks some, in this order):

1. ``pytest``: ``pytest -m gpu``, every GPU-marked test (CUDA sync-debug step, nf4/float8 references).
2. ``step``: ``bench/step_cost.py``, bf16, real-size random-init SD1.5 (512 px), SDXL and SD3.5-Medium (1024 px),
   eager: plain / DPO / no-grad forward per step, ``(DPO - plain) / fwd`` (floor 1.0), DPO / plain, the share of the
   DPO step outside the denoiser.
3. ``memory``: ``bench/memory.py``, peak memory of one DPO pair step and one plain step at 1024 px, FLUX.1-dev (bf16,
   nf4, float8 bases, with and without gradient checkpointing) and SD3.5-Large, against the 24 GB target. Rows whose
   base needs a missing package (bitsandbytes, torchao) are skipped up front with that reason; an OOM is a row.
4. ``scorer``: ``bench/scorer_throughput.py``, images/s of the five reward scorers at real size, bf16.
5. ``online``: ``bench/online_cost.py --settings sd35m_grpo``, seconds per GRPO round (rollout / scoring / update)
   of an SD3.5-Medium-sized transformer at a small batch.
6. ``compile``: part 2 again with ``--compile`` (last: compile time is the least predictable); the first steps'
   excess over the median is the compile time, reported apart from the compiled step times.

A part runs if at least its minimum time is left of ``--budget`` and is given ``min(its budget, what is left)``;
otherwise it is skipped with a line saying so. A part that fails or times out is recorded with the tail of its
stderr, and the suite goes on. ``--smoke`` runs every part on the CPU with tiny sizes (a few minutes on 2 cores),
so the suite is known to work before a GPU is lent.

Run (on a lent GPU, one call; needs the packages of pyproject's dependencies there, see bench/README.md "GPU")::

    timeout 570 python bench/gpu_suite.py --budget 540 $OUT/gpu
    python bench/gpu_suite.py --smoke /tmp/gs                       # CPU, tiny sizes
    python bench/gpu_suite.py --parts compile --budget 540 $OUT/gpu2 # a second call for what the first skipped
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pytest", "step", "memory", "scorer", "online", "compile")
TARGET_GIB = 24.0  # the memory target of issue 16: a 24 GB card
CORE = ("torch", "diffusers", "transformers", "peft", "accelerate")
NEEDS = {  # packages a part cannot start without
    "pytest": (*CORE, "pytest"),
    "step": CORE,
    "memory": CORE,
    "scorer": (*CORE, "open_clip_torch"),
    "online": (*CORE, "datasets"),
    "compile": CORE,
}
PACKAGES = {  # distribution -> import name
    "torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
    "accelerate": "accelerate", "datasets": "datasets", "open_clip_torch": "open_clip", "pytest": "pytest",
    "bitsandbytes": "bitsandbytes", "torchao": "torchao", "triton": "triton",
}  # fmt: skip
# (model, option) rows of the memory part, most important first (the 24 GB FLUX target row leads)
MEMORY_ROWS = (
    ("flux1-dev", "nf4+ckpt"),
    ("flux1-dev", "bf16+ckpt"),
    ("sd35-large", "bf16+ckpt"),
    ("flux1-dev", "float8+ckpt"),
    ("flux1-dev", "nf4"),
    ("flux1-dev", "float8"),
    ("sd35-large", "bf16"),
    ("flux1-dev", "bf16"),
)
STEP_SIZES = ("sd15", "sdxl", "sd35m")
SCORERS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore")
OUTPUT_FLAGS = ("--json", "--junitxml", "--out")  # the suite's own output paths, left out of the printed commands

PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "executable": sys.executable}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                gpu_count=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
packages = {}
for dist, mod in json.loads(sys.argv[1]).items():
    try:
        packages[dist] = md.version(dist)
    except md.PackageNotFoundError:
        packages[dist] = "installed" if iu.find_spec(mod) else None
info["packages"] = packages
print(json.dumps(info))
"""


@dataclass
class Part:
    """One subprocess of the suite: its command (argv after ``python``), time budget and how to read its rows."""

    name: str
    title: str
    args: list[str]
    budget: float  # seconds at most
    min_s: float  # skipped when less than this is left
    dtype: str
    rows: Callable[[Part, dict[str, Any]], list[dict[str, Any]]]
    json: Path | None = None
    expect: list[str] = field(default_factory=list)  # row names the command should produce, in order
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)  # rows left out up front, with the reason
    row_commands: dict[str, str] = field(default_factory=dict)  # a row's own command, where rows run independently

    def command(self) -> str:
        """The command as a person would type it from the repository root, without the suite's output flags."""
        shown, skip = ["python"], False
        for a in self.args:
            if skip:
                skip = False
            elif a in OUTPUT_FLAGS:
                skip = True
            else:
                shown.append(a)
        return " ".join(shlex.quote(a) for a in shown)


# ---- plan ----------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, env: dict[str, Any], work: Path) -> list[Part]:
    """The parts to run, in order, with their commands sized for ``--smoke`` (CPU, tiny) or a GPU."""
    smoke, dev = args.smoke, args.device
    dtype = "bf16"
    parts: dict[str, Part] = {}
    junit = work / "pytest.xml"
    # --smoke: only the files that mark GPU tests (collecting the whole tree takes ~20-40 s on 2 busy cores)
    where = sorted(
        str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in f.read_text()
    )
    parts["pytest"] = Part(
        "pytest", "GPU-marked tests (pytest -m gpu)",
        ["-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
         *(where if smoke else ["tests"]), "--junitxml", str(junit)],
        60 if smoke else 90, 20 if smoke else 30, "-", rows_pytest, junit,
    )  # fmt: skip
    sizes = ["tiny"] if smoke else list(STEP_SIZES)
    step = ["bench/step_cost.py", "--device", dev, "--dtype", dtype, "--sizes", *sizes, "--skip-memory"]
    step += ["--warmup", "1", "--repeats", "2"] if smoke else ["--warmup", "2", "--repeats", "10"]
    parts["step"] = Part(
        "step", "DPO step cost against its floor (bench/step_cost.py), eager",
        [*step, "--json", str(work / "step.json")], 45 if smoke else 180, 15 if smoke else 60, dtype, rows_step,
        work / "step.json", sizes,
    )  # fmt: skip
    compile_ = [*step[:-4], "--compile", "--warmup", "1" if smoke else "2", "--repeats", "1" if smoke else "5"]
    compile_ += ["--compile-backend", "eager"] if smoke else []  # inductor's tiny-UNet compile takes minutes on a CPU
    parts["compile"] = Part(
        "compile", "DPO step cost, compiled (bench/step_cost.py --compile)",
        [*compile_, "--json", str(work / "compile.json")], 45 if smoke else 600, 15 if smoke else 60, dtype,
        rows_step, work / "compile.json", sizes,
    )  # fmt: skip
    parts["memory"] = memory_part(smoke, dev, env, work)
    scorer = ["bench/scorer_throughput.py", "--device", dev, "--dtype", dtype, "--json", str(work / "scorer.json")]
    if smoke:
        scorer += ["--size", "tiny", "--images", "8", "--batch-size", "8", "--image-size", "64", "--repeats", "2"]
    else:
        scorer += ["--size", "real", "--images", "64", "--repeats", "3"]
    scorer += ["--threads", "1"] if dev == "cpu" else []
    parts["scorer"] = Part(
        "scorer", "Reward scorer throughput (bench/scorer_throughput.py)", scorer, 45 if smoke else 120,
        15 if smoke else 45, dtype, rows_scorer, work / "scorer.json", list(SCORERS),
    )  # fmt: skip
    online = ["bench/online_cost.py", "--settings", "sd35m_grpo", "--dtype", dtype, "--out", str(work / "online")]
    online += (
        ["--shape", "smoke", "--resolution", "32", "--steps", "4", "--rounds", "2"] if smoke else ["--rounds", "3"]
    )
    online += ["--threads", "1"] if dev == "cpu" else []
    parts["online"] = Part(
        "online", "Online RL seconds per round (bench/online_cost.py)",
        [*online, "--json", str(work / "online.json")], 60 if smoke else 150, 20 if smoke else 60, dtype,
        rows_online, work / "online.json", ["sd35m_grpo"],
    )  # fmt: skip
    for name, seconds in args.timeout:
        parts[name].budget = seconds
        parts[name].min_s = min(parts[name].min_s, seconds)
    return [parts[name] for name in PARTS if name in args.parts]


def memory_part(smoke: bool, dev: str, env: dict[str, Any], work: Path) -> Part:
    """The memory part; rows whose base cannot run here (no CUDA, a missing package) are skipped up front."""
    wanted = [("flux1-dev", "bf16+ckpt"), ("flux1-dev", "nf4+ckpt"), ("flux1-dev", "float8+ckpt")] if smoke else []
    rows, skipped = [], []
    packages = env.get("packages", {})
    for model, option in wanted or MEMORY_ROWS:
        base = option.split("+")[0]
        reason = ""
        if base != "bf16" and dev != "cuda":
            reason = f"the {base} base needs a CUDA GPU"
        elif base == "nf4" and not packages.get("bitsandbytes"):
            reason = "bitsandbytes is not installed (the 'memory' extra)"
        elif base == "float8" and not packages.get("torchao"):
            reason = "torchao is not installed (the 'memory' extra)"
        elif base == "float8" and float(env.get("capability", "0")) < 8.9:
            reason = f"float8 needs CUDA compute capability >= 8.9 (this GPU: {env.get('capability')})"
        if reason:
            skipped.append({"name": f"{model} {option}", "model": model, "option": option, "status": "skipped",
                            "reason": reason})  # fmt: skip
        else:
            rows.append(f"{model}:{option}")
    flags = ["--tiny", "--resolution", "64", "--repeats", "1", "--timeout", "60"] if smoke else []
    flags += [] if smoke else ["--repeats", "2", "--timeout", "150"]
    title = "1024 px" if not smoke else "smoke: tiny configs, 64 px, no memory figure on a CPU"
    part = Part(
        "memory", f"Peak memory of a DPO pair step and a plain step ({title}; bench/memory.py)",
        ["bench/memory.py", "--device", dev, "--rows", *rows, *flags, "--json", str(work / "memory.json")],
        60 if smoke else 240, 20 if smoke else 60, "bf16", rows_memory, work / "memory.json",
        [r.replace(":", " ") for r in rows], skipped,
    )  # fmt: skip
    for model, option in wanted or MEMORY_ROWS:  # each row is its own subprocess of memory.py: its own command
        one = Part(
            "", "", ["bench/memory.py", "--device", dev, "--rows", f"{model}:{option}", *flags], 0, 0, "", rows_memory
        )
        part.row_commands[f"{model} {option}"] = one.command()
    for row in skipped:
        row["command"] = part.row_commands[row["name"]]
    return part


# ---- rows ----------------------------------------------------------------------------------------------------


def _load(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _missing(part: Part, rows: list[dict[str, Any]], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows the command should have produced but did not (killed at its budget, or it failed before them)."""
    done = {r["name"] for r in rows}
    why = {
        "timeout": "not reached: the part's time budget ran out",
        "interrupted": "not reached: the suite was stopped",
    }
    reason = why.get(run["status"], f"not produced (the command {run['status']})")
    return [{"name": n, "status": "not run", "reason": reason} for n in part.expect if n not in done]


def rows_pytest(part: Part, run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per test: from the JUnit XML, or (killed before it was written) from ``-v`` output lines."""
    rows = []
    if part.json is not None and part.json.is_file():
        try:
            cases = ET.parse(part.json).getroot().iter("testcase")
        except ET.ParseError:
            cases = iter(())
        for case in cases:
            status, reason = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    reason = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
            name = f"{case.get('classname', '')}::{case.get('name', '')}".removeprefix("tests.")
            rows.append({"name": name, "status": status, "seconds": float(case.get("time") or 0), "reason": reason})
        if rows:
            return rows
    for line in run.get("stdout_all", "").splitlines():
        head, _, rest = line.partition(" ")
        word = rest.split(" ")[0] if rest else ""
        if "::" in head and word in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS"):
            rows.append({"name": head.removeprefix("tests/"), "status": word.lower(), "seconds": None, "reason": ""})
    return rows


def rows_step(part: Part, run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in _load(part.json) or []:
        variants = [k.removeprefix("first/") for k in r if k.startswith("first/")]
        first_excess = sum(r[f"first/{v}"] - r[v] for v in variants)  # the first steps' excess over the median
        rows.append({
            "name": r["size"], "status": "ok", "params_m": r["params_m"], "mode": r["mode"],
            "plain_ms": 1e3 * r["plain"], "dpo_ms": 1e3 * r["dpo"], "fwd_ms": 1e3 * r["fwd"],
            "dpo_over_plain": r["dpo"] / r["plain"], "extra_fwd": r["extra/dpo"],
            "outside": (r["dpo"] - r["fwdbwd"] - r["fwd"]) / r["dpo"], "first_excess_s": first_excess,
            "batch_pairs": r.get("batch"), "repeats": r.get("repeats"),
        })  # fmt: skip
    return rows + _missing(part, rows, run)


def rows_memory(part: Part, run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in _load(part.json) or []:
        row = {"name": f"{r['model']} {r['option']}", "model": r["model"], "option": r["option"]}
        if "error" in r:
            peak = r.get("peak_gb")
            reached = f"{peak:.1f} GB allocated when it failed; " if isinstance(peak, float) and peak == peak else ""
            status = "OOM" if r["error"] == "out of memory" else "failed"
            row |= {"status": status, "reason": reached + r.get("detail", r["error"])}
        else:
            row |= {k: r[k] for k in ("static_gb", "peak_gb", "peak_plain_gb", "dpo", "plain", "fwd")}
            row |= {
                "status": "ok",
                "dpo_over_plain": r["dpo"] / r["plain"],
                "extra_fwd": (r["dpo"] - r["plain"]) / r["fwd"],
            }
        rows.append(row)
    missing = _missing(part, rows, run)
    for row in rows + missing:
        row["command"] = part.row_commands.get(row["name"], part.command())
    return part.skipped_rows + rows + missing


def rows_scorer(part: Part, run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"name": r["scorer"], "status": "ok", "params_m": r["params"] / 1e6, "size": r["size"], "input": r["input"],
         "images": round(r["images_per_second"] * r["seconds_per_call"]), "s_per_call": r["seconds_per_call"],
         "images_per_s": r["images_per_second"]}
        for r in _load(part.json) or []
    ]  # fmt: skip
    return rows + _missing(part, rows, run)


def rows_online(part: Part, run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"name": r["setting"], "status": "ok", "samples": r["samples"], "grid_steps": r["num_steps"],
         "trained_steps": r["trained_steps"], "rollout_s": r["time/rollout"], "scoring_s": r["time/scoring"],
         "update_s": r["time/update"], "round_s": r["total"], "rounds_timed": r["rounds_timed"]}
        for r in _load(part.json) or []
    ]  # fmt: skip
    return rows + _missing(part, rows, run)


# ---- running a part ------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """The suite got SIGTERM or SIGINT: the running part is killed and the results written before exiting."""


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's own process group (its pid: it was started in a new session), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode("utf-8", "replace")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    return env


def run_part(part: Part, timeout: float, work: Path) -> dict[str, Any]:
    """Run ``part`` in a new process group; kill the group at ``timeout``. Returns status, rc, wall s, output tails."""
    out, err = work / f"{part.name}.stdout", work / f"{part.name}.stderr"
    start = time.monotonic()
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, *part.args], cwd=ROOT, env=child_env(), stdout=fo, stderr=fe, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            kill_group(proc)
        except Interrupted:
            status = "interrupted"
            kill_group(proc)
    return {
        "status": status, "rc": proc.returncode, "pid": proc.pid, "wall_s": time.monotonic() - start,
        "stderr_tail": _tail(err, 3000), "stdout_tail": _tail(out, 2000), "stdout_all": _tail(out, 200_000),
    }  # fmt: skip


def probe(timeout: float = 180) -> dict[str, Any]:
    """Versions, the GPU and which packages exist, from a child process (the suite itself never touches CUDA, so
    no context of its own sits on the GPU during the memory part)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(PACKAGES)], capture_output=True, text=True, timeout=timeout,
            env=child_env(), cwd=ROOT,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        return {"error": (proc.stderr.strip().splitlines() or ["probe failed"])[-1], "packages": {}}
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {timeout} s", "packages": {}}


# ---- results -------------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, state: dict[str, Any]) -> None:
    _write(out / "results.json", json.dumps(_clean(state), indent=2) + "\n")
    _write(out / "results.md", markdown(state))


def _millions(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} M"


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def device_label(env: dict[str, Any], device: str) -> str:
    where = env.get("gpu", "?") if device == "cuda" else "CPU"
    return f"{where}, torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}"


TABLES: dict[str, tuple[list[str], Callable[[dict[str, Any]], list[str]]]] = {
    "pytest": (["test", "s", "detail"], lambda r: [r["name"], _f(r.get("seconds"), ".1f"), r.get("reason", "")]),
    "step": (["model", "params", "mode", "plain step ms", "DPO step ms", "no-grad fwd ms", "DPO / plain",
              "(DPO - plain) / fwd", "outside denoiser", "first steps - median, s"],
             lambda r: [r["name"], _millions(r.get("params_m")), r.get("mode", "-"), _f(r.get("plain_ms"), ".1f"),
                        _f(r.get("dpo_ms"), ".1f"), _f(r.get("fwd_ms"), ".1f"), _f(r.get("dpo_over_plain"), ".2f"),
                        f"**{_f(r.get('extra_fwd'), '.2f')}**", f"{_f(100 * r['outside'], '.1f')}%" if "outside" in r
                        else "-", _f(r.get("first_excess_s"), ".1f")]),
    "memory": (["model", "option", "static GB", "peak GB, DPO pair step", "peak GB, plain step", f"DPO <= {TARGET_GIB:.0f} GB",
                "DPO s", "plain s", "fwd s", "DPO / plain", "(DPO - plain) / fwd"],
               lambda r: [r.get("model", r["name"]), r.get("option", "-"), _f(r.get("static_gb"), ".1f"),
                          _f(r.get("peak_gb"), ".1f"), _f(r.get("peak_plain_gb"), ".1f"),
                          ("yes" if r["peak_gb"] <= TARGET_GIB else "no") if r.get("status") == "ok"
                          and r.get("peak_gb") is not None and math.isfinite(r["peak_gb"]) else "-",
                          _f(r.get("dpo"), ".3f"), _f(r.get("plain"), ".3f"), _f(r.get("fwd"), ".3f"),
                          _f(r.get("dpo_over_plain"), ".2f"), _f(r.get("extra_fwd"), ".2f")]),
    "scorer": (["scorer", "params", "images / call", "s / call", "images / s"],
               lambda r: [r["name"], _millions(r.get("params_m")), str(r.get("images", "-")),
                          _f(r.get("s_per_call"), ".3f"), _f(r.get("images_per_s"), ".1f")]),
    "online": (["setting", "samples / round", "grid steps", "trained steps", "rollout s", "scoring s", "update s",
                "s / round"],
               lambda r: [r["name"], str(r.get("samples", "-")), str(r.get("grid_steps", "-")),
                          str(r.get("trained_steps", "-")), _f(r.get("rollout_s"), ".2f"), _f(r.get("scoring_s"), ".3f"),
                          _f(r.get("update_s"), ".2f"), _f(r.get("round_s"), ".2f")]),
}  # fmt: skip
TABLES["compile"] = TABLES["step"]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(state: dict[str, Any]) -> str:
    env, s = state["env"], state["suite"]
    pk = env.get("packages", {})
    have = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k != "torch")
    lacking = ", ".join(k for k, v in pk.items() if not v) or "none"
    lines = [
        f"# GPU suite results ({'smoke: CPU, tiny sizes' if s['smoke'] else 'full'})",
        "",
        f"- device: {device_label(env, s['device'])}"
        + (f" ({env.get('gpu_memory_gib')} GiB, compute capability {env.get('capability')})" if s["device"] == "cuda" else ""),
        f"- python {env.get('python', '?')}; {have}; not installed: {lacking}",
        f"- {s['started']}; budget {s['budget']:.0f} s, used {s.get('used_s', 0):.0f} s; commands run from the "
        "repository root (the suite's --json / --junitxml / --out paths left out)",
        f"- `{s['command']}`",
    ]  # fmt: skip
    if env.get("error"):
        lines.append(f"- probe failed: {env['error']}")
    lines += ["", "| part | status | wall s | budget s | rows | note |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for p in state["parts"]:
        note = p.get("reason", "")
        lines.append(f"| {p['part']} | {p['status']} | {_f(p.get('wall_s'), '.0f')} | {_f(p.get('budget_s'), '.0f')} "
                     f"| {len(p.get('rows', []))} | {_cell(note)} |")  # fmt: skip
    label = device_label(env, s["device"])
    for p in state["parts"]:
        if not p.get("rows"):
            continue
        head, cells = TABLES[p["part"]]
        lines += ["", f"## {p['title']}", ""]
        lines.append("| " + " | ".join([*head, "status", "device", "dtype", "command"]) + " |")
        lines.append("|" + " --- |" * (len(head) + 4))
        for r in p["rows"]:
            status = r["status"] if r["status"] in ("ok", "passed") else f"{r['status']}: {r.get('reason', '')}"
            command = r.get("command") or p["command"]
            row = [*cells(r), status if p["part"] != "pytest" else r["status"], label, p["dtype"], f"`{command}`"]
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    failed = [p for p in state["parts"] if p["status"] in ("failed", "timeout", "interrupted")]
    if failed:
        lines += ["", "## Parts that failed or timed out"]
        for p in failed:
            which = "stderr_tail" if p.get("stderr_tail", "").strip() and p["part"] != "pytest" else "stdout_tail"
            tail = "\n".join(p.get(which, "").strip().splitlines()[-15:])
            lines += ["", f"{p['part']} ({p['status']}, rc {p.get('rc')}; {which.replace('_', ' ')}): "
                      f"`{p['command']}`", "", "```", tail, "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------------------


def _timeout_arg(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART in {', '.join(PARTS)}; got {text!r}")
    return name, float(seconds)


def _parts_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad}; choices: {', '.join(PARTS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for results.json, results.md and log.txt")
    p.add_argument("--budget", type=float, help="seconds for the whole suite (default 540; --smoke 175)")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny sizes")
    p.add_argument("--parts", type=_parts_arg, default=list(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cpu with --smoke")
    p.add_argument("--dry-run", action="store_true", help="print each part's command and budget, run nothing")
    p.add_argument("--timeout", type=_timeout_arg, action="append", default=[], metavar="PART=SECONDS",
                   help="a part's own budget instead of the default (repeatable)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    budget = args.budget or (175.0 if args.smoke else 540.0)
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    env = probe()
    cuda = bool(env.get("cuda_available"))
    args.device = ("cpu" if args.smoke or not cuda else "cuda") if args.device == "auto" else args.device
    if args.dry_run:
        for part in plan(args, env, Path("$WORK")):
            skipped = "; ".join(f"{r['name']}: {r['reason']}" for r in part.skipped_rows)
            print(f"{part.name} (budget {part.budget:.0f} s, min {part.min_s:.0f} s): {part.command()}"
                  + (f"\n    skipped up front: {skipped}" if skipped else ""))  # fmt: skip
        return 0
    if args.device == "cuda" and not cuda:
        print(
            f"--device cuda: no CUDA device ({env.get('error', 'torch.cuda.is_available() is False')})",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.smoke and "--device" not in (argv or sys.argv):
        print("no CUDA device here: the real sizes need a GPU; run with --smoke (or --device cpu to insist)",
              file=sys.stderr)  # fmt: skip
        return 2
    command = " ".join(
        shlex.quote(a) for a in ["python", "bench/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
    )
    state: dict[str, Any] = {
        "suite": {"started": started.isoformat(timespec="seconds"), "budget": budget, "smoke": args.smoke,
                  "device": args.device, "command": command, "parts": args.parts},
        "env": env, "parts": [],
    }  # fmt: skip
    log = args.out / "log.txt"
    log.write_text(f"{command}\n{json.dumps(env)}\n")
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        work = Path(tmp)
        try:
            for part in plan(args, env, work):
                if not run_one_part(part, args, env, state, t0, budget, work, log):
                    break
        except Interrupted as err:  # between parts: the running one (if any) was already recorded
            state["suite"]["interrupted"] = str(err)
        finally:
            state["suite"]["used_s"] = time.monotonic() - t0
            write_results(args.out, state)
    print(markdown(state))
    statuses = {p["status"] for p in state["parts"]}
    return 130 if "interrupted" in statuses or state["suite"].get("interrupted") else 0


def run_one_part(
    part: Part,
    args: argparse.Namespace,
    env: dict[str, Any],
    state: dict[str, Any],
    t0: float,
    budget: float,
    work: Path,
    log: Path,
) -> bool:
    """Run (or skip) one part and record it; False when the suite was interrupted."""
    left = budget - (time.monotonic() - t0)
    entry: dict[str, Any] = {"part": part.name, "title": part.title, "command": part.command(), "dtype": part.dtype,
                             "budget_s": min(part.budget, max(left, 0))}  # fmt: skip
    state["parts"].append(entry)
    missing = [p for p in NEEDS[part.name] if not env.get("packages", {}).get(p)]
    if missing:
        entry |= {"status": "skipped", "reason": f"not installed: {', '.join(missing)}", "rows": part.skipped_rows}
    elif not part.expect and part.skipped_rows:
        entry |= {"status": "skipped", "reason": "no row can run here (see the rows)", "rows": part.skipped_rows}
    elif left < part.min_s:
        entry |= {"status": "skipped", "rows": part.skipped_rows,
                  "reason": f"{left:.0f} s left of the {budget:.0f} s budget, this part needs at least {part.min_s:.0f} s"}  # fmt: skip
    if "status" in entry:
        print(f"[gpu_suite] {part.name}: skipped ({entry['reason']})", file=sys.stderr, flush=True)
        write_results(args.out, state)
        return True
    entry["status"] = "running"
    write_results(args.out, state)
    print(
        f"[gpu_suite] {part.name}: {entry['command']} (budget {entry['budget_s']:.0f} s)", file=sys.stderr, flush=True
    )
    run = run_part(part, entry["budget_s"], work)
    entry |= {k: v for k, v in run.items() if k != "stdout_all"}
    if run["status"] == "timeout":
        entry["reason"] = f"killed at its budget of {entry['budget_s']:.0f} s"
    elif run["status"] == "failed":  # pytest's verdict is its last stdout line; a script's, its traceback's last
        lines = run["stdout_tail" if part.name == "pytest" else "stderr_tail"].strip().splitlines()
        entry["reason"] = (lines or [f"exit status {run['rc']}"])[-1].strip("= ")[:200]
    try:
        entry["rows"] = part.rows(part, run)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a malformed row must not lose the others
        entry["rows"] = []
        entry["reason"] = f"{entry.get('reason', '')} rows unreadable: {type(err).__name__}: {err}".strip()
    with log.open("a") as f:
        f.write(f"\n===== {part.name} ({run['status']}, rc {run['rc']}, {run['wall_s']:.1f} s): {entry['command']}\n")
        f.write(run["stdout_all"][-100_000:])
        f.write("\n----- stderr (tail)\n" + run["stderr_tail"] + "\n")
    print(f"[gpu_suite] {part.name}: {run['status']} in {run['wall_s']:.0f} s", file=sys.stderr, flush=True)
    write_results(args.out, state)
    return run["status"] != "interrupted"


if __name__ == "__main__":
    raise SystemExit(main())
