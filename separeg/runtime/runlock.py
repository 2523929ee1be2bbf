"""One run per run directory: an advisory lock file that the operating system drops when its process ends.

Two runs writing one directory would overwrite each other's checkpoints. The first run locks
``RUN_DIR/run.lock`` (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) and writes who it is there;
a second run is refused with that information. The operating system releases the lock when the process
exits, however it exits (SIGKILL and crashes included), so a killed run never blocks its restart and there
is no stale lock to delete. Within one process the lock is re-entrant (counted), so a library caller may
run the same directory again after a run returns.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from separeg.runtime.errors import InputError

__all__ = ["LOCK_FILE", "RunLockedError", "acquire_run_lock", "release_run_lock", "run_lock", "holds_run_lock"]

LOCK_FILE = "run.lock"
# Windows locks byte ranges and refuses reads of a locked range: lock a byte far past the holder's note.
_WINDOWS_LOCK_OFFSET = 1 << 20


class RunLockedError(InputError):
    """Another process holds the run directory's lock."""


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[Path, _Held] = {}


def acquire_run_lock(root: str | Path) -> Path:
    """Lock ``root`` for this process (creating it), or count one more use of a lock this process holds.

    Returns:
        The lock file.

    Raises:
        RunLockedError: another process holds the lock; the message says which and what to do.
    """
    root = Path(root).resolve()
    held = _held.get(root)
    if held is not None:
        held.count += 1
        return root / LOCK_FILE
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        locked = _lock(fd)
    except OSError:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        raise RunLockedError(_locked_message(root, path))
    _write_holder(fd)
    _held[root] = _Held(fd, 1)
    return path


def release_run_lock(root: str | Path) -> None:
    """Count one use less; the last one unlocks (the lock file stays: deleting it would race a new locker)."""
    root = Path(root).resolve()
    held = _held.get(root)
    if held is None:
        return
    held.count -= 1
    if held.count == 0:
        del _held[root]
        _unlock(held.fd)
        os.close(held.fd)


def holds_run_lock(root: str | Path) -> bool:
    return Path(root).resolve() in _held


@contextmanager
def run_lock(root: str | Path) -> Iterator[Path]:
    path = acquire_run_lock(root)
    try:
        yield path
    finally:
        release_run_lock(root)


def _lock(fd: int) -> bool:
    """Non-blocking exclusive lock: False when another process holds it (other failures raise OSError)."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLOCK):
                return False
            raise
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message a second run gets."""
    note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(note) + "\n").encode("utf-8"))


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8").strip() or "{}")
    except (OSError, ValueError):  # being written at this moment, or unreadable
        return {}


def _locked_message(root: Path, path: Path) -> str:
    holder = _read_holder(path)
    who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
    if holder.get("host") not in (None, socket.gethostname()):
        who += " (another computer: the folder is shared over the network)"
    since = f", started {holder['started']}" if holder.get("started") else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"{root} is in use by another run: {who}{since}{command}. Two runs in one folder would overwrite each "
            "other's checkpoints. Wait for that run to finish or stop it (Ctrl-C, or Stop in Slicer), then re-run "
            "this command to resume; or give this run another --out folder. The lock is released when that process "
            f"ends, even if it crashes: there is no need to delete {path.name}.")
