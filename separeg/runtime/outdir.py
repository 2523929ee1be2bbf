"""The output folder of `contour` and `export`: checked and locked before any work.

A folder given as ``--out`` must be a folder (not a file) that this user can write; that is checked first, before
inference or export, and a problem is reported with the user's path, not a temporary file's name. While the run
writes, the folder is locked (:mod:`separeg.runtime.runlock`), so a second run into the same folder is refused at once
with who holds it, instead of both writing ``ct_dicom/`` and one failing on the other's files. A folder the run created
is removed again when the run fails before writing anything into it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from separeg.runtime.errors import InputError
from separeg.runtime.runlock import (
    LOCK_FILE,
    RunLockedError,
    _read_holder,
    acquire_run_lock,
    holds_run_lock,
    release_run_lock,
)

__all__ = ["check_output_folder", "output_folder"]


def check_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file or cannot be written, creating nothing.

    Raises:
        InputError: ``out`` (or the first existing folder above it) is a file, or this user cannot write there.
    """
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise InputError(f"{flag} {out} {where}; give a folder for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = out if existing == out else f"{out} (in {existing})"
        raise InputError(f"{flag} {what}: no permission to write there; give a folder you can write to")
    return out


@contextmanager
def output_folder(out: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Check, create and lock ``out`` for the duration of a run (see the module doc).

    Raises:
        InputError: see :func:`check_output_folder`; the folder cannot be written after all (a read-only file system).
        RunLockedError: another run is writing into ``out``.
    """
    out = check_output_folder(out, flag)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".separeg-write-test-"):
            pass
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise InputError(f"{flag} {out} cannot be written ({exc.strerror or exc}); give a folder you can write "
                         "to") from exc
    try:
        acquire_run_lock(out)
    except RunLockedError as exc:
        holder = _read_holder(out / LOCK_FILE)
        who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
        command = f" ({holder['command']})" if holder.get("command") else ""
        raise RunLockedError(f"{flag} {out} is being written by another separeg run: {who}{command}. Two runs into "
                             "one folder would mix their files; wait for that run to finish, or give this run "
                             f"another {flag} folder") from exc
    try:
        yield out
    finally:
        release_run_lock(out)
        if not holds_run_lock(out):  # an output folder is not a run directory: no lock file among the exports
            (out / LOCK_FILE).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
