"""Crash-safe file helpers shared by training, labelling and caching.

* ``write_atomic`` / ``replace_dir``: write beside the target, then swap it in with renames. A crash at any point
  leaves either the previous file/folder or the new one, never a half-written one (at worst a hidden
  ``.<name>.tmp`` / ``.<name>.old`` sibling, which the next write clears).
* ``FolderLock``: one process at a time per output folder (``<folder>/.lock``, ``flock``), naming the holder.
* ``append_jsonl`` / ``keep_jsonl`` / ``read_jsonl``: the ``metrics.jsonl`` format every training script writes.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from diffalign.errors import UserError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A dot-named temporary beside ``path`` that no ``*.parquet`` / ``*.png`` / ``*.jsonl`` glob matches."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the complete new one."""
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def temp_dir(out: Path) -> Path:
    """``.<name>.tmp`` beside ``out``: where its replacement is assembled before ``swap_dir``."""
    return out.with_name(f".{out.name}.tmp")


def fresh_temp_dir(out: Path) -> Path:
    """``temp_dir(out)`` with whatever a killed write left there removed (not created: writers make it)."""
    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def swap_dir(tmp: Path, out: Path) -> Path:
    """Move the finished folder ``tmp`` to ``out``; an old ``out`` is renamed aside first and deleted last.

    ``out`` never holds a mixture: it is the old folder, absent (between the two renames), or the new one.
    """
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


def replace_dir(out: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh hidden folder, then move it to ``out`` (replacing any old one)."""
    out = Path(out)
    tmp = fresh_temp_dir(out)
    write(tmp)
    return swap_dir(tmp, out)


def move_aside(folder: str | Path, keep: tuple[str, ...] = (".lock",)) -> Path:
    """Move every entry of ``folder`` except ``keep`` into a new dated sibling ``<name>.old-YYYYmmdd-HHMMSS``.

    Renames only (same file system, nothing copied or deleted); returns the sibling. ``.lock`` stays so that the
    caller keeps holding the folder's lock while it starts afresh in it.
    """
    folder = Path(folder)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
        n += 1
    dest.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry.name not in keep:
            entry.rename(dest / entry.name)
    fsync_dir(dest)
    fsync_dir(folder)
    return dest


class FolderBusyError(UserError, RuntimeError):
    """Another process holds the folder's lock; ``holder`` is what it recorded (pid, host, purpose, time)."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by another process: {holder} (it holds {folder / '.lock'})")
        self.folder, self.holder = folder, holder


def lock_holder(folder: str | Path) -> str | None:
    """What the process holding ``<folder>/.lock`` recorded, or None when nobody holds it (nothing is written)."""
    import fcntl

    path = Path(folder) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder not recorded"
    finally:
        os.close(fd)
    return None


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, or ``FolderBusyError`` naming the process that holds it.

    The OS drops the lock when its holder exits, even on SIGKILL, so a killed run never blocks the next one. The
    holder writes ``<purpose>: pid N on HOST since TIME`` into the file for the error message of a refused run.
    Use as a context manager or call ``release()``.
    """

    def __init__(self, folder: str | Path, purpose: str) -> None:
        import fcntl

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "holder not recorded"
            self.release()
            raise FolderBusyError(folder, holder) from None
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{purpose}: pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def append_jsonl(path: str | Path, record: dict[str, object]) -> None:
    """Append one JSON line (the ``metrics.jsonl`` format every training script writes)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite ``path`` atomically without the rows ``keep`` rejects and without torn lines; returns rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(line + "\n")
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept).encode())
    return len(lines) - len(kept)


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON-object rows of ``path``, skipping torn lines (a writer killed mid-line) as ``keep_jsonl`` does."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
