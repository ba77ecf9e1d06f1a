"""``diffalign run <recipe> --config <name|path> [k=v ...] [--dry-run] [--num-processes N] [--distributed KIND]
[--num-machines M --machine-rank R --main-process-ip IP --main-process-port P] [-- accelerate args]``.

The config (with overrides) is loaded and checked here first, so a typo fails in a second, before any
process or model starts. Then the recipe script runs as ``python recipe.py --config PATH k=v ...`` for one
process, or under ``accelerate launch --multi_gpu --num_processes N`` for several. ``--distributed KIND`` launches
with the shipped accelerate config ``recipes/accelerate/KIND.yaml`` instead (``accelerate launch --config_file``;
``DISTRIBUTED`` lists them); the multi-node flags pass through to accelerate (``--num-processes`` counts all
processes of all machines, as accelerate's ``--num_processes``). The recipe loads the same config again with
``diffalign.config.load(path, overrides)``.

The child runs in its own process group and the wrapper forwards SIGINT, SIGTERM and SIGHUP to it (once: a
terminal's Ctrl-C reaches only the wrapper), then waits for it: stopping ``diffalign run`` stops the training.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from diffalign import config, errors, registry
from diffalign.cli import CLIError


def resolve_recipe(recipe: str) -> Path:
    """A recipe path (``my_recipe.py``, ``./x/y.py``) or a shipped name (``offline_pref``)."""
    path = Path(recipe).expanduser()
    if recipe.endswith(".py") or os.sep in recipe or "/" in recipe:
        if not path.is_file():
            raise CLIError(f"recipe file {recipe!r} not found")
        return path
    candidate = config.recipes_dir() / f"{recipe}.py"
    if not candidate.is_file():
        names = config.recipe_names()
        hint = registry.suggest(recipe, names) if names else f"no recipes in {config.recipes_dir()}"
        raise CLIError(f"unknown recipe {recipe!r}; {hint}")
    return candidate


# ``--distributed`` kinds: the shipped accelerate config files (``accelerate_config``)
DISTRIBUTED = ("ddp", "fsdp", "fsdp_offload", "zero2", "zero3")
DEEPSPEED = ("zero2", "zero3")


def accelerate_config(kind: str) -> Path:
    """The shipped accelerate config file of a ``--distributed`` kind."""
    if kind not in DISTRIBUTED:
        raise CLIError(f"--distributed {kind!r}: {registry.suggest(kind, DISTRIBUTED)}")
    return config.recipes_dir() / "accelerate" / f"{kind}.yaml"


@dataclass(frozen=True)
class Launch:
    """How many processes on how many machines, and where they meet (accelerate launch's flags)."""

    num_processes: int = 1  # over all machines
    distributed: str | None = None  # a DISTRIBUTED kind; None: --multi_gpu for several processes
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def problems(self) -> list[str]:
        """One line per inconsistent flag, naming it and the fix."""
        found = []
        if self.num_processes < 1:
            found.append(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.num_machines < 1:
            found.append(f"--num-machines must be >= 1, got {self.num_machines}")
        elif self.num_processes % self.num_machines:
            found.append(
                f"--num-processes {self.num_processes} is not a multiple of --num-machines {self.num_machines}: "
                "it counts the processes of all machines (e.g. 16 for 2 machines of 8 GPUs)"
            )
        if not 0 <= self.machine_rank < max(self.num_machines, 1):
            found.append(f"--machine-rank {self.machine_rank} must be in 0..{self.num_machines - 1} (--num-machines)")
        if self.num_machines > 1 and not self.main_process_ip:
            found.append(
                "--num-machines > 1 needs --main-process-ip (the address of the machine with --machine-rank 0)"
            )
        return found


def build_command(
    recipe_path: str | Path,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    num_processes: int = 1,
    main_process_port: int | None = None,
    accelerate_args: Sequence[str] = (),
    python: str = sys.executable,
    launch: Launch | None = None,
) -> list[str]:
    """The child command line.

    One process without accelerate arguments runs the script directly; otherwise it goes through
    ``accelerate launch`` (as ``python -m accelerate.commands.launch``, so the same environment is used),
    with ``--multi_gpu`` for more than one process (on a CPU-only machine this gives gloo data parallel), or with
    ``--config_file`` of the ``launch.distributed`` kind. ``launch`` overrides ``num_processes`` and
    ``main_process_port``.
    """
    launch = launch or Launch(num_processes=num_processes, main_process_port=main_process_port)
    if found := launch.problems():
        raise CLIError(config.problems_message(found))
    script = [str(recipe_path), "--config", str(config_path), *overrides]
    plain = launch.distributed is None and launch.num_machines == 1
    if plain and launch.num_processes == 1 and not accelerate_args and launch.main_process_port is None:
        return [python, *script]
    cmd = [python, "-m", "accelerate.commands.launch"]
    if launch.distributed is not None:
        cmd += ["--config_file", str(accelerate_config(launch.distributed))]
    elif launch.num_processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines)]
    if launch.num_machines > 1:
        cmd += ["--machine_rank", str(launch.machine_rank), "--main_process_ip", str(launch.main_process_ip)]
    if launch.main_process_port is not None:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    return [*cmd, *accelerate_args, *script]


# recipes whose every forward runs on every process in the same order (what FSDP's collectives need), tested sharded
# (tests/recipes/test_fsdp*.py)
SHARDED_RECIPES = ("offline_pref", "online_rl", "reward_grad", "stepwise_pref", "selfnpo", "dro")


def sharding_problem(kind: str | None, recipe_path: Path) -> str | None:
    """Why ``--distributed fsdp*`` cannot run ``recipe_path``, or None."""
    if kind is None or not kind.startswith("fsdp") or recipe_path.stem in SHARDED_RECIPES:
        return None
    return (
        f"--distributed {kind}: recipe {recipe_path.stem} is not proven under FSDP (its sampling must run the same "
        f"forwards on every process); sharded recipes: {', '.join(SHARDED_RECIPES)}. Use --distributed ddp"
    )


# recipes proven under DeepSpeed ZeRO-2 and ZeRO-3 (tests/recipes/test_zero.py, test_zero_online.py: each against
# DDP); dro under ZeRO-3 needs ema.enabled=false (zero.config_problem); the others keep FSDP2 / DDP
ZERO_RECIPES = ("offline_pref", "online_rl", "reward_grad", "selfnpo", "dro", "stepwise_pref")


def deepspeed_problem(kind: str | None, recipe_path: Path, cfg: object) -> str | None:
    """Why ``--distributed zero2|zero3`` cannot run ``recipe_path`` with ``cfg``, or None (other kinds: None)."""
    if kind not in DEEPSPEED:
        return None
    if recipe_path.stem not in ZERO_RECIPES:
        return (
            f"--distributed {kind}: recipe {recipe_path.stem} is not proven under DeepSpeed; DeepSpeed recipes: "
            f"{', '.join(ZERO_RECIPES)}. Use --distributed ddp"
        )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return f"--distributed {kind} needs DeepSpeed: pip install 'diffalign[deepspeed]'"
    from diffalign.training import zero  # torch: only for a DeepSpeed launch

    return zero.config_problem(cfg, int(kind[-1]))


def child_env(
    num_processes: int, environ: Mapping[str, str] | None = None, cuda_available: bool | None = None
) -> dict[str, str]:
    """The child's environment: ours, plus ``ACCELERATE_USE_CPU=true`` for multi-process runs without CUDA."""
    env = dict(os.environ if environ is None else environ)
    if num_processes > 1:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            env.setdefault("ACCELERATE_USE_CPU", "true")
    return env


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand."""
    p = subparsers.add_parser(
        "run",
        help="validate a config and launch a recipe",
        description="Validate the config (with key=value overrides) and check its paths, data and output folder, "
        "then run the recipe script (by default the one the config names with its `recipe:` key), under "
        "`accelerate launch` when --num-processes > 1. Arguments after `--` go to accelerate launch.",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help="shipped recipe name (see `diffalign ls recipes`) or a path to a .py script; default: the config's recipe",
    )
    p.add_argument("--config", required=True, help="shipped config name (e.g. toy/dpo) or a YAML path")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and derived numbers, then exit")
    p.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (default 1)")
    p.add_argument(
        "--distributed",
        default=None,
        metavar="{" + ",".join(DISTRIBUTED) + "}",
        help="launch with a shipped accelerate config: ddp (replicated weights), fsdp (FSDP2 full shard of the "
        "denoiser), fsdp_offload (the same with CPU offload), zero2 / zero3 (DeepSpeed ZeRO-2 / ZeRO-3)",
    )
    p.add_argument("--num-machines", type=int, default=1, help="machines of a multi-node run (default 1)")
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0..num-machines-1")
    p.add_argument("--main-process-ip", default=None, help="address of the machine with --machine-rank 0")
    p.add_argument("--main-process-port", type=int, default=None, help="rendezvous port for accelerate")
    p.set_defaults(func=run, takes_overrides=True, takes_passthrough=True)
    from diffalign.cli import document_overrides

    document_overrides(p)
    return p


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N, like a shell


def _recipe_and_config(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, object]:
    """The recipe script and the loaded config; without a recipe argument, the config's ``recipe:`` names it."""
    recipe = args.recipe
    if recipe is not None and "=" in recipe and not recipe.endswith(".py"):  # an override taken as the recipe
        overrides.insert(0, recipe)
        recipe = None
    if recipe is None:
        cfg = config.load(args.config, overrides)
        return resolve_recipe(config.recipe_name(type(cfg))), cfg
    recipe_path = resolve_recipe(recipe)
    return recipe_path, config.load(args.config, overrides, schema=config.schema_for_recipe(recipe_path))


def run(args: argparse.Namespace) -> int:
    """Validate and check (``training.preflight``), then either print (``--dry-run``) or launch; returns the
    child's exit status."""
    overrides = list(getattr(args, "overrides", []))
    recipe_path, cfg = _recipe_and_config(args, overrides)
    config_path = config.resolve_config_path(args.config).resolve()
    launch_spec = Launch(
        num_processes=args.num_processes,
        distributed=getattr(args, "distributed", None),
        num_machines=getattr(args, "num_machines", 1),
        machine_rank=getattr(args, "machine_rank", 0),
        main_process_ip=getattr(args, "main_process_ip", None),
        main_process_port=args.main_process_port,
    )
    if launch_spec.distributed is not None:
        accelerate_config(launch_spec.distributed)  # an unknown kind: one line with the choices
    kind = launch_spec.distributed
    config_problem = None
    if kind is not None and kind.startswith("fsdp"):
        from diffalign.training import sharding  # torch: only for a sharded launch

        config_problem = sharding.config_problem(cfg)
    found = [
        *launch_spec.problems(),
        *filter(
            None, [deepspeed_problem(kind, recipe_path, cfg), sharding_problem(kind, recipe_path), config_problem]
        ),
    ]
    if args.dry_run:  # a launch runs them in preflight.check, with the other checks
        found += config.launch_problems(cfg, args.num_processes)
    if found:  # every launch problem at once
        raise CLIError(config.problems_message(found))
    cmd = build_command(
        recipe_path, config_path, overrides, accelerate_args=getattr(args, "passthrough", []), launch=launch_spec
    )
    if args.dry_run:
        print(f"# recipe: {recipe_path}\n# config: {config_path}")
        print(config.dumps(cfg), end="")
        if described := config.describe(cfg, args.num_processes):
            print("\n# summary\n" + "\n".join(f"# {line}" for line in described.splitlines()))
        print(f"\n# command: {shlex.join(cmd)}")
        return 0
    if hasattr(cfg, "run"):
        from diffalign.training import preflight

        # another machine of the same run may already hold the output folder's lock: only machine 0 probes it
        preflight.check(cfg, args.num_processes, probe_lock=launch_spec.machine_rank == 0)
    print(f"launching: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    multi = "accelerate.commands.launch" in cmd
    procs = max(
        args.num_processes, 2 if launch_spec.distributed else 1
    )  # an FSDP launch of 1 process is distributed too
    return _exit_status(launch(cmd, child_env(procs), quiet_after_error=multi))


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def launch(cmd: Sequence[str], env: Mapping[str, str], quiet_after_error: bool = False) -> int:
    """Run ``cmd`` to completion, forwarding ``FORWARDED`` signals to it; returns its ``returncode``.

    The children write their first error line to a file (``errors.ERROR_FILE_ENV``). ``quiet_after_error`` (the
    multi-process launcher): the child's stderr passes through until that line exists, the launcher's own report
    of the failure after it is dropped (kept with ``--debug``), and the line is printed again at the end, so the
    user's last line is the cause.
    """
    with tempfile.TemporaryDirectory(prefix="diffalign-run-") as tmp:
        error_file = Path(tmp) / "error"
        env = {**env, errors.ERROR_FILE_ENV: str(error_file)}
        filtered = quiet_after_error and not errors.debug_enabled()
        proc = subprocess.Popen(cmd, env=env, process_group=0, stderr=subprocess.PIPE if filtered else None)
        pump, tail = None, bytearray(b"\n")
        if filtered:
            pump = threading.Thread(target=_pass_stderr, args=(proc.stderr, error_file, tail), daemon=True)
            pump.start()
        code = _wait(proc)
        if pump is not None:
            pump.join(timeout=5)
        if filtered and code != 0 and error_file.is_file():
            start = "" if tail.endswith(b"\n") else "\n"  # after a progress bar's last redraw
            print(start + error_file.read_text().strip(), file=sys.stderr, flush=True)
        return code


def _pass_stderr(stream: IO[bytes], error_file: Path, tail: bytearray) -> None:
    """Copy ``stream`` to our stderr as it comes (progress bars stay live) until a child reported its error;
    ``tail`` keeps the last byte passed on."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        if error_file.is_file():
            continue  # the launcher's report of the failure (and the other processes' noise)
        tail[:] = chunk[-1:]
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))


def _wait(proc: subprocess.Popen) -> int:
    if threading.current_thread() is not threading.main_thread():  # signal handlers need the main thread
        return proc.wait()
    previous = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum)) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
