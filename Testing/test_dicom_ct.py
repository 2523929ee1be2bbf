from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from separeg.io.dicom_ct import (
    PATIENT_STUDY_KEYWORDS,
    Algorithm,
    copy_patient_study,
    ensure_character_set,
    read_ct_series,
)
from separeg.io.volumes import Geometry, read_volume
from separeg.runtime.errors import InputError, SeriesError


def rotation(z_degrees: float, x_degrees: float = 0.0) -> np.ndarray:
    """A direction matrix (columns: the x, y, z axes) rotated about z, then about x."""
    a, b = np.radians(z_degrees), np.radians(x_degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def write_series(folder: Path, array: np.ndarray, *, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                 direction: np.ndarray | None = None, series_uid: str | None = None, study_uid: str | None = None,
                 frame_uid: str | None = None, patient_name: str = "Test^Patient", patient_id: str = "P1",
                 charset: str | None = None, modality: str = "CT") -> list[Path]:
    """Write ``array`` (z, y, x, int16 HU) as a DICOM image series, one file per slice (array order)."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    series_uid, study_uid, frame_uid = series_uid or generate_uid(), study_uid or generate_uid(), \
        frame_uid or generate_uid()
    paths = []
    for k, plane in enumerate(np.asarray(array, np.int16)):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if charset:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID, ds.Modality = CTImageStorage, modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20240102", "101010", "S1", "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        position = np.asarray(origin, float) + k * spacing[2] * direction[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = plane.tobytes()
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_lung1_series_as_simpleitk_reads_it(lung1: Path) -> None:
    info = json.loads((lung1 / "info.json").read_text())
    ct = read_ct_series(lung1)  # the folder also holds the RTSTRUCT: the CT series is chosen
    assert ct.geometry == Geometry.of(read_volume(lung1 / "ct"))
    assert ct.shape == (134, 512, 512) and len(ct.files) == len(set(ct.sop_instance_uids)) == 134
    assert ct.series_instance_uid == info["series_instance_uid"]
    assert ct.frame_of_reference_uid == info["frame_of_reference_uid"]
    assert ct.sop_class_uid == CTImageStorage and ct.modality == "CT" and ct.folder == lung1 / "ct"
    for k in (0, 67, 133):
        ds = pydicom.dcmread(ct.files[k], stop_before_pixels=True)
        assert ds.SOPInstanceUID == ct.sop_instance_uids[k]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(ct.geometry.origin[2] + 3.0 * k)
    header = ct.header()
    assert header.PatientID == "LUNG1-001" and "PixelData" not in header
    assert ct.study_instance_uid == header.StudyInstanceUID


def test_subset_pixels_in_array_order(lung1_subset: Path) -> None:
    ct = read_ct_series(lung1_subset)
    datasets = ct.datasets()
    assert [ds.SOPInstanceUID for ds in datasets] == list(ct.sop_instance_uids)
    image = ct.image()
    assert Geometry.of(image) == ct.geometry
    array = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(array[3], datasets[3].pixel_array * float(datasets[3].RescaleSlope)
                                  + float(datasets[3].RescaleIntercept))


def test_rotated_series_geometry(tmp_path: Path) -> None:
    direction = rotation(30, 10)
    write_series(tmp_path / "ct", np.zeros((4, 6, 5)), spacing=(0.8, 0.9, 2.5), origin=(10, -20, 30),
                 direction=direction)
    ct = read_ct_series(tmp_path / "ct")
    reference = Geometry.of(read_volume(tmp_path / "ct"))
    assert ct.geometry.matches(reference, tol_mm=1e-6)
    assert ct.geometry.size == (5, 6, 4) and ct.shape == (4, 6, 5)
    np.testing.assert_allclose(np.reshape(ct.geometry.direction, (3, 3)), direction, atol=1e-6)
    matrix, origin = ct.index_to_lps()
    np.testing.assert_allclose(matrix @ [1, 2, 3] + origin,
                               reference_point(tmp_path / "ct", (1, 2, 3)), atol=1e-5)


def reference_point(folder: Path, index) -> tuple[float, ...]:
    return read_volume(folder).TransformContinuousIndexToPhysicalPoint([float(i) for i in index])


def test_several_series_are_listed(tmp_path: Path) -> None:
    write_series(tmp_path / "a", np.zeros((3, 4, 4)), series_uid="1.2.3.1")
    write_series(tmp_path / "b", np.zeros((3, 4, 4)), series_uid="1.2.3.2")
    with pytest.raises(SeriesError, match=r"holds 2 image series: CT 1\.2\.3\.1 \(3 files\); CT 1\.2\.3\.2"):
        read_ct_series(tmp_path)
    assert read_ct_series(tmp_path, series_uid="1.2.3.2").series_instance_uid == "1.2.3.2"
    with pytest.raises(SeriesError, match="holds no series 9.9"):
        read_ct_series(tmp_path, series_uid="9.9")
    # A CT beside an MR of the same patient: the CT is the one to contour.
    shutil.rmtree(tmp_path / "b")
    write_series(tmp_path / "b", np.zeros((3, 4, 4)), series_uid="1.2.3.2", modality="MR")
    assert read_ct_series(tmp_path).series_instance_uid == "1.2.3.1"


def test_no_ct_series(lung1: Path, tmp_path: Path) -> None:
    shutil.copy(lung1 / "rtstruct" / "1-1.dcm", tmp_path / "rt.dcm")
    with pytest.raises(SeriesError, match="holds no CT image series; it holds only RTSTRUCT"):
        read_ct_series(tmp_path)
    with pytest.raises(SeriesError, match="is RTSTRUCT, not a CT, MR or PET image series"):
        read_ct_series(tmp_path, series_uid=pydicom.dcmread(tmp_path / "rt.dcm").SeriesInstanceUID)
    with pytest.raises(InputError, match="does not exist"):
        read_ct_series(tmp_path / "missing")
    with pytest.raises(InputError, match="is a file; give the folder"):
        read_ct_series(tmp_path / "rt.dcm")


def test_missing_slice_is_located(lung1_subset: Path) -> None:
    ct = read_ct_series(lung1_subset)
    gone = ct.files[4]
    gone.unlink()
    with pytest.raises(SeriesError) as info:
        read_ct_series(lung1_subset)
    message = str(info.value)
    assert "uneven slice gaps" in message and "Median gap 3 mm" in message
    assert f"6 mm between {ct.files[3].name} (at {ct.geometry.origin[2] + 9:.2f} mm) and {ct.files[5].name}" \
        in message and "about 1 slice(s) missing" in message


def test_mixed_frame_of_reference(lung1_subset: Path) -> None:
    path = sorted(lung1_subset.glob("*.dcm"))[2]
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.save_as(path)
    with pytest.raises(SeriesError, match=r"mixes 2 Frames of Reference: .*1\.2\.3\.4 \(1 slices"):
        read_ct_series(lung1_subset)
    del ds.FrameOfReferenceUID
    ds.save_as(path)
    with pytest.raises(SeriesError, match="has no FrameOfReferenceUID"):
        read_ct_series(lung1_subset)


def test_copy_patient_study(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", np.zeros((3, 4, 4)), patient_name="Müller^Jürgen", charset="ISO_IR 100")
    ct = read_ct_series(tmp_path / "ct")
    source = ct.header()
    del source.AccessionNumber
    target = pydicom.Dataset()
    target.PatientAge = "040Y"  # not in the CT: removed, not left from another patient
    copy_patient_study(source, target)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            assert target[keyword].value == source[keyword].value, keyword
    assert target.AccessionNumber == "" and "PatientAge" not in target
    assert target.SpecificCharacterSet == "ISO_IR 100" and str(target.PatientName) == "Müller^Jürgen"
    target.StructureSetLabel = "Réseau"  # Latin-1 holds it
    ensure_character_set(target)
    assert target.SpecificCharacterSet == "ISO_IR 100"
    target.StructureSetName = "Œsophage"  # Latin-1 does not
    ensure_character_set(target)
    assert target.SpecificCharacterSet == "ISO_IR 192"
    plain = pydicom.Dataset()
    plain.PatientName = "José"
    ensure_character_set(plain)  # no character set: the default repertoire is ASCII
    assert plain.SpecificCharacterSet == "ISO_IR 192"


def test_algorithm_describe() -> None:
    assert Algorithm("hn7", "0.3").describe() == "hn7 0.3"
    assert Algorithm("hn7", "0.3", "ab12").describe() == "hn7 0.3 (bundle sha256 ab12)"


def test_slices_sharing_a_sop_instance_uid_are_refused_naming_the_files(lung1_subset: Path) -> None:
    """Issue 30: a slice given another slice's SOPInstanceUID passed; the RTSTRUCT then listed 7 UIDs for 8 slices
    and contours pointed at a UID two positions share. Contour, export, training and scan all read through here."""
    from separeg.io.archive import scan_archive

    files = sorted(lung1_subset.glob("*.dcm"))
    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(files[2]).SOPInstanceUID
    ds.save_as(files[5])
    for read in (read_ct_series, read_volume):
        with pytest.raises(SeriesError, match="same SOPInstanceUID") as info:
            read(lung1_subset)
        assert str(files[2]) in str(info.value) and str(files[5]) in str(info.value)
    entry = next(e for e in scan_archive(lung1_subset).entries if e.kind == "dicom-series")
    assert entry.status == "error" and "same SOPInstanceUID" in entry.reason and files[5].name in entry.reason


def test_two_slices_at_one_position_are_both_named(lung1_subset: Path) -> None:
    files = sorted(lung1_subset.glob("*.dcm"))
    ds = pydicom.dcmread(files[5])
    ds.ImagePositionPatient = pydicom.dcmread(files[4]).ImagePositionPatient
    ds.save_as(files[5])
    with pytest.raises(SeriesError, match="two slices at the same position") as info:
        read_ct_series(lung1_subset)
    assert str(files[4]) in str(info.value) and str(files[5]) in str(info.value)
