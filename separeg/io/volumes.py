"""Read and write image volumes: NIfTI, NRRD, MHA files and DICOM series, geometry kept.

SimpleITK and pydicom are imported lazily so that array-only code (GPU benchmarks, training on a
cache) runs where they are not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import SeriesError, VolumeReadError

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger(__name__)

__all__ = [
    "VOLUME_SUFFIXES",
    "MIN_SLICES",
    "Geometry",
    "DicomSeries",
    "is_volume_file",
    "read_volume",
    "to_canonical",
    "canonical_voxels",
    "CANONICAL_ORIENTATION",
    "read_dicom_series",
    "index_dicom_files",
    "usable_image_series",
    "MODALITY_TAG",
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
#: Metadata key of the DICOM Modality that :func:`read_dicom_series` sets on the image it returns.
MODALITY_TAG = "0008|0060"
# Voxel sizes below this are micro-CT at most: a clinical volume this fine has its spacing in metres, not mm.
MIN_SPACING_MM = 0.01
# No patient is longer than this along any axis (whole-body CT is about 2 m): a larger field of view is a bad header.
MAX_EXTENT_MM = 3000.0
# Slices stacked this far off their normal are a gantry tilt (sheared grid); DICOM rounding stays far below it.
MAX_TILT_DEGREES = 0.5
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
# Unsigned 16-bit voxels at or above this read as -4096..-1 when taken as signed: CT air stored without an offset.
_WRAPPED_FROM = 0xF000


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
    _check_spacing(image, source)
    _check_values(image, source)


def _check_spacing(image: sitk.Image, source: str | Path) -> None:
    """Refuse voxel sizes no patient scan has: a header in the wrong unit, or a broken one."""
    spacing = np.asarray(image.GetSpacing(), float)
    extent = spacing * np.asarray(image.GetSize())
    shown = "x".join(f"{s:.4g}" for s in spacing)
    if not np.all(np.isfinite(spacing)) or spacing.min() < MIN_SPACING_MM:
        raise VolumeReadError(
            f"{source} has voxel spacing {shown} mm, below {MIN_SPACING_MM} mm: the header's spacing is wrong "
            "(in metres rather than millimetres?). Set the true spacing in mm, e.g. in 3D Slicer's Volumes module "
            "or with SimpleITK's SetSpacing, and save the volume again"
        )
    if extent.max() > MAX_EXTENT_MM:
        raise VolumeReadError(
            f"{source} has voxel spacing {shown} mm, so its field of view is "
            f"{'x'.join(f'{e / 1000:.3g}' for e in extent)} m, more than the {MAX_EXTENT_MM / 1000:g} m of any "
            "patient: the header's spacing is wrong (in micrometres rather than millimetres?). Set the true spacing "
            "in mm and save the volume again"
        )


def _check_values(image: sitk.Image, source: str | Path) -> None:
    """Refuse NaN/infinite voxels and CT values stored as unsigned integers without an offset (wrapped around)."""
    sitk = _sitk()
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array.min() + array.max()):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise VolumeReadError(
            f"{source} has {bad} NaN or infinite voxel(s) of {array.size}: the image was not reconstructed or "
            "resampled completely. Fill them (e.g. with -1000 HU, air, for a CT) and save the volume again"
        )
    if array.dtype == np.uint16 and _wrapped_around(array):
        raise VolumeReadError(
            f"{source} stores signed values as unsigned 16-bit integers without an offset: negative HU wrapped "
            f"around (air, -1000 HU, reads as {0x10000 - 1000}). Convert the voxels to signed 16-bit (int16; "
            "with SimpleITK: view the array as int16) and save the volume again"
        )


def _wrapped_around(array: np.ndarray) -> bool:
    """True when uint16 voxels fall in two clusters, 0..0x7FFF and 0xF000..0xFFFF, with nothing between.

    That is int16 data (a CT with air near -1000 HU) written as uint16; an unsigned image (MR, a CT with an
    offset) fills the range continuously or stays below 0x8000.
    """
    high = int(np.count_nonzero(array >= _WRAPPED_FROM))
    if high < 0.01 * array.size:
        return False
    return not np.any((array > 0x7FFF) & (array < _WRAPPED_FROM))


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
            raise VolumeReadError(_unreadable_file(path, exc)) from exc
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


def _unreadable_file(path: Path, exc: BaseException) -> str:
    """Why ITK could not read ``path``: a text file under an image name, or a damaged image."""
    try:
        with path.open("rb") as f:
            start = f.read(512)
    except OSError:
        start = b""
    if start and all(32 <= b < 127 or b in b"\t\r\n" for b in start):
        text = start.decode("ascii").strip().splitlines()[0][:60] if start.strip() else ""
        return (f"{path} could not be read: it holds text, not an image (it starts with {text!r}); an error page "
                "or message saved under an image name? Download or export the volume again")
    if not start:
        return f"{path} could not be read: it is empty (0 bytes); copy or export the volume again"
    return f"{path} could not be read (truncated or corrupt file?): {_first_line(exc)}; copy or export it again"


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file shorter than its header promises, or whose float voxels hold NaN or infinity.

    ITK fills the missing voxels of a truncated NIfTI with zeros and reports no error (NRRD and MHA readers do
    raise), and it reads NaN voxels of a NIfTI as 0: both are only seen in the file's own bytes.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            expected, offset, dtype = _nifti_layout(path, header)
            scan = _NonFiniteCounter(offset, dtype)
            scan.feed(header)
            length = len(header)
            while chunk := f.read(1 << 22):
                length += len(chunk)
                scan.feed(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise VolumeReadError(f"{path} is truncated or corrupt ({exc}); copy or export the file again") from exc
    if length < expected:
        raise VolumeReadError(f"{path} is truncated: {length} of {expected} bytes; copy or export the file again")
    if scan.count:
        raise VolumeReadError(
            f"{path} has {scan.count} NaN or infinite voxel(s) (ITK would read them as 0): the image was not "
            "reconstructed or resampled completely. Fill them (e.g. with -1000 HU, air, for a CT) and save the volume "
            "again"
        )


def _nifti_layout(path: Path, header: bytes) -> tuple[int, int, np.dtype | None]:
    """``(bytes the file must hold, offset of the voxels, voxel dtype when it is floating point)``."""
    for order in "<>":
        sizeof_hdr = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if sizeof_hdr == 348 and len(header) >= 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise VolumeReadError(f"{path} has no valid NIfTI header; copy or export the file again")
    expected = offset + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    floats = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
    return expected, offset, np.dtype(order + floats[datatype]) if datatype in floats else None


class _NonFiniteCounter:
    """Counts NaN/infinite values of ``dtype`` in a byte stream whose voxels start at ``offset``."""

    def __init__(self, offset: int, dtype: np.dtype | None) -> None:
        self.offset, self.dtype, self.count = offset, dtype, 0
        self._seen, self._carry = 0, b""

    def feed(self, chunk: bytes) -> None:
        start = max(0, self.offset - self._seen)
        self._seen += len(chunk)
        if self.dtype is None or start >= len(chunk):
            return
        data = self._carry + chunk[start:]
        usable = len(data) // self.dtype.itemsize * self.dtype.itemsize
        values = np.frombuffer(data[:usable], self.dtype)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self._carry = data[usable:]


def write_volume(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: to a temporary file beside ``path``, then rename, so no half-written file remains."""
    sitk = _sitk()
    path = Path(path)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


CANONICAL_ORIENTATION = "LPS"  # SimpleITK's DICOMOrient code for the identity direction


def to_canonical(image: sitk.Image) -> sitk.Image:
    """The same voxels with axes permuted/flipped so that the direction is (closest to) the identity: axial
    slices first, +x = patient left. Every model and the SIS see volumes this way (DESIGN §7)."""
    return _sitk().DICOMOrient(image, CANONICAL_ORIENTATION)


def canonical_voxels(image: sitk.Image, raw_hash: str | None = None) -> tuple[np.ndarray, str]:
    """``(Z, Y, X)`` voxels in the canonical orientation and their content hash (the SIS cache key).

    ``raw_hash``, the image's own :func:`content_hash`, is reused when reorienting changes nothing.
    """
    canonical = to_canonical(image)
    unchanged = canonical.GetDirection() == image.GetDirection() and canonical.GetSize() == image.GetSize()
    key = raw_hash if unchanged and raw_hash else content_hash(canonical)
    return _sitk().GetArrayFromImage(canonical), key


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
        corners[path] = np.asarray(ds.ImagePositionPatient, float)
        positions.append((float(np.dot(normal, corners[path])), path))
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
        _check_tilt(series, corners[positions[-1][1]] - corners[positions[0][1]], normal)
    return [p[1] for p in positions]


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
