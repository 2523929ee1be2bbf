"""RTSTRUCT <-> masks on a CT series: import (rasterise contours), export (contours from masks), DICOM cases.

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

Export writes, per slice, the boundaries :func:`skimage.measure.find_contours` finds at level 0.5 on the zero-padded
mask: vertices halfway between an inside and an outside voxel centre, so no voxel centre lies on an edge and
re-importing gives back exactly the mask. Holes are written as separate contours (read back by the XOR rule), or
with ``holes="keyhole"`` joined to the boundary around them by zero-width cuts, which readers that OR contours
(plastimatch, several planning systems) also read right (:mod:`separeg.rt.keyhole`). The convention is recorded
in the RTSTRUCT (StructureSetDescription) and in ``export.json``.

The generation type (ROI Generation Algorithm) is AUTOMATIC with a model, MANUAL without one
(:func:`~separeg.io.dicom_ct.generation_type`); only automatic contours carry the "not reviewed" notice.
Colinear points are dropped (exact). Duplicate ROI names in an imported RTSTRUCT are kept apart: the second and later
get ``" [ROI <number>]"`` appended, with a warning.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from separeg import __version__
from separeg.io.dicom_ct import (
    Algorithm,
    CtSeries,
    copy_patient_study,
    ensure_character_set,
    generation_type,
    read_ct_series,
)
from separeg.io.volumes import IMAGE_MODALITIES, _first_line, _referenced_series, index_dicom_files
from separeg.rt.keyhole import HOLE_CONVENTIONS, keyhole
from separeg.rt.labels import RGB, LabelTable, default_color, normalise_name, to_tg263
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import InputError, read_text_table

__all__ = [
    "RoiMask",
    "RtImport",
    "LabelmapMatch",
    "DicomCase",
    "read_rtstruct",
    "write_rtstruct",
    "write_rtstruct_masks",
    "load_synonyms",
    "interpreted_type",
    "find_dicom_cases",
    "load_dicom_case",
]

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# What the RT Referenced Study item names as the study's SOP class (Detached Study Management; what TPSs write).
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
SLICE_TOLERANCE = 0.25  # of the slice spacing: how far a contour may lie from the slice it is put on
_INDEX_DECIMALS = 6
_CLOSED = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR", "CLOSED_PLANAR_XOR")
_TARGET = re.compile(r"^(gtv|ctv|itv|ptv)", re.IGNORECASE)
_EXTERNAL = {"external", "body", "skin", "outline", "bodycontour"}
_PROGRAM = "SepaReg"
RTSTRUCT_SERIES_NUMBER = 302  # beside the SEG's 301
HOLE_NOTES = {
    "separate": "holes are separate CLOSED_PLANAR contours: combine a slice's contours by the even-odd rule",
    "keyhole": "holes are joined to their outer contour by zero-width keyhole cuts",
}


@dataclass
class RoiMask:
    """One imported ROI. The mask is kept as its bounding box (``box``, ``crop``) to save memory.

    Attributes:
        number: ROI Number in the RTSTRUCT.
        name: ROI Name (duplicates disambiguated, see the module doc).
        tg263: its TG-263 name from the registry (:func:`~separeg.rt.labels.to_tg263`), None if not in it.
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
        box, crop = _rasterise(polygons, ct.shape)
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
        ijk = np.round((points - origin) @ inverse.T, _INDEX_DECIMALS)
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


def _rasterise(polygons: dict[int, list[np.ndarray]], shape: tuple[int, int, int]):
    """``(box, crop)`` of the voxels whose centres lie inside (even-odd) their slice's polygons, or (None, None)."""
    filled = {}
    for k, polys in polygons.items():
        got = _fill_slice(polys, shape[1], shape[2])
        if got is not None:
            filled[k] = got
    if not filled:
        return None, None
    ks = sorted(filled)
    y0 = min(f[0] for f in filled.values())
    x0 = min(f[1] for f in filled.values())
    y1 = max(f[0] + f[2].shape[0] for f in filled.values())
    x1 = max(f[1] + f[2].shape[1] for f in filled.values())
    crop = np.zeros((ks[-1] - ks[0] + 1, y1 - y0, x1 - x0), bool)
    for k, (y, x, mask) in filled.items():
        crop[k - ks[0], y - y0:y - y0 + mask.shape[0], x - x0:x - x0 + mask.shape[1]] = mask
    return (slice(ks[0], ks[-1] + 1), slice(y0, y1), slice(x0, x1)), crop


def _fill_slice(polys: list[np.ndarray], height: int, width: int):
    """Scanline even-odd fill of ``(N, 2)`` (x, y) index polygons on voxel centres: ``(y0, x0, mask)`` or None.

    Rows ``y`` cross an edge when ``min(y_a, y_b) <= y < max(y_a, y_b)``; on a row, a voxel is inside when an odd
    number of crossings lie at or left of its centre. Work is per crossing, within the polygons' bounding box.
    """
    points = np.concatenate(polys)
    xmin, xmax = max(0, int(np.ceil(points[:, 0].min()))), min(width - 1, int(np.floor(points[:, 0].max())))
    ymin, ymax = max(0, int(np.ceil(points[:, 1].min()))), min(height - 1, int(np.floor(points[:, 1].max())))
    if xmin > xmax or ymin > ymax:
        return None
    start = np.concatenate(polys)
    end = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    lo, hi = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    first = np.clip(np.ceil(lo), ymin, ymax + 1).astype(np.int64)
    stop = np.clip(np.ceil(hi), ymin, ymax + 1).astype(np.int64)
    counts = stop - first
    edge = np.repeat(np.arange(len(start)), counts)
    if edge.size == 0:
        return None
    row = first[edge] + np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts)
    xa, ya, xb, yb = start[edge, 0], start[edge, 1], end[edge, 0], end[edge, 1]
    crossing = np.round(xa + (row - ya) * (xb - xa) / (yb - ya), _INDEX_DECIMALS)
    column = np.clip(np.ceil(crossing), xmin, xmax + 1).astype(np.int64) - xmin
    rows, cols = ymax - ymin + 1, xmax - xmin + 2
    toggles = np.bincount((row - ymin) * cols + column, minlength=rows * cols).reshape(rows, cols)
    mask = (np.cumsum(toggles[:, :-1], axis=1) & 1).astype(bool)
    if not mask.any():
        return None
    return ymin, xmin, mask


# ----------------------------------------------------------------------------------------------- export


@dataclass
class _RoiOut:
    name: str
    color: RGB
    interpreted_type: str
    box: tuple[slice, slice, slice]
    crop: np.ndarray


def interpreted_type(name: str, tg263: str = "", overrides: Mapping[str, str] | None = None) -> str:
    """RT ROI Interpreted Type of a structure: ``overrides[name or tg263]``, GTV/CTV/PTV for targets named so in
    TG-263 (ITV, an expanded CTV, as CTV), EXTERNAL for the body outline, else ORGAN."""
    for key in (name, tg263):
        if overrides and key in overrides:
            return str(overrides[key]).upper()
    match = _TARGET.match(tg263 or name) or _TARGET.match(name)
    if match:
        kind = match.group(1).upper()
        return "CTV" if kind == "ITV" else kind
    return "EXTERNAL" if _normalise(tg263 or name) in _EXTERNAL else "ORGAN"


def write_rtstruct(path: str | Path, labelmap: np.ndarray, table: LabelTable, ct: CtSeries, *,
                   algorithm: Algorithm | None, series_description: str = "SepaReg auto-contours",
                   interpreted_types: Mapping[str, str] | None = None, generation: str | None = None,
                   holes: str = "separate") -> Path:
    """Write a label map as an RTSTRUCT that references ``ct``: one ROI per label present, named by its TG-263 name
    (its own name when it has none) and coloured as in ``table``. Labels without a voxel are left out (logged).

    Args:
        path: the file to write (atomically).
        labelmap: ``(z, y, x)`` integer array aligned with ``ct``'s array.
        table: the organs; values of ``labelmap`` outside it are refused.
        ct: the series the label map lies on.
        algorithm: the model that made the contours (model, version, bundle hash); None: no model (MANUAL).
        series_description: SeriesDescription and StructureSetName.
        interpreted_types: RT ROI Interpreted Type by label name or TG-263 name (default: :func:`interpreted_type`).
        generation: ROI Generation Algorithm (default AUTOMATIC with a model, MANUAL without).
        holes: "separate" or "keyhole" (see the module doc).

    Raises:
        InputError: the label map's shape is not the CT's, or it holds values not in ``table``; a generation type
            that needs a model without one; an unknown hole convention.
    """
    from scipy import ndimage

    labelmap = np.asarray(labelmap)
    _check_shape(labelmap, ct, "label map")
    if not np.issubdtype(labelmap.dtype, np.integer):
        raise InputError(f"the label map has voxel type {labelmap.dtype}; integer label values are needed")
    boxes = ndimage.find_objects(labelmap) if labelmap.any() else []
    unknown = [v + 1 for v, box in enumerate(boxes) if box is not None and v + 1 not in table.values]
    if unknown or labelmap.min() < 0:
        raise InputError(f"the label map holds values {', '.join(map(str, unknown)) or 'below 0'} that are not in the "
                         f"label table ({', '.join(map(str, table.values))}); relabel it or use the model's table")
    rois = []
    for label in table:
        box = boxes[label.value - 1] if label.value <= len(boxes) else None
        if box is None:
            log.warning("label %d (%s) has no voxel; no ROI written for it", label.value, label.name)
            continue
        name = label.tg263 or label.name
        rois.append(_RoiOut(name, label.color, interpreted_type(label.name, label.tg263, interpreted_types), box,
                            labelmap[box] == label.value))
    return _write(Path(path), rois, ct, algorithm, series_description, generation, holes)


def write_rtstruct_masks(path: str | Path, masks: Mapping[str, np.ndarray], ct: CtSeries, *,
                         algorithm: Algorithm | None, colors: Mapping[str, RGB] | None = None,
                         series_description: str = "SepaReg auto-contours",
                         interpreted_types: Mapping[str, str] | None = None, generation: str | None = None,
                         holes: str = "separate") -> Path:
    """Write possibly overlapping masks as an RTSTRUCT that references ``ct``, one ROI per non-empty mask.

    Args:
        path: the file to write (atomically).
        masks: ROI name -> bool ``(z, y, x)`` mask aligned with ``ct``'s array; written in this order.
        ct: the series.
        algorithm: the model that made the contours; None: no model (MANUAL).
        colors: ROI name -> RGB; default: the registry colour of the name's TG-263 form.
        series_description: SeriesDescription and StructureSetName.
        interpreted_types: RT ROI Interpreted Type by ROI name (default: :func:`interpreted_type`).
        generation, holes: as for :func:`write_rtstruct`.

    Raises:
        InputError: a mask's shape is not the CT's; see :func:`write_rtstruct`.
    """
    rois = []
    for i, (name, mask) in enumerate(masks.items(), start=1):
        mask = np.asarray(mask).astype(bool, copy=False)
        _check_shape(mask, ct, f"mask {name!r}")
        box = _bounding_box(mask)
        if box is None:
            log.warning("mask %r is empty; no ROI written for it", name)
            continue
        tg263 = to_tg263(name) or ""
        color = tuple(colors[name]) if colors and name in colors else default_color(tg263, i)
        rois.append(_RoiOut(name, color, interpreted_type(name, tg263, interpreted_types), box, mask[box]))
    return _write(Path(path), rois, ct, algorithm, series_description, generation, holes)


def _check_shape(array: np.ndarray, ct: CtSeries, what: str) -> None:
    if array.shape != ct.shape:
        raise InputError(f"the {what} has shape {array.shape} (z, y, x), the CT series {ct.series_instance_uid} "
                         f"{ct.shape}; it must lie on the CT's grid")


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of a 2D mask as ``(N, 2)`` (x, y) index polygons, colinear points removed."""
    from skimage.measure import find_contours

    out = []
    for contour in find_contours(np.pad(mask2d, 1).astype(np.float32), 0.5):
        xy = contour[:-1, ::-1] - 1.0 if np.array_equal(contour[0], contour[-1]) else contour[:, ::-1] - 1.0
        before, after = xy - np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0) - xy
        cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        keep = (np.abs(cross) > 1e-9) | ((before * after).sum(axis=1) <= 0)
        xy = xy[keep]
        if len(xy) >= 3:
            out.append(xy)
    return out


def _contour_data(values: np.ndarray):
    """ContourData as an encoded DS element: 0.1 um precision, trailing zeros dropped.

    Built as raw bytes because pydicom's per-value DS conversion and checks take most of the export's time
    (LUNG1: 1.9 of 2.7 s).
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.4f}".rstrip("0").rstrip(".") for v in values.tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(Tag(0x30060050), "DS", len(text), text, 0, False, True)


def _notice(kind: str, algorithm: Algorithm | None) -> str | None:
    """Who made the contours, for StructureSetDescription and ROIObservationDescription (None for manual ones)."""
    if kind == "AUTOMATIC":
        return f"Automatic contour by {_PROGRAM} model {algorithm.describe()}; not reviewed by a clinician"
    if kind == "SEMIAUTOMATIC":
        return f"Contour by {_PROGRAM} model {algorithm.describe()}, edited by a user"
    return None


def _write(path: Path, rois: list[_RoiOut], ct: CtSeries, algorithm: Algorithm | None, description: str,
           generation: str | None = None, holes: str = "separate") -> Path:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    names = [r.name for r in rois]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"ROI names {', '.join(duplicates)} are given twice; every ROI needs its own name")
    if holes not in HOLE_CONVENTIONS:
        raise InputError(f"unknown hole convention {holes!r}; choose from {', '.join(HOLE_CONVENTIONS)}")
    kind = generation_type(algorithm, generation)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    author = _notice(kind, algorithm)
    matrix, origin = ct.index_to_lps()

    ds = pydicom.Dataset()
    header = ct.header()
    copy_patient_study(header, ds)
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = description[:64]
    ds.OperatorsName = ""
    # Frame of Reference module (the CT's): top level since the RT Structure Set IOD includes the module.
    ds.FrameOfReferenceUID = ct.frame_of_reference_uid
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "") or ""
    ds.Manufacturer = _PROGRAM
    ds.ManufacturerModelName = (algorithm.name if algorithm else "separeg")[:64]
    ds.SoftwareVersions = (algorithm.version if algorithm else __version__)[:64]
    ds.StructureSetLabel = {"AUTOMATIC": "SepaReg auto", "SEMIAUTOMATIC": "SepaReg edited"}.get(kind, "SepaReg export")
    ds.StructureSetName = description[:64]
    ds.StructureSetDescription = f"{author + '. ' if author else ''}Contours: {HOLE_NOTES[holes]}."[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"
    images = Sequence([pydicom.Dataset() for _ in ct.sop_instance_uids])
    for item, uid in zip(images, ct.sop_instance_uids, strict=True):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ct.sop_class_uid, uid
    series = pydicom.Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = ct.series_instance_uid, images
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_SOP_CLASS, ct.study_instance_uid
    study.RTReferencedSeriesSequence = [series]
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = ct.frame_of_reference_uid, [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    structure_set, roi_contours, observations = Sequence(), Sequence(), Sequence()
    for number, roi in enumerate(rois, start=1):
        item = pydicom.Dataset()
        item.ROINumber, item.ReferencedFrameOfReferenceUID = number, ct.frame_of_reference_uid
        item.ROIName = roi.name[:64]
        item.ROIGenerationAlgorithm = kind
        if algorithm is not None:
            item.ROIGenerationDescription = f"{_PROGRAM} {algorithm.name} {algorithm.version}"[:64]
        structure_set.append(item)
        contour = pydicom.Dataset()
        contour.ROIDisplayColor = [int(c) for c in roi.color]
        contour.ReferencedROINumber = number
        roi_contours.append(contour)
        observation = pydicom.Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        if author:
            observation.ROIObservationLabel = f"{_PROGRAM} {'auto' if kind == 'AUTOMATIC' else 'edited'}"
            observation.ROIObservationDescription = author
        observation.RTROIInterpretedType = roi.interpreted_type
        observation.ROIInterpreter = ""  # Type 2: a person's name; none for a program's output
        observations.append(observation)
    ds.StructureSetROISequence = structure_set
    ds.ROIContourSequence = roi_contours
    ds.RTROIObservationsSequence = observations

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ensure_character_set(ds)  # before the contours: it reads every element, which would decode their raw data
    for roi, contour in zip(rois, roi_contours, strict=True):
        contour.ContourSequence = _contour_items(roi, matrix, origin, ct, holes)
    if not rois:
        log.warning("%s lists no structure: the label map or masks are empty", path)
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.info("wrote %d ROIs to %s", len(rois), path)
    return path


def _contour_items(roi: _RoiOut, matrix: np.ndarray, origin: np.ndarray, ct: CtSeries, holes: str = "separate"):
    import pydicom
    from pydicom.sequence import Sequence

    items = Sequence()
    z0, y0, x0 = (s.start for s in roi.box)
    for dz, plane in enumerate(roi.crop):
        if not plane.any():
            continue
        k = z0 + dz
        contours = _slice_contours(plane)
        for xy in keyhole(contours) if holes == "keyhole" and len(contours) > 1 else contours:
            index = np.column_stack([xy[:, 0] + x0, xy[:, 1] + y0, np.full(len(xy), k, float)])
            lps = index @ matrix.T + origin
            item = pydicom.Dataset()
            reference = pydicom.Dataset()
            reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = \
                ct.sop_class_uid, ct.sop_instance_uids[k]
            item.ContourImageSequence = [reference]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(lps)
            item.ContourNumber = len(items) + 1
            item[0x30060050] = _contour_data(lps.ravel())  # ContourData
            items.append(item)
    return items


# ----------------------------------------------------------------------------------------------- synonyms


def _normalise(name: str) -> str:
    """See :func:`separeg.rt.labels.normalise_name` (every script kept); a name of punctuation alone stays itself."""
    return normalise_name(name) or str(name)


def load_synonyms(path: str | Path) -> dict[str, str]:
    """Read a user synonym table: JSON ``{"their name": "TG263name", ...}`` or CSV with two columns (their name,
    TG-263 or label name; an optional header such as ``name,tg263``; ``#`` comment lines).

    Returns:
        their name -> target name (TG-263 spelling when the target is a registry name).

    Raises:
        InputError: missing or unreadable file, malformed content, a name mapped to two different targets.
    """
    path = Path(path)
    text = read_text_table(path, "synonym table")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"synonym table {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise InputError(f"synonym table {path} must be a JSON object {{\"their name\": \"TG263name\", ...}}")
        rows = list(data.items())
    else:
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        delimiter = max(",;\t", key=lines[0].count) if lines else ","
        rows = []
        for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
            if len(row) != 2:
                raise InputError(f"synonym table {path}: row {number} has {len(row)} fields; each row is "
                                 "'their name,TG263name'")
            if number == 1 and _normalise(row[1]) in {"tg263", "tg263name", "target", "label", "to", "organ"}:
                continue
            rows.append((row[0], row[1]))
    synonyms: dict[str, str] = {}
    for theirs, target in rows:
        theirs, target = theirs.strip(), target.strip()
        if not theirs or not target:
            raise InputError(f"synonym table {path}: an entry has an empty name ({theirs!r} -> {target!r})")
        target = to_tg263(target) or target
        if not normalise_name(theirs):
            raise InputError(f"synonym table {path}: the name {theirs!r} has no letter or digit; names are matched "
                             "ignoring case, spaces and punctuation, so it would match nothing")
        same = next((k for k in synonyms if _normalise(k) == _normalise(theirs)), theirs)
        if synonyms.setdefault(same, target) != target:
            also = f" ({same!r} and {theirs!r} are the same name ignoring case and punctuation)" if same != theirs \
                else ""
            raise InputError(f"synonym table {path} maps {theirs!r} to both {synonyms[same]!r} and {target!r}{also}")
    return synonyms


# ----------------------------------------------------------------------------------------------- DICOM cases


@dataclass(frozen=True)
class DicomCase:
    """A CT series and the RTSTRUCT drawn on it, found by :func:`find_dicom_cases`."""

    name: str
    ct_folder: Path
    series_uid: str
    rtstruct: Path
    files: tuple[Path, ...] = field(default=(), compare=False, repr=False)


def find_dicom_cases(files: Iterable[Path]) -> tuple[list[DicomCase], list[Path]]:
    """Pair image series with the RTSTRUCTs that reference them (by SeriesInstanceUID).

    Args:
        files: candidate files (non-DICOM files are ignored).

    Returns:
        ``(cases, unpaired)``: cases named by PatientID (with the series folder's name when a patient has several),
        sorted by name; unpaired: folders of image series without an RTSTRUCT and RTSTRUCTs whose series is absent.

    Raises:
        InputError: an image series referenced by two RTSTRUCT files (keep one).
    """
    import pydicom

    series, _ = index_dicom_files(files)
    images = {uid: s for uid, s in series.items() if s.modality in IMAGE_MODALITIES}
    structures: dict[str, list[Path]] = {}
    unpaired: list[Path] = []
    for entry in series.values():
        if entry.modality != "RTSTRUCT":
            continue
        for path in entry.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ReferencedFrameOfReferenceSequence"])
            targets = [uid for uid in _referenced_series(ds) if uid in images]
            if not targets:
                unpaired.append(path)
            for uid in targets:
                structures.setdefault(uid, []).append(path)
    found = []
    for uid, image in images.items():
        if uid not in structures:
            unpaired.append(image.folder)
            continue
        if len(structures[uid]) > 1:
            raise InputError(f"the image series {uid} in {image.folder} has {len(structures[uid])} RTSTRUCTs: "
                             f"{', '.join(str(p) for p in structures[uid])}; keep one (move the others out)")
        header = pydicom.dcmread(image.files[0], stop_before_pixels=True, specific_tags=["PatientID"])
        found.append((str(header.get("PatientID", "") or image.folder.name), image, structures[uid][0]))
    counts: dict[str, int] = {}
    for patient, _, _ in found:
        counts[patient] = counts.get(patient, 0) + 1
    cases = [DicomCase(patient if counts[patient] == 1 else f"{patient}_{image.folder.name}", image.folder,
                       image.series_uid, rtstruct, tuple(image.files)) for patient, image, rtstruct in found]
    return sorted(cases, key=lambda c: c.name), sorted(unpaired)


def load_dicom_case(ct_folder: str | Path, rtstruct: str | Path, table: LabelTable, *, series_uid: str | None = None,
                    synonyms: Mapping[str, str] | None = None):
    """Read a CT series and rasterise its RTSTRUCT into ``table``'s label map.

    Returns:
        ``(image, labelmap, annotated, unmatched)``: the SimpleITK image, the ``(z, y, x)`` label map on its grid,
        the label values an ROI was found for (the others were not contoured: not annotated), and the ROI names
        that matched no label.

    Raises:
        InputError, SeriesError: from :func:`~separeg.io.dicom_ct.read_ct_series` and :func:`read_rtstruct`.
    """
    ct = read_ct_series(ct_folder, series_uid=series_uid)
    match = read_rtstruct(rtstruct, ct).match(table, synonyms=synonyms)
    return ct.image(), match.labelmap, frozenset(match.matched), match.unmatched
