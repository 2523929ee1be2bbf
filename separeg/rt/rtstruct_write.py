"""RTSTRUCT writing: a label map or named masks -> an RTSTRUCT referencing its CT series, one ROI per organ, holes
separate (even-odd) or joined by keyhole cuts, TG-263 names and the RT ROI Interpreted Type.

Export writes, per slice, the boundaries :func:`skimage.measure.find_contours` finds at level 0.5 on the zero-padded
mask: vertices halfway between an inside and an outside voxel centre, so no voxel centre lies on an edge and
re-importing gives back exactly the mask. Holes are written as separate contours (read back by the XOR rule), or
with ``holes="keyhole"`` joined to the boundary around them by zero-width cuts, which readers that OR contours
(plastimatch, several planning systems) also read right (:mod:`separeg.rt.keyhole`). The convention is recorded
in the RTSTRUCT (StructureSetDescription) and in ``export.json``.

The generation type (ROI Generation Algorithm) is AUTOMATIC with a model, MANUAL without one
(:func:`~separeg.io.dicom_ct.generation_type`); only automatic contours carry the "not reviewed" notice.
Colinear points are dropped (exact).
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from separeg import __version__
from separeg.io.dicom_ct import (
    Algorithm,
    CtSeries,
    copy_patient_study,
    ensure_character_set,
    generation_type,
)
from separeg.rt.keyhole import HOLE_CONVENTIONS, keyhole
from separeg.rt.labels import LabelTable
from separeg.rt.organs import RGB, default_color, to_tg263
from separeg.rt.rtstruct import RTSTRUCT_SOP_CLASS, _normalise
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import InputError

__all__ = ["write_rtstruct", "write_rtstruct_masks", "interpreted_type"]

log = logging.getLogger(__name__)

# What the RT Referenced Study item names as the study's SOP class (Detached Study Management; what TPSs write).
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

_TARGET = re.compile(r"^(gtv|ctv|itv|ptv)", re.IGNORECASE)

_EXTERNAL = {"external", "body", "skin", "outline", "bodycontour"}

_PROGRAM = "SepaReg"

RTSTRUCT_SERIES_NUMBER = 302  # beside the SEG's 301

HOLE_NOTES = {
    "separate": "holes are separate CLOSED_PLANAR contours: combine a slice's contours by the even-odd rule",
    "keyhole": "holes are joined to their outer contour by zero-width keyhole cuts",
}


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
