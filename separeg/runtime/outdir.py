"""The output folder of `contour` and `export`: checked and locked before any work.

A folder given as ``--out`` must be a folder (not a file) that this user can write; that is checked first, before
inference or export, and a problem is reported with the user's path, not a temporary file's name. While the run
writes, the folder is locked (:mod:`separeg.runtime.runlock`), so a second run into the same folder is refused at once
with who holds it, instead of both writing ``ct_dicom/`` and one failing on the other's files. A folder the run created
is removed again when the run fails before writing anything into it.

One folder, one result (issue 30): an output folder holds the files of the last run only. Just before a run writes,
:func:`begin_result` removes what an earlier run wrote there (the product's own file names, :data:`RESULT_FILES`, and
``ct_dicom/`` when the earlier ``export.json`` records it), so another patient's ``seg.dcm`` is never left beside
this patient's CT and RTSTRUCT. Other files are never touched, nor this run's inputs (a label map exported into the
folder ``contour`` wrote it to). A run that fails after that point removes what it wrote (:func:`abandon_result`):
the folder then holds no result rather than half of one; the failure before it leaves the earlier result as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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

__all__ = ["check_output_folder", "output_folder", "begin_result", "finish_result", "abandon_result",
           "RESULT_FILES", "RESULT_FOLDERS", "PENDING_FILE"]

# What `contour` and `export` write (separeg.segment.contour, separeg.rt.export; Testing/test_outdir.py checks the
# names agree): label map and its description, RTSTRUCT, SEG, the export manifest; ct_dicom/: the CT written as DICOM.
RESULT_FILES = ("segmentation.nii.gz", "segmentation.json", "rtstruct.dcm", "seg.dcm", "export.json")
RESULT_FOLDERS = ("ct_dicom",)
MANIFEST = "export.json"
# Written by begin_result, removed when the result is complete: lists what this run may create, so that a failed run
# (or, after a crash, the next one) removes exactly that.
PENDING_FILE = ".separeg-result-pending.json"


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
    except BaseException:
        abandon_result(out)  # no half-written result: what this run wrote goes too
        raise
    finally:
        release_run_lock(out)
        if not holds_run_lock(out):  # an output folder is not a run directory: no lock file among the exports
            (out / LOCK_FILE).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()


def _recorded_folders(out: Path) -> set[str]:
    """The :data:`RESULT_FOLDERS` the earlier run's ``export.json`` (or a crashed run's pending list) says it wrote."""
    recorded: set[str] = set()
    for name, key in ((MANIFEST, "outputs"), (PENDING_FILE, "creates")):
        try:
            data = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        written = data.get(key) if isinstance(data, dict) else None
        names = written.values() if isinstance(written, dict) else written if isinstance(written, list) else ()
        recorded |= {str(n) for n in names} & set(RESULT_FOLDERS)
    return recorded


def _is_input(path: Path, inputs: set[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == p or resolved in p.parents for p in inputs)


def begin_result(out: str | Path, *, keep: Iterable[str | Path] = ()) -> list[str]:
    """Remove the earlier result from ``out`` just before this run writes its own (see the module doc).

    Args:
        out: the output folder (locked by :func:`output_folder` on the command line).
        keep: this run's inputs; one inside ``out`` (or a result folder holding one) is not removed.

    Returns:
        The names removed.
    """
    from separeg.runtime.atomic import remove_partial_files, write_json

    out = Path(out)
    inputs = {Path(p).resolve() for p in keep}
    folders = _recorded_folders(out)
    candidates = [out / n for n in RESULT_FILES if (out / n).is_file() or (out / n).is_symlink()]
    candidates += [out / n for n in sorted(folders) if (out / n).is_dir() and not (out / n).is_symlink()]
    removed = []
    for path in candidates:
        if _is_input(path, inputs):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    remove_partial_files(out)
    creates = [n for n in (*RESULT_FILES, *RESULT_FOLDERS) if not (out / n).exists() and not (out / n).is_symlink()]
    write_json({"creates": creates}, out / PENDING_FILE)
    return removed


def finish_result(out: str | Path) -> None:
    """The result in ``out`` is complete: forget the pending list."""
    (Path(out) / PENDING_FILE).unlink(missing_ok=True)


def abandon_result(out: str | Path) -> list[str]:
    """Remove what a run that failed after :func:`begin_result` created in ``out``; returns the names removed."""
    out = Path(out)
    try:
        creates = json.loads((out / PENDING_FILE).read_text(encoding="utf-8")).get("creates", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    removed = []
    for name in (n for n in creates if n in (*RESULT_FILES, *RESULT_FOLDERS)):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(name)
    finish_result(out)
    return removed
