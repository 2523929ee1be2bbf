"""RTSTRUCT import: the contours of an RTSTRUCT rasterised onto its CT series (writing is
:mod:`separeg.rt.rtstruct_write`, DICOM training cases :mod:`separeg.rt.dicom_cases`).

Rasterisation convention (as plastimatch and SlicerRT's planar-contour rasterisers: voxel centres): a voxel is inside
an ROI when its centre lies inside the ROI's polygons on its slice under the even-odd rule, so nested contours on one
slice XOR (a contour inside another is a hole; one inside a hole is an island). A centre exactly on an edge belongs to
the polygon when the edge is a left or top edge (lower x or y index) and not when it is a right or bottom edge, so a
square with vertices on voxel centres 2..5 covers 3 x 3 voxels and two polygons sharing an edge never both claim a
voxel. Contour points are mapped from patient coordinates (LPS mm) to continuous voxel indices through the inverse of
``direction @ diag(spacing)`` (any direction matrix), rounded to 1e-6 voxel so that the edge rule does not depend on
floating-point noise. A contour belongs to the slice whose index its points round to; one more than a quarter of a
slice spacing off every slice, or beyond the first or last slice, is left out with a warning, never moved. Points
outside the slice's field of view are clipped.

Duplicate ROI names in an imported RTSTRUCT are kept apart: the second and later
get ``" [ROI <number>]"`` appended, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from separeg.io.dicom_ct import CtSeries
from separeg.io.dicom_series import _first_line, _referenced_series
from separeg.rt.labels import LabelTable
from separeg.rt.organs import RGB, normalise_name, to_tg263
from separeg.rt.raster import INDEX_DECIMALS, rasterise
from separeg.runtime.errors import InputError

__all__ = ["RoiMask", "RtImport", "LabelmapMatch", "read_rtstruct"]

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SLICE_TOLERANCE = 0.25  # of the slice spacing: how far a contour may lie from the slice it is put on
_CLOSED = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR", "CLOSED_PLANAR_XOR")


@dataclass
class RoiMask:
    """One imported ROI. The mask is kept as its bounding box (``box``, ``crop``) to save memory.

    Attributes:
        number: ROI Number in the RTSTRUCT.
        name: ROI Name (duplicates disambiguated, see the module doc).
        tg263: its TG-263 name from the registry (:func:`~separeg.rt.organs.to_tg263`), None if not in it.
        interpreted_type: RT ROI Interpreted Type ("ORGAN", "GTV", ...; "" when not given).
        color: ROI Display Color, None if not given.
        warnings: what went wrong importing this ROI (contours left out, clipped).
        box: ``(z, y, x)`` slices of the CT array that ``crop`` covers.
        crop: bool mask inside ``box``.
        shape: the CT array's shape ``(z, y, x)``.
    """

    number: int
    name: str
    tg263: str | None
    interpreted_type: str
    color: RGB | None
    warnings: list[str]
    box: tuple[slice, slice, slice]
    crop: np.ndarray
    shape: tuple[int, int, int]

    @property
    def mask(self) -> np.ndarray:
        """bool ``(z, y, x)`` aligned with the CT series' array (a new array on each call)."""
        full = np.zeros(self.shape, bool)
        full[self.box] = self.crop
        return full

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.crop))


@dataclass
class LabelmapMatch:
    """ROIs of an :class:`RtImport` painted into a label map of a :class:`~separeg.rt.labels.LabelTable`.

    Attributes:
        labelmap: ``(z, y, x)`` uint8 (uint16 when the table's values need it).
        matched: label value -> the ROI name painted with it.
        unmatched: ROI names that matched no label (or a label another ROI already had).
        warnings: overlaps and ambiguous matches.
    """

    labelmap: np.ndarray
    matched: dict[int, str]
    unmatched: list[str]
    warnings: list[str]


@dataclass
class RtImport:
    """What :func:`read_rtstruct` got from an RTSTRUCT: the ROIs with voxels, the ROIs left out, and warnings."""

    rois: list[RoiMask]
    skipped: list[str]
    warnings: list[str]
    shape: tuple[int, int, int] = (0, 0, 0)

    def roi(self, name: str) -> RoiMask | None:
        return next((r for r in self.rois if r.name == name), None)

    def match(self, table: LabelTable, *, synonyms: Mapping[str, str] | None = None) -> LabelmapMatch:
        """Paint the ROIs that match a label of ``table`` into a label map.

        ROI names are matched like :meth:`LabelTable.by_name` (name, TG-263 name and registry synonyms, ignoring case
        and punctuation), after the user's ``synonyms`` (their name -> TG-263 or label name). When two ROIs match one
        label, the one with the lower ROI number is used and the other is listed unmatched. Where masks overlap, the
        smaller organ (fewer voxels) keeps the voxel (ties: the higher label value), with a warning per pair.
        """
        user = {_normalise(k): v for k, v in (synonyms or {}).items()}
        by_label: dict[int, RoiMask] = {}
        unmatched: list[str] = []
        warnings: list[str] = []
        for roi in sorted(self.rois, key=lambda r: r.number):
            target = user.get(_normalise(roi.name), roi.name)
            label = table.by_name(target)
            if label is None:
                unmatched.append(roi.name)
            elif label.value in by_label:
                unmatched.append(roi.name)
                warnings.append(f"ROIs {by_label[label.value].name!r} and {roi.name!r} both match label "
                                f"{label.name!r}; {by_label[label.value].name!r} is used")
            else:
                by_label[label.value] = roi
        top = max(table.values, default=0)
        labelmap = np.zeros(self.shape, np.uint8 if top <= 255 else np.uint16)
        order = sorted(by_label.items(), key=lambda item: (-item[1].voxels, item[0]))
        for value, roi in order:
            view = labelmap[roi.box]
            claimed = view[roi.crop]
            if claimed.any():
                counts = np.bincount(claimed, minlength=top + 1)
                for other in np.flatnonzero(counts[1:]) + 1:
                    warnings.append(f"{counts[other]} voxels are in both {by_label[int(other)].name!r} and "
                                    f"{roi.name!r}; they go to the smaller, {roi.name!r}")
            view[roi.crop] = value
        for warning in warnings:
            log.warning(warning)
        return LabelmapMatch(labelmap, {v: r.name for v, r in by_label.items()}, unmatched, warnings)

    def to_labelmap(self, table: LabelTable, *,
                    synonyms: Mapping[str, str] | None = None) -> tuple[np.ndarray, list[str]]:
        """``(labelmap, unmatched ROI names)``; see :meth:`match` (its warnings are logged)."""
        result = self.match(table, synonyms=synonyms)
        return result.labelmap, result.unmatched


# ----------------------------------------------------------------------------------------------- import


def read_rtstruct(path: str | Path, ct: CtSeries) -> RtImport:
    """Rasterise the closed planar contours of an RTSTRUCT onto a CT series' grid (see the module doc).

    Args:
        path: the RTSTRUCT file.
        ct: the series it was drawn on (:func:`~separeg.io.dicom_ct.read_ct_series`).

    Returns:
        The ROIs with at least one voxel, in ROI number order; the ROIs left out and why (no contour data, only
        POINT or open contours, no voxel centre inside, another Frame of Reference); warnings (contours between or
        beyond slices, clipped at the field of view, duplicate names, slice references that disagree).

    Raises:
        InputError: the file is missing, not DICOM, or not an RTSTRUCT; it references another Frame of Reference
            or another series than ``ct`` (both UIDs are named).
    """
    ds = _read_rtstruct_dataset(Path(path))
    _check_references(ds, ct, Path(path))
    contours_by_roi = {int(item.ReferencedROINumber): item for item in ds.get("ROIContourSequence", [])
                       if "ReferencedROINumber" in item}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}
    slice_of_uid = {uid: k for k, uid in enumerate(ct.sop_instance_uids)}
    matrix, origin = ct.index_to_lps()
    inverse = np.linalg.inv(matrix)
    result = RtImport([], [], [], ct.shape)
    seen: dict[str, int] = {}
    for roi in ds.get("StructureSetROISequence", []):
        number, name = int(roi.ROINumber), str(roi.get("ROIName", "") or f"ROI {roi.ROINumber}")
        if _normalise(name) in seen:
            new = f"{name} [ROI {number}]"
            result.warnings.append(f"ROI name {name!r} is used by ROIs {seen[_normalise(name)]} and {number}; "
                                   f"ROI {number} is imported as {new!r}")
            name = new
        seen.setdefault(_normalise(name), number)
        ref_for = str(roi.get("ReferencedFrameOfReferenceUID", "") or "")
        if ref_for and ref_for != ct.frame_of_reference_uid:
            result.skipped.append(f"{name}: drawn in Frame of Reference {ref_for}, not the CT's "
                                  f"{ct.frame_of_reference_uid}")
            continue
        item = contours_by_roi.get(number)
        sequence = item.get("ContourSequence", []) if item is not None else []
        if not sequence:
            result.skipped.append(f"{name}: no contour data (empty ROI)")
            continue
        warnings: list[str] = []
        polygons, kinds = _slice_polygons(name, sequence, inverse, origin, ct, slice_of_uid, warnings)
        if not polygons:
            reason = f"only {'/'.join(sorted(kinds))} contours, no closed planar contour" if kinds else \
                "no contour on a CT slice (see the warnings)"
            result.skipped.append(f"{name}: {reason}")
            result.warnings += warnings
            continue
        box, crop = rasterise(polygons, ct.shape)
        if crop is None:
            result.skipped.append(f"{name}: its contours enclose no voxel centre (smaller than a voxel?)")
            result.warnings += warnings
            continue
        color = item.get("ROIDisplayColor") if item is not None else None
        result.rois.append(RoiMask(
            number=number, name=name, tg263=to_tg263(name), interpreted_type=types.get(number, ""),
            color=tuple(int(c) for c in color) if color is not None and len(color) == 3 else None,
            warnings=warnings, box=box, crop=crop, shape=ct.shape))
        result.warnings += warnings
    for message in result.warnings + [f"ROI not imported: {s}" for s in result.skipped]:
        log.warning("%s: %s", path, message)
    return result


def _read_rtstruct_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise InputError(f"RTSTRUCT {path} does not exist" + (" (it is a folder; give the RTSTRUCT file)"
                                                               if path.is_dir() else ""))
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:  # no preamble (older exports): read anyway, then check what it is
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for damaged or foreign files
        raise InputError(f"{path} is not a readable DICOM file ({_first_line(exc)}); give an RTSTRUCT file") from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class != RTSTRUCT_SOP_CLASS and modality != "RTSTRUCT":
        what = f"a {modality} object" if modality else "not a DICOM object (no Modality)"
        if sop_class:
            what += f" (SOP class {getattr(ds.SOPClassUID, 'name', sop_class)})"
        raise InputError(f"{path} is {what}, not an RT Structure Set; give the RTSTRUCT file exported with the CT")
    if "StructureSetROISequence" not in ds:
        raise InputError(f"{path} is an RTSTRUCT without a Structure Set ROI Sequence; it lists no structures")
    return ds


def _check_references(ds, ct: CtSeries, path: Path) -> None:
    fors = {str(item.FrameOfReferenceUID) for item in ds.get("ReferencedFrameOfReferenceSequence", [])
            if item.get("FrameOfReferenceUID")}
    if fors and ct.frame_of_reference_uid not in fors:
        raise InputError(
            f"{path} references Frame of Reference {', '.join(sorted(fors))}, but the CT series "
            f"{ct.series_instance_uid} in {ct.folder} is in Frame of Reference {ct.frame_of_reference_uid}: the "
            "structures were drawn on another scan. Give the CT series the RTSTRUCT was drawn on")
    series = _referenced_series(ds)
    if series and ct.series_instance_uid not in series:
        raise InputError(
            f"{path} references the series {', '.join(sorted(series))}, not the CT series {ct.series_instance_uid} "
            f"in {ct.folder}. Give the CT series the RTSTRUCT was drawn on")


def _contour_points(item) -> np.ndarray:
    """ContourData as ``(N, 3)`` floats, parsed from the raw bytes when pydicom has not converted them yet."""
    elem = item.get_item("ContourData")
    if elem is None or elem.value is None:
        return np.zeros((0, 3))
    value = elem.value
    if isinstance(value, bytes):
        numbers = np.array(value.decode("ascii", "replace").replace("\\", " ").split(), float)
    else:
        numbers = np.asarray(value if isinstance(value, Iterable) else [value], float)
    return numbers[: len(numbers) // 3 * 3].reshape(-1, 3)


def _slice_polygons(name, sequence, inverse, origin, ct, slice_of_uid, warnings):
    """``({slice k: [(N, 2) x, y voxel indices]}, contour types that cannot be rasterised)``."""
    nz, ny, nx = ct.shape
    polygons: dict[int, list[np.ndarray]] = {}
    other_kinds: set[str] = set()
    between, beyond, degenerate, clipped, wrong_ref, unknown_ref = [], [], 0, 0, 0, 0
    for item in sequence:
        kind = str(item.get("ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR").upper()
        if kind not in _CLOSED:
            other_kinds.add(kind)
            continue
        points = _contour_points(item)
        if len(points) < 3:
            degenerate += 1
            continue
        ijk = np.round((points - origin) @ inverse.T, INDEX_DECIMALS)
        k = int(np.round(ijk[:, 2].mean()))
        z_mm = float(points[:, 2].mean())
        if np.abs(ijk[:, 2] - k).max() > SLICE_TOLERANCE:
            between.append(z_mm)
            continue
        if not 0 <= k < nz:
            beyond.append(z_mm)
            continue
        if (ijk[:, 0].min() < -0.5 or ijk[:, 0].max() > nx - 0.5 or ijk[:, 1].min() < -0.5
                or ijk[:, 1].max() > ny - 0.5):
            clipped += 1
        for ref in item.get("ContourImageSequence", []):
            uid = str(ref.get("ReferencedSOPInstanceUID", ""))
            if uid not in slice_of_uid:
                unknown_ref += 1
            elif slice_of_uid[uid] != k:
                wrong_ref += 1
        polygons.setdefault(k, []).append(ijk[:, :2])

    def zs(values: list[float]) -> str:
        shown = ", ".join(f"{z:.2f}" for z in values[:5])
        return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")

    if between:
        warnings.append(f"ROI {name!r}: {len(between)} contour(s) lie between CT slices (more than "
                        f"{SLICE_TOLERANCE:g} slice spacing from a slice) at z = {zs(between)} mm; left out")
    if beyond:
        warnings.append(f"ROI {name!r}: {len(beyond)} contour(s) lie beyond the CT's first or last slice at "
                        f"z = {zs(beyond)} mm (off the volume); left out")
    if clipped:
        warnings.append(f"ROI {name!r}: {clipped} contour(s) reach outside the CT's field of view (off the volume); "
                        "the parts outside are clipped")
    if degenerate:
        warnings.append(f"ROI {name!r}: {degenerate} contour(s) with fewer than 3 points left out")
    if other_kinds and polygons:
        warnings.append(f"ROI {name!r}: {'/'.join(sorted(other_kinds))} contours ignored (not closed planar)")
    if unknown_ref:
        warnings.append(f"ROI {name!r}: {unknown_ref} contour(s) reference an image that is not a slice of the CT; "
                        "placed by their position")
    if wrong_ref:
        warnings.append(f"ROI {name!r}: {wrong_ref} contour(s) reference another slice than the one at their "
                        "position; placed by their position")
    return polygons, other_kinds


# ----------------------------------------------------------------------------------------------- synonyms


def _normalise(name: str) -> str:
    """See :func:`separeg.rt.organs.normalise_name` (every script kept); a name of punctuation alone stays itself."""
    return normalise_name(name) or str(name)
