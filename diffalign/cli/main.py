"""Entry point of the ``diffalign`` command: parse, dispatch to a subcommand, turn errors into exit codes.

Arguments after a bare ``--`` are passed through untouched (``run`` hands them to ``accelerate launch``).
Every user-facing failure (``errors.UserError``: config, data, model path, lock, resume, scorer) ends as one line,
``error: <what and the fix>``, with exit status 1; ``--debug`` (or ``DIFFALIGN_DEBUG=1``) adds the traceback.
Free ``key=value`` arguments are config overrides for the commands that take them (``run``, ``validate``);
they may appear anywhere after the subcommand, between options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diffalign import errors
from diffalign.cli import cp, ls, plot, quickstart, run, validate
from diffalign.cli import eval as eval_cmd
from diffalign.cli import label as label_cmd


COMMANDS = (quickstart, run, cp, ls, validate, eval_cmd, label_cmd, plot)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Preference alignment of text-to-image diffusion models (LoRA recipes, losses, configs).",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error (also {errors.DEBUG_ENV}=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffalign`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args_list, passthrough = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args_list  # accepted anywhere before `--`, also after the subcommand
    args_list = [a for a in args_list if a != "--debug"]
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(args_list)
    except SystemExit as e:  # --help or a usage error; keep main() usable in-process
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides or not getattr(args, "takes_overrides", False)]
    if unknown:
        print(f"diffalign {args.command}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    if passthrough and not getattr(args, "takes_passthrough", False):
        print(f"diffalign {args.command}: error: takes no arguments after '--'", file=sys.stderr)
        return 2
    args.overrides, args.passthrough = overrides, passthrough
    if debug:
        os.environ[errors.DEBUG_ENV] = "1"  # the recipe processes `run` starts inherit it
    try:
        return args.func(args)
    except errors.UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        return errors.report(errors.InterruptedRun(f"diffalign {args.command} interrupted"))
    except BrokenPipeError:  # `diffalign ls configs | head`: the reader left; end quietly as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 141  # 128 + SIGPIPE, the shell's status for a process ended by a closed pipe
