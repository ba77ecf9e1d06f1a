"""The one base class of user-facing failures, and how they reach the terminal.

A ``UserError`` is something the user can fix (a config key, a data file or row, a model path, a held lock, a
refused resume, a scorer's weights): its message is ONE line that names the key/file/row and the fix. Every
command (``diffalign run | validate | eval | label | ...``) and every recipe script prints it as
``error: <message>`` on stderr and exits with status 1, without a traceback unless ``--debug`` or
``DIFFALIGN_DEBUG=1`` asks for one. The more specific classes (``config.ConfigError``, ``cli.CLIError``,
``data.records.BadRowError``, ...) subclass it; nothing here imports the rest of the package.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


DEBUG_ENV = "DIFFALIGN_DEBUG"
# set by ``diffalign run`` for its children: a failing recipe process writes its one error line here, so the
# launcher can print the first child's line after the multi-process launcher's own report
ERROR_FILE_ENV = "DIFFALIGN_ERROR_FILE"


class UserError(Exception):
    """A failure the user can fix; ``str(e)`` is one line naming the key, file or row and the fix."""


class InterruptedRun(UserError):
    """A run stopped by Ctrl-C / SIGTERM; the message says where it stopped and how to resume."""

    exit_status = 130


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a multi-line message is joined with ``; ``)."""
    text = str(exc).strip() or type(exc).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)


def report(exc: BaseException, stream=None) -> int:
    """Print ``exc`` as ``error: <one line>`` (with the traceback first when debugging); returns the exit status.

    Also writes the line to the file named by ``DIFFALIGN_ERROR_FILE`` (if set and not yet written by another
    process), so ``diffalign run`` can repeat the first child's error after a multi-process launcher's report.
    """
    stream = stream or sys.stderr
    if debug_enabled():
        traceback.print_exception(exc, file=stream)
    line = f"error: {one_line(exc)}"
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            pass  # another process wrote first (or the folder is gone): the first line wins
        else:
            with os.fdopen(fd, "w") as f:
                f.write(line + "\n")
    print(line, file=stream, flush=True)  # after the file: a launcher reading both sees the file first
    return getattr(exc, "exit_status", 1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def script_main(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` the way the ``diffalign`` command does: a ``UserError`` (and an interrupt) ends
    with one ``error:`` line and its exit status instead of a traceback (kept with ``DIFFALIGN_DEBUG=1``).

    SIGINT and SIGTERM both interrupt ``main`` (a process started in the background inherits an ignored SIGINT,
    so the handler is installed explicitly): training loops turn the interrupt into an ``InterruptedRun`` saying
    where the run stopped and how to resume it.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        main()
    except UserError as e:
        sys.exit(report(e))
    except KeyboardInterrupt:
        sys.exit(report(InterruptedRun("interrupted before training started; nothing was saved")))
