"""Exceptions of the core. Each message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "SepaRegError",
    "InputError",
    "VolumeReadError",
    "SeriesError",
    "ArchiveError",
    "CancelledError",
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
