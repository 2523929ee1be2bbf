"""Exceptions of the core. Each message says what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SepaRegError",
    "InputError",
    "VolumeReadError",
    "SeriesError",
    "ArchiveError",
    "CancelledError",
    "read_text_table",
]


class SepaRegError(Exception):
    """Base class for errors the CLI reports as a message (no traceback)."""


class InputError(SepaRegError):
    """An input exists but cannot be used (wrong kind, too small, bad geometry)."""


class VolumeReadError(InputError):
    """A file or folder could not be read as an image volume."""


class SeriesError(InputError):
    """A DICOM folder does not hold exactly one usable series."""


class ArchiveError(InputError):
    """An archive folder holds nothing usable (empty, or no volume of the wanted modality)."""


class CancelledError(SepaRegError):
    """The user stopped a run (Ctrl-C, SIGTERM or the stop file); state was saved first."""


def read_text_table(path: str | Path, what: str) -> str:
    """The text of a user's JSON/CSV table (label table, case list, synonyms); a UTF-8 byte-order mark is dropped.

    Raises:
        InputError: ``path`` is missing, a folder, unreadable or not UTF-8; the message names ``what`` it should be.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} could not be read ({exc}); it must be a UTF-8 JSON or CSV text file") \
            from exc
