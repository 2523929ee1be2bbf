"""A normal PACS export: the CT series with a 1-slice topogram series and RT plan/dose files beside it. The one
usable series is taken (and the ignored ones named), by contour, export and every DICOM reader."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from separeg.io.dicom_ct import read_ct_series
from separeg.io.dicom_write import write_ct_series
from separeg.io.volumes import read_volume
from separeg.runtime.errors import SeriesError


def _non_image(path: Path, modality: str, sop_class: str, study: str, frame: str) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, generate_uid(), modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, generate_uid(), frame
    ds.PatientName, ds.PatientID = "Doe^Jane", "P-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


@pytest.fixture()
def pacs_folder(tmp_path: Path) -> Path:
    """CT (8 slices), a topogram (one LOCALIZER slice, same study), an RTPLAN and an RTDOSE, all in one folder."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (8, 32, 32)).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.5))
    ct = write_ct_series(image, tmp_path / "ct", patient_name="Doe^Jane", patient_id="P-1")
    folder = tmp_path / "export"
    (tmp_path / "ct").rename(folder)
    scout = pydicom.dcmread(next(folder.glob("*.dcm")))
    scout.SeriesInstanceUID, scout.SOPInstanceUID = generate_uid(), generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.ImageType, scout.SeriesDescription, scout.SeriesNumber = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "Topogram", 2
    scout.save_as(folder / "topogram.dcm", enforce_file_format=True)
    _non_image(folder / "plan.dcm", "RTPLAN", "1.2.840.10008.5.1.4.1.1.481.5", ct.study_instance_uid,
               ct.frame_of_reference_uid)
    _non_image(folder / "dose.dcm", "RTDOSE", "1.2.840.10008.5.1.4.1.1.481.2", ct.study_instance_uid,
               ct.frame_of_reference_uid)
    return folder


def test_the_one_usable_series_is_taken_and_the_topogram_named(pacs_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        series = read_ct_series(pacs_folder)
        volume = read_volume(pacs_folder)
    assert series.shape == (8, 32, 32) and volume.GetSize() == (32, 32, 8)
    assert "a localizer (topogram or scout view)" in caplog.text and "ignored" in caplog.text


def test_two_usable_series_are_still_refused(pacs_folder: Path, tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 16, 16), np.int16))
    other = write_ct_series(image, tmp_path / "other", patient_id="P-2")
    for path in other.folder.iterdir():
        path.rename(pacs_folder / f"other_{path.name}")
    with pytest.raises(SeriesError, match="image series"):
        read_volume(pacs_folder)
    with pytest.raises(SeriesError, match="SeriesInstanceUID"):
        read_ct_series(pacs_folder)


def test_export_on_the_pacs_folder_needs_no_uid(pacs_folder: Path, tmp_path: Path) -> None:
    series = read_ct_series(pacs_folder)
    labelmap = np.zeros(series.shape, np.uint8)
    labelmap[2:5, 10:20, 10:20] = 1
    lm = sitk.GetImageFromArray(labelmap)
    lm.CopyInformation(series.image())
    sitk.WriteImage(lm, str(tmp_path / "lm.nrrd"))
    (tmp_path / "labels.csv").write_text("value,name\n1,Heart\n")
    run = subprocess.run([sys.executable, "-m", "separeg.cli", "export", str(tmp_path / "lm.nrrd"), "--ct",
                          str(pacs_folder), "--out", str(tmp_path / "out"), "--labels", str(tmp_path / "labels.csv"),
                          "--rtstruct"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "localizer" in run.stderr and (tmp_path / "out" / "rtstruct.dcm").is_file()
