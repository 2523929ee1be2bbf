"""Atomic file writes: write to a temporary file beside the target, then rename.

An interrupted run (Ctrl-C, SIGKILL, full disk) leaves either the old file or the new one, never a
half-written file that looks complete. Temporary files are named ``.<name>.partial.<random><suffix>``; a
SIGKILL can leave one behind, and :func:`remove_partial_files` clears them when a run starts again.
A full disk is reported as :class:`DiskFullError`: where, how much was written, how much is free.
Checksums: a ``<file>.sha256`` sidecar in ``sha256sum -c`` format records the digests a file may have.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from separeg.runtime.errors import SepaRegError

__all__ = ["atomic_path", "write_json", "DiskFullError", "remove_partial_files", "format_bytes", "PARTIAL_MARK",
           "HashingWriter", "checksum_path", "write_checksums", "recorded_digests", "file_sha256"]

# mkstemp creates files readable by the owner only; finished outputs get the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)

PARTIAL_MARK = ".partial."
CHECKSUM_SUFFIX = ".sha256"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(SepaRegError, OSError):
    """No space left (or the quota is used up) while writing a file; the previous version of the file is kept."""


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path``, on error removed.

    Args:
        path: the final file.
        suffix: the temporary file's suffix (writers that pick the format by extension need it);
            default: ``path``'s own suffix.

    Raises:
        DiskFullError: the disk filled up while writing; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        written = _size(Path(tmp))
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in _DISK_FULL:
            raise disk_full_error(path, written) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def disk_full_error(path: Path, written: int) -> DiskFullError:
    """The error for a write of ``path`` that ran out of space after ``written`` bytes."""
    previous = _size(path)
    free = shutil.disk_usage(path.parent).free
    needed = max(written, previous)
    kept = f" The previous {path.name} is intact." if path.exists() else ""
    error = DiskFullError(
        f"the disk is full: writing {path} stopped after {format_bytes(written)}, with {format_bytes(free)} free in "
        f"{path.parent}. It needs at least {format_bytes(needed)} (more for the files still to come); free some space "
        f"there or choose a folder on another disk, then re-run the same command.{kept}")
    error.errno = errno.ENOSPC
    return error


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted write left in ``folder`` (not recursive); returns them.

    Call it only while no other process writes to ``folder`` (e.g. holding the run directory's lock).
    """
    leftovers = [p for p in folder.glob(f".*{PARTIAL_MARK}*") if p.is_file()] if folder.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def format_bytes(n: int | float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as disk tools report free space)."""
    if abs(n) < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_json(data: object, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return Path(path)


def checksum_path(path: str | Path) -> Path:
    """The sidecar ``<file>.sha256`` (``sha256sum -c`` format) that records a file's digest."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksums(path: Path, digests: list[str]) -> None:
    """Atomically record the digests ``path`` may have (more than one only while a replacement is pending)."""
    with atomic_path(checksum_path(path), suffix=".tmp") as tmp:
        tmp.write_text("".join(f"{d}  {path.name}\n" for d in dict.fromkeys(digests)), encoding="ascii")


def recorded_digests(path: str | Path) -> list[str]:
    """The digests ``path``'s sidecar accepts; none when it is missing or unreadable."""
    try:
        lines = checksum_path(path).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0].lower() for line in lines if line.strip()]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            sha.update(block)
    return sha.hexdigest()


class HashingWriter:
    """A file object for serialisers (e.g. ``torch.save``): hashes the bytes on their way to ``file`` and keeps
    the ``OSError`` (e.g. disk full) that a C++ writer would replace by a bare RuntimeError."""

    def __init__(self, file) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()
