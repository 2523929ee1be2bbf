"""Read and write image volumes: NIfTI, NRRD, MHA files and DICOM series, geometry kept.

SimpleITK and pydicom are imported lazily so that array-only code (GPU benchmarks, training on a
cache) runs where they are not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path
from .errors import SeriesError, VolumeReadError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "VOLUME_SUFFIXES",
    "MIN_SLICES",
    "Geometry",
    "DicomSeries",
    "is_volume_file",
    "read_volume",
    "read_dicom_series",
    "index_dicom_files",
    "write_volume",
    "content_hash",
    "check_volume",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Fewer slices than this is a 2D image or a scout, not a volume to pretrain or contour on.
MIN_SLICES = 3
# Relative tolerance on the gap between consecutive DICOM slices before the series is refused.
SLICE_GAP_TOLERANCE = 0.01
IMAGE_MODALITIES = ("CT", "MR", "PT")


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


@dataclass(frozen=True)
class Geometry:
    """Physical grid of a volume in SimpleITK (LPS) convention; ``size`` and ``spacing`` are x, y, z."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.size)
        spacing = "x".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.2f}" for o in self.origin)
        direction = ", ".join(f"{d:.3g}" for d in self.direction)
        return f"size {size}, spacing {spacing} mm, origin ({origin}), direction ({direction})"

    def matches(self, other: Geometry, *, tol_mm: float = 1e-3) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )


def is_volume_file(path: str | Path) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def check_volume(image: sitk.Image, source: str | Path, *, min_slices: int = MIN_SLICES) -> None:
    """Refuse images that are not scalar 3D volumes with at least ``min_slices`` slices.

    Raises:
        VolumeReadError: with what was found and what is expected.
    """
    if image.GetDimension() != 3:
        raise VolumeReadError(f"{source} is a {image.GetDimension()}D image; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); "
            "a single-channel intensity volume is needed"
        )
    slices = image.GetSize()[2]
    if slices < min_slices:
        raise VolumeReadError(
            f"{source} has {slices} slice(s) ({'x'.join(map(str, image.GetSize()))} voxels); at least {min_slices} "
            "axial slices are needed. Is this a scout, a single slice or a 2D export of the scan?"
        )


def read_volume(path: str | Path, *, series_uid: str | None = None, min_slices: int = MIN_SLICES) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a folder holding one DICOM series.

    Args:
        path: a volume file, or a folder of DICOM files (searched recursively).
        series_uid: which series to read when the folder holds several.
        min_slices: refuse volumes with fewer axial slices.

    Returns:
        The volume (intensities as stored, rescaled to HU for CT DICOM), geometry in LPS.

    Raises:
        VolumeReadError: missing, unreadable or unsupported input.
        SeriesError: a DICOM folder with no usable series, or several and no ``series_uid``.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path} does not exist")
    if path.is_dir():
        image = read_dicom_series(path, series_uid=series_uid)
    elif is_volume_file(path):
        sitk = _sitk()
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise VolumeReadError(f"{path} could not be read (truncated or corrupt file?): {_first_line(exc)}") from exc
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
    elif _looks_like_dicom(path):
        raise VolumeReadError(f"{path} is a single DICOM file; give the folder that holds the whole series")
    else:
        raise VolumeReadError(
            f"{path} is not a supported volume; use NIfTI, NRRD or MHA ({', '.join(VOLUME_SUFFIXES)}) "
            "or a folder with a DICOM series"
        )
    check_volume(image, path, min_slices=min_slices)
    return image


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file shorter than its header promises.

    ITK fills the missing voxels of a truncated NIfTI with zeros and reports no error; NRRD and MHA
    readers do raise.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            length = len(header)
            while chunk := f.read(1 << 22):
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise VolumeReadError(f"{path} is truncated or corrupt ({exc}); copy or export the file again") from exc
    for order in "<>":
        sizeof_hdr = struct.unpack(order + "i", header[:4])[0]
        if sizeof_hdr == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540:  # NIfTI-2
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise VolumeReadError(f"{path} has no valid NIfTI header")
    expected = offset + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    if length < expected:
        raise VolumeReadError(f"{path} is truncated: {length} of {expected} bytes; copy or export the file again")


def write_volume(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: to a temporary file beside ``path``, then rename, so no half-written file remains."""
    sitk = _sitk()
    path = Path(path)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def content_hash(image: sitk.Image) -> str:
    """SHA-256 of pixel type, geometry and voxel values: the same scan gives the same hash under any file name."""
    sitk = _sitk()
    digest = hashlib.sha256()
    geometry = Geometry.of(image)
    digest.update(repr((image.GetPixelIDTypeAsString(), geometry.size, np.round(geometry.spacing, 6).tolist(),
                        np.round(geometry.origin, 4).tolist(), np.round(geometry.direction, 6).tolist())).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- DICOM


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
        entry.files.append(path)
        if entry.modality in ("RTSTRUCT", "SEG"):
            entry.referenced_series_uids |= _referenced_series(ds)
            if entry.frame_of_reference_uid is None:
                for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
                    entry.frame_of_reference_uid = str(ref_for.get("FrameOfReferenceUID", "")) or None
    return series, problems


def _sorted_slices(series: DicomSeries) -> list[Path]:
    """Files ordered along the slice normal; refuses missing geometry, duplicate or unevenly spaced slices."""
    pydicom = _pydicom()
    positions: list[tuple[float, Path]] = []
    normal = None
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
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
        positions.append((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))), path))
    positions.sort(key=lambda p: p[0])
    z = np.array([p[0] for p in positions])
    if len(z) > 1:
        gaps = np.diff(z)
        if np.any(gaps < 1e-3):
            dup = positions[int(np.argmin(gaps)) + 1][1]
            raise SeriesError(f"series {series.series_uid} has two slices at the same position (e.g. {dup.name}); "
                              "remove duplicate files")
        if gaps.max() - gaps.min() > SLICE_GAP_TOLERANCE * np.median(gaps) + 1e-3:
            raise SeriesError(
                f"series {series.series_uid} has uneven slice gaps ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                "slices are missing or the series mixes scans. Export the complete series again."
            )
    return [p[1] for p in positions]


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
        elif not images:
            detail = ""
            if problems:
                detail = f" ({len(problems)} damaged DICOM files, e.g. {problems[0][0].name}: {problems[0][1]})"
            other = f"; it holds only {_list_series(found.values())}" if found else ""
            raise SeriesError(f"{folder} holds no CT, MR or PET image series{other}{detail}")
        else:
            raise SeriesError(
                f"{folder} mixes {len(images)} image series: {_list_series(images.values())}. "
                "Move each series to its own folder or choose one by its SeriesInstanceUID."
            )
    if series.modality not in IMAGE_MODALITIES:
        modality = series.modality or "of unknown modality"
        raise SeriesError(f"series {series.series_uid} is {modality}, not an image series")
    files = _sorted_slices(series)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(
            f"series {series.series_uid} in {series.folder} could not be read (missing pixel data or a corrupt "
            f"file?): {_first_line(exc)}"
        ) from exc


def _list_series(series: Iterable[DicomSeries]) -> str:
    return "; ".join(f"{s.modality or '?'} {s.series_uid} ({len(s.files)} files)" for s in series)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK puts the useful sentence last ("... ITK ERROR: ... Reason"), pydicom first.
    return (lines[-1] if lines and "itk" in str(exc).lower() else lines[0] if lines else type(exc).__name__)[:300]
