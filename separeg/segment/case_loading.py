"""Loading a training case: its CT (and further channels, co-registered), its label map or RTSTRUCT matched to the
label table, and which organs it annotates (a value absent from the map is *unknown* for partial labels)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from separeg.io.volumes import Geometry, read_volume
from separeg.rt.labels import LabelTable
from separeg.runtime.errors import InputError
from separeg.segment.cases import Case

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["LoadedCase", "load_case"]

log = logging.getLogger(__name__)


@dataclass
class LoadedCase:
    """A case read into memory.

    Attributes:
        name: the case name.
        image: the image volume, geometry kept (LPS).
        labels: the label map, (Z, Y, X) like ``sitk.GetArrayFromImage(image)``; uint8 when the table's values fit,
            else uint16.
        annotated: the label values present in this case. Organs of the table outside this set were not
            annotated in this case: unknown, not background.
        unused: what the case's labels held that gave no organ, for messages: an RTSTRUCT's ROI names that match no
            organ of the table, and its ROIs without a voxel on this CT (``"not imported: name: why"``).
    """

    name: str
    image: sitk.Image
    labels: np.ndarray
    annotated: frozenset[int]
    channels: tuple[sitk.Image, ...] = ()  # every input channel on image's grid ([0] is image); empty: image only
    warnings: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[sitk.Image, ...]:
        """The input channels, in order, all on the image's grid."""
        return self.channels or (self.image,)

    def not_annotated(self, table: LabelTable) -> frozenset[int]:
        """The table's label values this case has no voxel of (unknown in this case, not background)."""
        return frozenset(table.values) - self.annotated


def load_case(case: Case, table: LabelTable, *, synonyms: Mapping[str, str] | None = None) -> LoadedCase:
    """Read a case's image and label map and check them against each other and against ``table``.

    Args:
        case: the case.
        table: the organs the label maps may hold.
        synonyms: for DICOM cases, the user's ROI names -> label or TG-263 names
            (:func:`~separeg.rt.dicom_cases.load_synonyms`); ROIs that match no label are left out with a logged
            warning.

    Returns:
        The loaded case; ``annotated`` holds the label values with at least one voxel (organs of ``table`` outside
        it were not contoured in this case: unknown, not background). For a DICOM case the label map is the
        RTSTRUCT's ROIs rasterised on the CT's grid (see :mod:`separeg.rt.rtstruct`); the organs it has no ROI for are
        not annotated.

    Raises:
        VolumeReadError: an unreadable file (from :func:`~separeg.io.volumes.read_volume`).
        SeriesError: an unusable DICOM series (see :func:`~separeg.io.dicom_ct.read_ct_series`).
        InputError: the label map's grid differs from the image's (both geometries are named), it holds
            negative or fractional values, or values that are not in ``table``; an RTSTRUCT that is not one or was
            drawn on another series.
    """
    import SimpleITK as sitk

    if case.is_dicom:
        from separeg.rt.dicom_cases import load_dicom_case

        image, labels, annotated, unmatched, skipped = load_dicom_case(case.image, case.labels, table,
                                                                       series_uid=case.series_uid, synonyms=synonyms)
        if unmatched:
            log.warning("case %s: ROIs %s of %s match no organ of the label table; left out", case.name,
                        ", ".join(unmatched), case.labels)
        unused = ((f"ROI names matching no organ: {', '.join(unmatched)}",) if unmatched else ()) + \
            tuple(f"not imported: {why}" for why in skipped)
        return LoadedCase(case.name, image, labels, annotated, unused=unused)
    image = read_volume(case.image)
    channels, warnings = (), ()
    if case.channels:
        from separeg.io.channels import co_register

        names = [p.name for p in case.images]
        registered, notes = co_register([image, *(read_volume(p) for p in case.channels)], names)
        channels, warnings = tuple(registered), tuple(f"case {case.name}: {note}" for note in notes)
        for note in warnings:
            log.warning("%s", note)
    label_image = read_volume(case.labels)
    image_geometry, label_geometry = Geometry.of(image), Geometry.of(label_image)
    if not image_geometry.matches(label_geometry):
        raise InputError(
            f"case {case.name}: the label map does not lie on the image's grid: image {case.image}: "
            f"{image_geometry.describe()}; labels {case.labels}: {label_geometry.describe()}. Export the label map "
            "on the CT's grid (in Slicer: Segmentations > Export to label map with the CT as reference volume) or "
            "pair the right files"
        )
    array = sitk.GetArrayFromImage(label_image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"case {case.name}: the label map {case.labels} holds fractional values; it must hold "
                             "whole label values (is it a probability map or an image?)")
        array = array.astype(np.int64)
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"case {case.name}: the label map {case.labels} has voxel type {array.dtype}; "
                         "integer label values are needed")
    if array.size and array.min() < 0:
        raise InputError(f"case {case.name}: the label map {case.labels} holds negative values (min {array.min()}); "
                         "label values are 0 (background) and the table's positive values")
    present = _present_values(array)
    unknown = sorted(present - set(table.values) - {0})
    if unknown:
        raise InputError(
            f"case {case.name}: the label map {case.labels} holds values {', '.join(map(str, unknown))} that are not "
            f"in the label table (values {', '.join(map(str, table.values))}: {', '.join(table.names)}). "
            "Add them to the label table or relabel the map"
        )
    top = max(table.values, default=0)
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.int32
    return LoadedCase(case.name, image, array.astype(dtype, copy=False), frozenset(present - {0}), channels, warnings)


def _present_values(array: np.ndarray, chunk: int = 1 << 22) -> set[int]:
    """Distinct values of a non-negative integer array.

    Counted with bincount in chunks of ``chunk`` voxels: faster than ``np.unique`` (no sort) and without a
    64-bit copy of a whole large volume.
    """
    if array.size == 0:
        return set()
    top = int(array.max())
    if top >= 1 << 16:
        return {int(v) for v in np.unique(array)}
    flat = array.ravel()
    counts = np.zeros(top + 1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=top + 1)
    return {int(v) for v in np.flatnonzero(counts)}
