"""Write a CT volume (NIfTI, NRRD, MHA) as a DICOM CT series, so that RTSTRUCT and SEG have images to reference.

One CT Image Storage file per axial slice, int16 pixels with RescaleSlope/RescaleIntercept, geometry from the
SimpleITK image (LPS): ImageOrientationPatient from the direction's first two columns, ImagePositionPatient per
slice, PixelSpacing (row spacing first), SliceThickness and SpacingBetweenSlices. Reading the folder back with
:func:`separeg.io.volumes.read_volume` gives the same voxels and geometry (a left-handed grid, which DICOM readers
cannot give back, is stored with its slices reversed: :func:`dicom_grid` says which grid comes back).

Deterministic: the UIDs (study, series, frame of reference, instances) are derived from everything the files hold
(the volume's content hash, patient identifiers, descriptions, separeg version), and nothing in the files depends
on the time of writing (a NIfTI/NRRD/MHA file carries no acquisition date, so StudyDate and StudyTime are written
empty, Type 2, and no series, content or creation date is written). Writing the same CT again therefore gives
byte-identical files under the same UIDs, never two different objects under one UID, and an RTSTRUCT/SEG that
references the first copy stays valid. (The RTSTRUCT and SEG written on it are new objects with new UIDs each time.)
The folder is written atomically: into a temporary folder beside it, then renamed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg import __version__
from separeg.io.volumes import content_hash
from separeg.runtime.errors import InputError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["CtWriteResult", "write_ct_series", "dicom_grid", "MANUFACTURER", "DEFAULT_PATIENT_NAME"]

log = logging.getLogger(__name__)

MANUFACTURER = "SepaReg"
DEFAULT_PATIENT_NAME = "Anonymous^"  # family name component only (a one-word PN is the retired form)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_INT16 = (-32768, 32767)


@dataclass(frozen=True)
class CtWriteResult:
    """What :func:`write_ct_series` wrote.

    Attributes:
        folder: the series folder, one ``CT_####.dcm`` per slice.
        series_instance_uid, study_instance_uid, frame_of_reference_uid: the new UIDs.
        patient_name, patient_id: as written.
        exact: True when the stored int16 values with slope/intercept give back the input voxels exactly.
    """

    folder: Path
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    exact: bool


def dicom_grid(image: sitk.Image) -> sitk.Image:
    """``image`` on the grid a DICOM series reader gives back: slices ordered along row x column direction.

    A right-handed grid (the usual case) is returned as it is; a left-handed one with its slices reversed (same
    voxels in space, third direction column negated, origin at the other end).
    """
    import SimpleITK as sitk

    direction = np.array(image.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) > 0:
        return image
    array = sitk.GetArrayViewFromImage(image)[::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    last = image.GetSize()[2] - 1
    out.SetOrigin(tuple(image.TransformIndexToPhysicalPoint((0, 0, last))))
    out.SetSpacing(image.GetSpacing())
    direction[:, 2] *= -1
    out.SetDirection(tuple(direction.ravel()))
    return out


def _rescale(values: np.ndarray) -> tuple[float, float, bool]:
    """Slope, intercept and exactness of storing ``values`` as int16 (stored = (value - intercept) / slope)."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    integral = bool(np.all(np.mod(values, 1) == 0)) if np.issubdtype(values.dtype, np.floating) else True
    if integral and _INT16[0] <= lo and hi <= _INT16[1]:
        return 1.0, 0.0, True
    if integral and hi - lo <= _INT16[1] - _INT16[0]:
        return 1.0, lo - _INT16[0], True
    slope = (hi - lo) / (_INT16[1] - _INT16[0]) or 1.0
    return slope, lo - _INT16[0] * slope, False


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_ct_series(image: sitk.Image, folder: str | Path, *, patient_name: str | None = None,
                    patient_id: str | None = None, series_description: str = "CT written by SepaReg",
                    study_description: str = "SepaReg export") -> CtWriteResult:
    """Write ``image`` (a CT in HU) as a DICOM CT series in ``folder`` (replaced if it exists).

    Args:
        image: a 3D scalar volume in HU, any orientation.
        folder: the series folder to create.
        patient_name: default "Anonymous^".
        patient_id: default "SEPAREG-" and the first 12 hex digits of the volume's content hash.
        series_description, study_description: written as they are.

    Returns:
        the folder, the UIDs and whether the values were stored exactly (non-integer or out-of-range values are
        rounded to 65536 levels between their minimum and maximum; a warning is logged).

    Raises:
        InputError: not a 3D scalar volume.
    """
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"a CT series needs a 3D single-channel volume, not a {image.GetDimension()}D image with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    folder = Path(folder)
    image = dicom_grid(image)
    values = sitk.GetArrayFromImage(image)  # (z, y, x)
    slope, intercept, exact = _rescale(values)
    if not exact:
        log.warning("CT values are not integers in the int16 range; stored with slope %.6g (rounded)", slope)
    stored = np.clip(np.round((values.astype(np.float64) - intercept) / slope), *_INT16).astype("<i2")
    digest = content_hash(image)
    patient_name = patient_name or DEFAULT_PATIENT_NAME
    patient_id = patient_id or f"SEPAREG-{digest[:12].upper()}"
    seed = (digest, patient_name, patient_id, series_description, study_description, __version__)
    study_uid, series_uid, for_uid = (_uid(*seed, kind) for kind in ("study", "series", "frame-of-reference"))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    spacing = image.GetSpacing()

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for k in range(stored.shape[0]):
            sop_uid = _uid(*seed, "instance", str(k))
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
            ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", ""
            ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "", "", ""  # unknown; deterministic (above)
            ds.StudyDescription = study_description
            ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 1
            ds.PatientPosition = ""  # not known from a NIfTI/NRRD file
            ds.SeriesDescription, ds.Laterality = series_description, ""  # Laterality: Type 2C, body part unknown
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
            ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, "separeg", __version__
            ds.InstanceNumber = k + 1
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.ImagePositionPatient = [_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (y), then column spacing (x)
            ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "HU"
            ds.KVP, ds.AcquisitionNumber, ds.BurnedInAnnotation = "", 1, "NO"
            ds.PixelData = stored[k].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            pydicom.dcmwrite(tmp / f"CT_{k + 1:04d}.dcm", ds, enforce_file_format=True)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CtWriteResult(folder, series_uid, study_uid, for_uid, patient_name, patient_id, exact)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    new.chmod(0o777 & ~_umask())
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
