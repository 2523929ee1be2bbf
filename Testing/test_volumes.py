from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import write_image
from separeg.io.dicom_series import read_dicom_series
from separeg.io.volumes import Geometry, content_hash, read_volume, write_volume
from separeg.runtime.errors import SeriesError, VolumeReadError


def test_reads_openkbp_nifti_with_geometry(openkbp: Path) -> None:
    image = read_volume(openkbp / "pt_1_ct.nii.gz")
    assert image.GetSize() == (128, 128, 128)
    assert image.GetSpacing() == pytest.approx((3.906, 3.906, 2.5), abs=1e-3)
    hu = sitk.GetArrayFromImage(image)
    assert hu.min() == -1000 and hu.max() == 2976  # manifest.csv of the shared data


def test_lung1_dicom_series_matches_pydicom(lung1: Path) -> None:
    image = read_volume(lung1 / "ct")
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((lung1 / "ct").glob("*.dcm"))]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    assert image.GetSize() == (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    assert image.GetSpacing()[:2] == pytest.approx([float(v) for v in slices[0].PixelSpacing[::-1]])
    assert image.GetSpacing()[2] == pytest.approx(float(np.median(np.diff(z))), abs=1e-3)
    assert image.GetOrigin() == pytest.approx([float(v) for v in slices[0].ImagePositionPatient], abs=1e-3)
    # Intensities are rescaled to HU (RescaleIntercept -1024): air near -1024, none below.
    hu = sitk.GetArrayViewFromImage(image)
    assert hu.min() == -1024 and hu.max() == 3034


def test_truncated_nifti_is_a_clear_error(openkbp: Path, tmp_path: Path) -> None:
    data = (openkbp / "pt_1_ct.nii.gz").read_bytes()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(VolumeReadError, match="truncated"):
        read_volume(broken)


def test_uncompressed_truncated_nifti(openkbp: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((openkbp / "pt_1_ct.nii.gz").read_bytes())
    broken = tmp_path / "broken.nii"
    broken.write_bytes(raw[: 352 + 1000])  # header and a few voxels
    with pytest.raises(VolumeReadError, match=r"broken.nii is truncated: 1352 of \d+ bytes"):
        read_volume(broken)


def test_non_image_file_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(VolumeReadError, match="not a supported volume"):
        read_volume(notes)
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not an image either")
    with pytest.raises(VolumeReadError, match="could not be read"):
        read_volume(fake)


def test_one_slice_and_2d_images_are_refused(tmp_path: Path) -> None:
    one = write_image(np.zeros((1, 32, 32), np.int16), tmp_path / "one.nii.gz")
    with pytest.raises(VolumeReadError, match="1 slice"):
        read_volume(one)
    flat = write_image(np.zeros((32, 32), np.int16), tmp_path / "flat.nrrd")
    with pytest.raises(VolumeReadError, match="2D image"):
        read_volume(flat)


def test_missing_path_and_single_dicom_file(lung1: Path, tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match="does not exist"):
        read_volume(tmp_path / "nowhere.nii.gz")
    with pytest.raises(VolumeReadError, match="single DICOM file"):
        read_volume(next((lung1 / "ct").glob("*.dcm")))


def test_empty_folder_has_no_series(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="is empty; give the folder that holds the DICOM series"):
        read_volume(tmp_path)
    (tmp_path / "notes.txt").write_text("no DICOM here")
    with pytest.raises(SeriesError, match="no CT, MR or PET image series"):
        read_volume(tmp_path)


def _split_series(folder: Path) -> str:
    """Give half of the files a new SeriesInstanceUID; return it."""
    new_uid = pydicom.uid.generate_uid()
    for path in sorted(folder.glob("*.dcm"))[::2]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = new_uid
        ds.save_as(path)
    return new_uid


def test_mixed_series_folder_names_the_series(lung1_subset: Path) -> None:
    new_uid = _split_series(lung1_subset)
    with pytest.raises(SeriesError, match="mixes 2 image series") as info:
        read_volume(lung1_subset)
    assert new_uid in str(info.value)
    # Every other slice of the original: 4 slices 6 mm apart, still a regular series.
    image = read_volume(lung1_subset, series_uid=new_uid)
    assert image.GetSize()[2] == 4
    assert image.GetSpacing()[2] == pytest.approx(6.0)


def test_missing_slice_is_refused(lung1_subset: Path) -> None:
    sorted(lung1_subset.glob("*.dcm"))[3].unlink()
    with pytest.raises(SeriesError, match="uneven slice gaps"):
        read_dicom_series(lung1_subset)


def test_dicom_without_pixel_data(lung1_subset: Path) -> None:
    for path in lung1_subset.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    with pytest.raises(VolumeReadError, match="could not be read"):
        read_volume(lung1_subset)


def test_write_is_atomic_and_round_trips(openkbp: Path, tmp_path: Path) -> None:
    image = read_volume(openkbp / "pt_1_ct.nii.gz")
    out = write_volume(image, tmp_path / "sub" / "copy.nrrd")
    assert [p.name for p in out.parent.iterdir()] == ["copy.nrrd"]  # no temporary file left
    again = read_volume(out)
    assert Geometry.of(again).matches(Geometry.of(image))
    assert content_hash(again) == content_hash(image)


def test_content_hash_ignores_name_but_sees_geometry(openkbp: Path, tmp_path: Path) -> None:
    shutil.copy(openkbp / "pt_1_ct.nii.gz", tmp_path / "renamed.nii.gz")
    a, b = read_volume(openkbp / "pt_1_ct.nii.gz"), read_volume(tmp_path / "renamed.nii.gz")
    assert content_hash(a) == content_hash(b)
    b.SetSpacing((1.0, 1.0, 1.0))
    assert content_hash(a) != content_hash(b)


def test_geometry_describe_names_all_parts(openkbp: Path) -> None:
    text = Geometry.of(read_volume(openkbp / "pt_1_ct.nii.gz")).describe()
    assert "128x128x128" in text and "spacing 3.906x3.906x2.5 mm" in text and "direction" in text
