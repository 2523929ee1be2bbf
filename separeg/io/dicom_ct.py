"""A CT DICOM series as the thing derived objects (RTSTRUCT, DICOM SEG) reference.

:func:`read_ct_series` indexes and sorts a series with :mod:`separeg.io.volumes` (the same sorter SimpleITK's reads go
through) and keeps what a derived object must copy or reference: the SOP Instance UID of every slice in array order,
the series, study and Frame of Reference UIDs, and the patient/study attributes (:data:`PATIENT_STUDY_KEYWORDS`,
:func:`copy_patient_study`). Pixel data are read only on request (:meth:`CtSeries.datasets`, :meth:`CtSeries.image`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg.io.dicom_series import (
    IMAGE_MODALITIES,
    DicomSeries,
    _first_line,
    _list_series,
    _sorted_slices,
    index_dicom_files,
    unreadable_series,
    usable_image_series,
)
from separeg.io.volumes import Geometry
from separeg.runtime.errors import InputError, SeriesError, VolumeReadError

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

__all__ = [
    "Algorithm",
    "CtSeries",
    "PATIENT_STUDY_KEYWORDS",
    "TYPE2_PATIENT_STUDY_KEYWORDS",
    "read_ct_series",
    "copy_patient_study",
    "GENERATIONS",
    "generation_type",
    "DEIDENTIFICATION_NOT_RECORDED",
]

log = logging.getLogger(__name__)

#: Patient and General Study module attributes (plus de-identification flags) that every object derived from a CT
#: (RTSTRUCT, SEG) carries unchanged, so that a TPS or PACS files it under the same patient and study.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)
#: The Type 2 attributes among them: written empty when the CT lacks them (a derived object must have them).
TYPE2_PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)
#: What derived objects say of a de-identification the source CT declared (PatientIdentityRemoved YES) without a method.
DEIDENTIFICATION_NOT_RECORDED = "Not recorded in the source images"
# Gaps between consecutive slices larger than this many median gaps are reported as missing slices.
_GAP_REPORT_FACTOR = 1.5


@dataclass(frozen=True)
class Algorithm:
    """The model that made a contour; written into RTSTRUCT and SEG objects.

    Attributes:
        name: model or bundle name.
        version: the separeg version.
        bundle_hash: sha256 of the model bundle ("" when unknown).
    """

    name: str
    version: str
    bundle_hash: str = ""

    def describe(self) -> str:
        """``"<name> <version>"`` and, when known, ``" (bundle sha256 <hash>)"``."""
        text = f"{self.name} {self.version}".strip()
        return f"{text} (bundle sha256 {self.bundle_hash})" if self.bundle_hash else text


#: How contours were made (RTSTRUCT ROI Generation Algorithm, SEG Segment Algorithm Type): the defined terms.
GENERATIONS: tuple[str, ...] = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


def generation_type(algorithm: Algorithm | None, generation: str | None = None) -> str:
    """The generation type written for contours made by ``algorithm`` (None: no model behind them).

    Default: AUTOMATIC with a model, MANUAL without one (a clinical RTSTRUCT imported and exported again is not AI
    output). SEMIAUTOMATIC (a model's contours edited by a person) and AUTOMATIC name the model, so they need one.

    Raises:
        InputError: an unknown type, or AUTOMATIC/SEMIAUTOMATIC without a model.
    """
    kind = (generation or ("AUTOMATIC" if algorithm is not None else "MANUAL")).upper()
    if kind not in GENERATIONS:
        raise InputError(f"unknown contour generation type {generation!r}; choose from "
                         f"{', '.join(g.lower() for g in GENERATIONS)}")
    if kind != "MANUAL" and algorithm is None:
        raise InputError(f"{kind.lower()} contours need the model that made them (the segmentation.json that "
                         "`separeg contour` writes beside the label map names it); contours without a model are "
                         "manual")
    return kind


@dataclass(frozen=True)
class CtSeries:
    """One image series, sorted as SimpleITK reads it.

    Attributes:
        folder: the folder holding the series' files (their common parent).
        files: one per slice, in the order of axis 0 of ``sitk.GetArrayFromImage`` of the series.
        sop_instance_uids: the slices' SOP Instance UIDs, same order.
        sop_class_uid: the slices' SOP Class UID (CT Image Storage for CT).
        series_instance_uid, study_instance_uid, frame_of_reference_uid: the series' UIDs.
        geometry: the grid SimpleITK reads (size and spacing x, y, z; LPS origin and direction), computed from the
            headers as ITK does: origin of the first slice, slice spacing and third direction column from the first
            and last slice positions.
        modality: CT, MR or PT.
    """

    folder: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    geometry: Geometry
    modality: str = "CT"

    def header(self) -> pydicom.Dataset:
        """The first slice's header (read without pixel data)."""
        import pydicom

        return pydicom.dcmread(self.files[0], stop_before_pixels=True)

    def datasets(self) -> list[pydicom.Dataset]:
        """All slices with pixel data, in array order (highdicom's SEG constructor needs them)."""
        import pydicom

        return [pydicom.dcmread(f) for f in self.files]

    def image(self) -> sitk.Image:
        """The volume as SimpleITK reads it (HU for CT), on :attr:`geometry`.

        Raises:
            VolumeReadError: pixel data missing or corrupt.
        """
        import SimpleITK as sitk

        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in self.files])
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise VolumeReadError(unreadable_series(self.series_instance_uid, self.folder, self.files, exc)) from exc

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)``: the shape of the series' array and of every mask aligned with it."""
        x, y, z = self.geometry.size
        return z, y, x

    def index_to_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix, origin)`` with ``lps = matrix @ (i, j, k) + origin`` for continuous voxel indices (x, y, z)."""
        direction = np.asarray(self.geometry.direction, float).reshape(3, 3)
        return direction * np.asarray(self.geometry.spacing, float), np.asarray(self.geometry.origin, float)


def read_ct_series(source: str | Path | DicomSeries, *, series_uid: str | None = None) -> CtSeries:
    """Index, sort and check one CT (or MR/PET) series, reading headers only.

    Args:
        source: a folder (searched recursively) or an indexed :class:`~separeg.io.dicom_series.DicomSeries`.
        series_uid: which series to use when the folder holds several image series.

    Returns:
        The series, its slices in SimpleITK's array order.

    Raises:
        InputError: ``source`` does not exist or is a file.
        SeriesError: no image series; several and no ``series_uid`` (all are listed); ``series_uid`` not found;
            the series is not an image series; a slice is missing or the slices are unevenly spaced (the gap is
            located); duplicate slices; mixed or missing Frame of Reference; slices without position.
    """
    import pydicom

    if isinstance(source, DicomSeries):
        series = source
    else:
        series = _choose_series(Path(source), series_uid)
    if series.modality not in IMAGE_MODALITIES:
        raise SeriesError(f"series {series.series_uid} is {series.modality or 'of unknown modality'}, not a CT, MR "
                          "or PET image series; give the image series the structures were drawn on")
    headers = {}
    for path in series.files:
        try:
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise SeriesError(f"{path} (series {series.series_uid}) is unreadable: {_first_line(exc)}") from exc
    _check_frame_of_reference(series, headers)
    try:
        files = _sorted_slices(series)
    except SeriesError as exc:
        where = _locate_gaps(headers) if "uneven slice gaps" in str(exc) else ""
        raise SeriesError(f"{exc}{where}") from exc
    first = headers[files[0]]
    return CtSeries(
        folder=series.folder,
        files=tuple(files),
        sop_instance_uids=tuple(str(headers[f].SOPInstanceUID) for f in files),
        sop_class_uid=str(first.SOPClassUID),
        series_instance_uid=series.series_uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        geometry=_geometry([headers[f] for f in files]),
        modality=series.modality,
    )


def _choose_series(folder: Path, series_uid: str | None) -> DicomSeries:
    if not folder.exists():
        raise InputError(f"{folder} does not exist; give the folder that holds the CT DICOM series")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file; give the folder that holds the whole CT DICOM series")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    if not files:
        raise SeriesError(f"{folder} is empty; give the folder that holds the CT DICOM series")
    found, problems = index_dicom_files(files)
    if series_uid is not None:
        if series_uid not in found:
            listed = _list_series(found.values()) or "no DICOM series"
            raise SeriesError(f"{folder} holds no series {series_uid}; found: {listed}")
        return found[series_uid]
    images = [s for s in found.values() if s.modality in IMAGE_MODALITIES]
    if len(images) == 1:
        return images[0]
    if not images:
        other = f"; it holds only {_list_series(found.values())}" if found else ""
        damaged = f" ({len(problems)} damaged DICOM files, e.g. {problems[0][0].name}: {problems[0][1]})" \
            if problems else ""
        raise SeriesError(f"{folder} holds no CT image series{other}{damaged}. Give the folder of the CT series")
    usable, ignored = usable_image_series(images)
    if len(usable) == 1:  # a PACS export: the CT with a topogram beside it
        log.warning("%s: using the %s series %s; ignored: %s", folder, usable[0].modality, usable[0].series_uid,
                    "; ".join(ignored))
        return usable[0]
    images = usable or images
    cts = [s for s in images if s.modality == "CT"]
    if len(cts) == 1:
        log.info("%s: using the CT series %s (the folder also holds %s)", folder, cts[0].series_uid,
                 _list_series(s for s in images if s is not cts[0]))
        return cts[0]
    raise SeriesError(f"{folder} holds {len(images)} image series: {_list_series(images)}. Move each series to its "
                      "own folder or choose one by its SeriesInstanceUID")


def _check_frame_of_reference(series: DicomSeries, headers: dict[Path, pydicom.Dataset]) -> None:
    uids: dict[str, list[Path]] = {}
    for path, ds in headers.items():
        uids.setdefault(str(ds.get("FrameOfReferenceUID", "")), []).append(path)
    if "" in uids:
        raise SeriesError(f"{uids[''][0]} (series {series.series_uid}) has no FrameOfReferenceUID: structures "
                          "cannot be placed on it. Export the series again from the scanner or PACS")
    if len(uids) > 1:
        listed = "; ".join(f"{uid} ({len(paths)} slices, e.g. {paths[0].name})" for uid, paths in uids.items())
        raise SeriesError(f"series {series.series_uid} mixes {len(uids)} Frames of Reference: {listed}. Its slices "
                          "come from different scans; split them into separate series")


def _locate_gaps(headers: dict[Path, pydicom.Dataset]) -> str:
    """Where a series' slice gaps depart from the median gap (for the error message)."""
    first = next(iter(headers.values()))
    orientation = np.asarray(first.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = sorted((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))), path)
                       for path, ds in headers.items())
    z = np.array([p for p, _ in positions])
    gaps = np.diff(z)
    median = float(np.median(gaps))
    odd = [i for i, gap in enumerate(gaps) if abs(gap - median) > 0.01 * median + 1e-3]
    parts = []
    for i in odd[:5]:
        missing = f", about {round(gaps[i] / median) - 1} slice(s) missing" if gaps[i] > _GAP_REPORT_FACTOR * median \
            else ""
        parts.append(f"{gaps[i]:.4g} mm between {positions[i][1].name} (at {z[i]:.2f} mm) and "
                     f"{positions[i + 1][1].name} (at {z[i + 1]:.2f} mm){missing}")
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    return f". Median gap {median:.4g} mm; gaps: " + "; ".join(parts) + more


def _geometry(headers: list[pydicom.Dataset]) -> Geometry:
    """The grid ITK's series reader builds from sorted slice headers."""
    first, last = headers[0], headers[-1]
    orientation = np.asarray(first.ImageOrientationPatient, float)
    row, col = orientation[:3], orientation[3:]
    origin = np.asarray(first.ImagePositionPatient, float)
    pixel_spacing = [float(v) for v in first.PixelSpacing]
    if len(headers) > 1:
        step = np.asarray(last.ImagePositionPatient, float) - origin
        slice_spacing = float(np.linalg.norm(step)) / (len(headers) - 1)
        normal = step / np.linalg.norm(step)
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)
        normal = np.cross(row, col)
    direction = np.stack([row, col, normal], axis=1)  # columns: the x, y, z axes
    return Geometry(
        size=(int(first.Columns), int(first.Rows), len(headers)),
        spacing=(pixel_spacing[1], pixel_spacing[0], slice_spacing),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def copy_patient_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Copy the patient and study attributes (:data:`PATIENT_STUDY_KEYWORDS`) from a CT header to a derived object.

    Values are copied as they are (deep copies, so sequences are not shared). Type 2 attributes the CT lacks are
    written empty. A CT that declares PatientIdentityRemoved YES without a de-identification method (Type 1C) gives
    DeidentificationMethod :data:`DEIDENTIFICATION_NOT_RECORDED`. The CT's SpecificCharacterSet is copied with
    them, so that names keep their characters; a writer that adds non-ASCII text of its own must make sure the
    character set can hold it (see :func:`ensure_character_set`).
    """
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
            setattr(target, keyword, "")
        elif keyword in target:
            del target[keyword]
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    if str(target.get("PatientIdentityRemoved", "")).upper() == "YES" and \
            "DeidentificationMethod" not in target and "DeidentificationMethodCodeSequence" not in target:
        # Type 1C when the identity is removed; the source declared it without saying how (LUNG1 does).
        target.DeidentificationMethod = DEIDENTIFICATION_NOT_RECORDED


def ensure_character_set(ds: pydicom.Dataset) -> None:
    """Switch ``ds`` to UTF-8 (ISO_IR 192) when a text value cannot be encoded in its SpecificCharacterSet.

    Values are kept as Python strings, so a patient name copied from the CT keeps its characters under either
    character set.
    """
    from pydicom.charset import convert_encodings

    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    charsets = list(charset) if isinstance(charset, list | tuple) or hasattr(charset, "__iter__") and \
        not isinstance(charset, str) else [charset]
    # The default repertoire (no character set, ISO_IR 6) is ASCII; with code extensions (ISO 2022) only ASCII
    # text is kept without checking the escape sequences.
    encoding = "ascii" if len(charsets) != 1 or charsets[0] in ("", "ISO_IR 6") else convert_encodings(charsets)[0]
    for text in _texts(ds):
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            ds.SpecificCharacterSet = "ISO_IR 192"
            return


def _texts(ds: pydicom.Dataset):
    text_vrs = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}
    for elem in ds.iterall():
        if elem.VR in text_vrs and elem.value is not None:
            values = elem.value if elem.VM > 1 else [elem.value]
            for value in values:
                yield str(value)
