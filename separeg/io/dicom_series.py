"""DICOM series reading: index the DICOM files of a folder by series (modality, referenced series, problems), pick
the usable image series, sort their slices (gaps, tilt) and read one series into a volume in LPS (HU for CT).
The lazy SimpleITK/pydicom imports live here too; :mod:`separeg.io.volumes` reads files and calls this for
folders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg.runtime.errors import SeriesError, VolumeReadError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["MIN_SLICES", "DicomSeries", "read_dicom_series", "index_dicom_files", "usable_image_series",
           "MODALITY_TAG"]

log = logging.getLogger(__name__)

# Fewer slices than this is a 2D image or a scout, not a volume to pretrain or contour on.
MIN_SLICES = 3

# Relative tolerance on the gap between consecutive DICOM slices before the series is refused.
SLICE_GAP_TOLERANCE = 0.01

IMAGE_MODALITIES = ("CT", "MR", "PT")

#: Metadata key of the DICOM Modality that :func:`read_dicom_series` sets on the image it returns.
MODALITY_TAG = "0008|0060"

# Slices stacked this far off their normal are a gantry tilt (sheared grid); DICOM rounding stays far below it.
MAX_TILT_DEGREES = 0.5

_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise VolumeReadError("SimpleITK is needed to read volumes: pip install 'SimpleITK>=2.3'") from exc
    # ITK prints warnings (unsupported metadata, ...) straight to stderr; errors still raise.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise VolumeReadError("pydicom is needed to read DICOM: pip install 'pydicom>=2.4'") from exc
    return pydicom


@dataclass
class DicomSeries:
    """The files of one DICOM series and what the scan needs to know about them."""

    series_uid: str
    modality: str
    files: list[Path] = field(default_factory=list)
    frame_of_reference_uid: str | None = None
    study_uid: str | None = None
    description: str = ""
    referenced_series_uids: set[str] = field(default_factory=set)  # RTSTRUCT / SEG: the image series they annotate
    localizer: bool = False  # ImageType says LOCALIZER (a topogram or scout view)

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(f.parent) for f in self.files])) if self.files else Path()


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _referenced_series(ds) -> set[str]:
    """Series UIDs an RTSTRUCT (via its referenced frame of reference) or a SEG refers to."""
    uids: set[str] = set()
    for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref_for.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    uids.add(str(series.SeriesInstanceUID))
    for series in ds.get("ReferencedSeriesSequence", []):
        if "SeriesInstanceUID" in series:
            uids.add(str(series.SeriesInstanceUID))
    return uids


def index_dicom_files(paths: Iterable[Path]) -> tuple[dict[str, DicomSeries], list[tuple[Path, str]]]:
    """Group DICOM files by SeriesInstanceUID, reading headers only.

    Returns:
        ``(series by UID, problems)``; problems are ``(path, reason)`` for files that carry a DICOM
        preamble but cannot be parsed or lack a series UID. Files that are not DICOM are ignored here.
    """
    pydicom = _pydicom()
    series: dict[str, DicomSeries] = {}
    problems: list[tuple[Path, str]] = []
    for path in paths:
        if not _looks_like_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for damaged files; each becomes a reported problem
            problems.append((path, f"unreadable DICOM header: {_first_line(exc)}"))
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            problems.append((path, "DICOM file without SeriesInstanceUID"))
            continue
        entry = series.get(uid)
        if entry is None:
            entry = series[uid] = DicomSeries(
                series_uid=uid,
                modality=str(ds.get("Modality", "")),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
                study_uid=str(ds.get("StudyInstanceUID", "")) or None,
                description=str(ds.get("SeriesDescription", "")),
            )
        image_type = ds.get("ImageType", "") or ""
        if "LOCALIZER" in [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]:
            entry.localizer = True
        entry.files.append(path)
        if entry.modality in ("RTSTRUCT", "SEG"):
            entry.referenced_series_uids |= _referenced_series(ds)
            if entry.frame_of_reference_uid is None:
                for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
                    entry.frame_of_reference_uid = str(ref_for.get("FrameOfReferenceUID", "")) or None
    return series, problems


def usable_image_series(images: Iterable[DicomSeries]) -> tuple[list[DicomSeries], list[str]]:
    """Split image series into those a volume can be read from and the others, each with why it is not usable.

    Not usable: a localizer (topogram, scout: ImageType LOCALIZER) and a series of fewer than :data:`MIN_SLICES`
    files (a single projection or a screenshot), which a normal PACS export puts beside the CT.
    """
    usable, ignored = [], []
    for series in images:
        if series.localizer:
            ignored.append(f"{series.modality} {series.series_uid} ({len(series.files)} files): a localizer "
                           "(topogram or scout view)")
        elif len(series.files) < MIN_SLICES:
            ignored.append(f"{series.modality} {series.series_uid}: {len(series.files)} slice(s), too few for a "
                           f"volume (at least {MIN_SLICES})")
        else:
            usable.append(series)
    return usable, ignored


def _sorted_slices(series: DicomSeries) -> list[Path]:
    """Files ordered along the slice normal; refuses missing geometry, duplicate or unevenly spaced slices."""
    pydicom = _pydicom()
    positions: list[tuple[float, Path]] = []
    corners: dict[Path, np.ndarray] = {}
    instances: dict[str, list[Path]] = {}
    normal = None
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.setdefault(str(ds.get("SOPInstanceUID", "")), []).append(path)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise SeriesError(f"{path} has no ImagePositionPatient/ImageOrientationPatient; the slice cannot be placed")
        if "Rows" not in ds:
            raise SeriesError(f"{path} has no image (no Rows/PixelData); is it a DICOM image file?")
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        this_normal = np.cross(row, col)
        if normal is None:
            normal = this_normal
        elif not np.allclose(normal, this_normal, atol=1e-3):
            raise SeriesError(f"series {series.series_uid} mixes slice orientations (e.g. {path.name}); "
                              "split it into separate series")
        corners[path] = np.asarray(ds.ImagePositionPatient, float)
        positions.append((float(np.dot(normal, corners[path])), path))
    _check_instance_uids(series, instances)
    positions.sort(key=lambda p: p[0])
    z = np.array([p[0] for p in positions])
    if len(z) > 1:
        gaps = np.diff(z)
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            raise SeriesError(f"series {series.series_uid} has two slices at the same position, {z[i]:.2f} mm: "
                              f"{positions[i][1]} and {positions[i + 1][1]}. A structure set could not say which one "
                              "it is drawn on; remove the duplicate file (or put each series in its own folder)")
        if gaps.max() - gaps.min() > SLICE_GAP_TOLERANCE * np.median(gaps) + 1e-3:
            raise SeriesError(
                f"series {series.series_uid} has uneven slice gaps ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                "slices are missing or the series mixes scans. Export the complete series again."
            )
        _check_tilt(series, corners[positions[-1][1]] - corners[positions[0][1]], normal)
    return [p[1] for p in positions]


def _check_instance_uids(series: DicomSeries, instances: dict[str, list[Path]]) -> None:
    """Refuse slices without a SOP Instance UID or sharing one: RTSTRUCT and SEG reference slices by this UID, so a
    shared one makes their contours ambiguous (a copied-and-edited file, a broken anonymiser)."""
    if "" in instances:
        raise SeriesError(f"series {series.series_uid}: {instances[''][0]} has no SOPInstanceUID, so structures "
                          "cannot reference it; export the series again from the scanner or PACS")
    shared = {uid: paths for uid, paths in instances.items() if len(paths) > 1}
    if shared:
        listed = "; ".join(f"{', '.join(str(p) for p in paths)} share {uid}" for uid, paths in
                           list(shared.items())[:3]) + (f"; and {len(shared) - 3} more" if len(shared) > 3 else "")
        raise SeriesError(f"series {series.series_uid} has slices with the same SOPInstanceUID ({listed}). A "
                          "structure set would reference two slices by one UID; remove the duplicate files or export "
                          "the series again (an anonymiser must give every slice its own UID)")


def _check_tilt(series: DicomSeries, step: np.ndarray, normal: np.ndarray) -> None:
    """Refuse slices stacked off their normal (gantry tilt): ITK would place them on a grid that is not the scan's."""
    along = float(np.dot(step, normal))
    across = float(np.linalg.norm(step - along * normal))
    tilt = float(np.degrees(np.arctan2(across, abs(along))))
    if tilt > MAX_TILT_DEGREES:
        raise SeriesError(
            f"series {series.series_uid} was acquired with a gantry tilt: its slices are stacked {tilt:.1f} degrees "
            "off their normal (a sheared grid), which SepaReg does not resample. Resample it onto a regular grid "
            "first (3D Slicer's DICOM module does this with 'Acquisition geometry regularization') or export an "
            "untilted reconstruction from the scanner"
        )


def read_dicom_series(source: str | Path | DicomSeries, *, series_uid: str | None = None) -> sitk.Image:
    """Read one image series from a folder (recursively) or from an indexed :class:`DicomSeries`."""
    if isinstance(source, DicomSeries):
        series = source
    else:
        folder = Path(source)
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        found, problems = index_dicom_files(files)
        images = {uid: s for uid, s in found.items() if s.modality in IMAGE_MODALITIES}
        if series_uid is not None:
            if series_uid not in found:
                raise SeriesError(f"{folder} holds no series {series_uid}; found: {_list_series(found.values())}")
            series = found[series_uid]
        elif len(images) == 1:
            series = next(iter(images.values()))
        elif len(usable := usable_image_series(images.values())[0]) == 1:
            series = usable[0]
            log.warning("%s: using the %s series %s; ignored: %s", folder, series.modality, series.series_uid,
                        "; ".join(usable_image_series(images.values())[1]))
        elif not files:
            raise SeriesError(f"{folder} is empty; give the folder that holds the DICOM series, or a volume file")
        elif not images:
            detail = ""
            if problems:
                detail = (f" ({len(problems)} damaged DICOM files, e.g. {problems[0][0].name}: {problems[0][1]}; copy "
                          "or export the series again)")
            other = f"; it holds only {_list_series(found.values())}" if found else ""
            raise SeriesError(f"{folder} holds no CT, MR or PET image series{other}{detail}")
        else:
            raise SeriesError(
                f"{folder} mixes {len(images)} image series: {_list_series(images.values())}. "
                "Move each series to its own folder or choose one by its SeriesInstanceUID "
                "(separeg contour and export: --series-uid)."
            )
    if series.modality not in IMAGE_MODALITIES:
        modality = series.modality or "of unknown modality"
        raise SeriesError(f"series {series.series_uid} is {modality}, not an image series")
    files = _sorted_slices(series)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(unreadable_series(series.series_uid, series.folder, files, exc)) from exc
    if series.modality:  # what the series says it is, for input checks (contour warns of an MR given to a CT model)
        image.SetMetaData(MODALITY_TAG, series.modality)
    return image


def unreadable_series(series_uid: str, folder: Path, files: Iterable[Path], exc: BaseException) -> str:
    """The message for a series whose pixels ITK could not read, naming the first damaged slice found."""
    damaged = next((why for why in map(_slice_damage, files) if why), None)
    if damaged:
        return (f"series {series_uid} in {folder} could not be read: {damaged}. Replace that file with a good copy "
                "or export the series again")
    return (f"series {series_uid} in {folder} could not be read (missing pixel data or a corrupt file?): "
            f"{_first_line(exc)}; export the series again")


def _slice_damage(path: Path) -> str | None:
    """What is wrong with one DICOM slice's pixel data, or None when it looks whole."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for damaged files
        return f"{path.name} is truncated or corrupt ({_first_line(exc)})"
    if "PixelData" not in ds:
        return f"{path.name} has no pixel data (Pixel Data element missing)"
    if ds.file_meta.get("TransferSyntaxUID") in _UNCOMPRESSED:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * \
            int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1)
        if len(ds.PixelData) < expected:
            return f"{path.name} is truncated: {len(ds.PixelData)} of {expected} bytes of pixel data"
    return None


def _list_series(series: Iterable[DicomSeries]) -> str:
    return "; ".join(f"{s.modality or '?'} {s.series_uid} ({len(s.files)} files)" for s in series)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK puts the useful sentence last ("... ITK ERROR: ... Reason"), pydicom first.
    return (lines[-1] if lines and "itk" in str(exc).lower() else lines[0] if lines else type(exc).__name__)[:300]
