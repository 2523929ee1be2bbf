"""Read and write image volumes: NIfTI, NRRD, MHA files, and DICOM series through :mod:`separeg.io.dicom_series`;
geometry kept.

SimpleITK and pydicom are imported lazily so that array-only code (GPU benchmarks, training on a
cache) runs where they are not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg.io.dicom_series import MIN_SLICES, _first_line, _looks_like_dicom, _sitk, read_dicom_series
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import VolumeReadError

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger(__name__)

__all__ = ["VOLUME_SUFFIXES", "Geometry", "is_volume_file", "read_volume", "to_canonical", "canonical_voxels",
           "CANONICAL_ORIENTATION", "write_volume", "content_hash", "check_volume"]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Voxel sizes below this are micro-CT at most: a clinical volume this fine has its spacing in metres, not mm.
MIN_SPACING_MM = 0.01
# No patient is longer than this along any axis (whole-body CT is about 2 m): a larger field of view is a bad header.
MAX_EXTENT_MM = 3000.0
# Unsigned 16-bit voxels at or above this read as -4096..-1 when taken as signed: CT air stored without an offset.
_WRAPPED_FROM = 0xF000


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


