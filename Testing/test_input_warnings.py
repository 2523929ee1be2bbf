"""Contour's input warnings on inputs of the kinds new users bring: a 1 mm clinical CT (no spacing warning: the model
resamples it), an MR DICOM series given to a CT model (named by its Modality tag), a CT scaled 0-1 (its range in
significant digits, not "0 to 0"); one format for every warning."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from separeg.io.dicom_write import write_ct_series
from separeg.io.volumes import read_volume
from separeg.segment.contour import _warnings

# The training-data summary a bundle records (separeg.segment.finetune.train), here OpenKBP-like: 2.7-5.4 mm voxels.
DATA = {"modality": "CT", "spacing_min": [2.73, 2.73, 1.5], "spacing_max": [5.42, 5.42, 3.0],
        "extent_mm_min": [350.0, 350.0, 190.0], "extent_mm_max": [694.0, 694.0, 384.0], "hu_p01": -1000.0,
        "hu_p99": 1200.0}
FORMAT = re.compile(r"^(modality|intensities|field of view|voxel size): .+ \(training data: .+\); .+$")


def _clinical_ct(tmp_path: Path) -> Path:
    """A 1 mm CT of a 400 mm field of view (a body of water in air), written as a DICOM series."""
    array = np.full((8, 400, 400), -1000, np.int16)
    yy, xx = np.mgrid[:400, :400]
    array[:, (yy - 200) ** 2 + (xx - 200) ** 2 < 150 ** 2] = 40
    array[:, 150:250, 150:250] = 1200  # bone
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.977, 0.977, 25.0))
    return write_ct_series(image, tmp_path / "ct").folder


def test_a_1mm_clinical_ct_gives_no_spacing_warning(tmp_path: Path) -> None:
    notes = _warnings(read_volume(_clinical_ct(tmp_path)), DATA)
    assert notes == []  # before: "voxel spacing [0.977, 0.977, 25.0] mm is far from the training data's ..."


def test_an_mr_series_is_named_by_its_modality_tag(tmp_path: Path) -> None:
    folder = _clinical_ct(tmp_path)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    notes = _warnings(read_volume(folder), DATA)
    assert len(notes) == 1 and notes[0].startswith("modality: the series is MR (DICOM Modality tag)")
    assert all(FORMAT.match(n) for n in notes), notes


def test_a_ct_scaled_0_to_1_reports_its_real_range_and_coarse_voxels_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((6, 40, 40)).astype(np.float32))
    image.SetSpacing((12.0, 12.0, 40.0))  # 480 mm field of view, voxels far coarser than any training scan
    notes = _warnings(image, DATA)
    intensity = next(n for n in notes if n.startswith("intensities"))
    assert re.search(r"percentile 0\.0\d+ to 0\.99\d", intensity) and " 0 to 0 " not in intensity
    assert any(n.startswith("voxel size: 12 x 12 mm in-plane") for n in notes)
    assert all(FORMAT.match(n) for n in notes), notes
    small = sitk.GetImageFromArray(np.full((6, 40, 40), -1000, np.int16))
    assert "field of view" in [n.split(":")[0] for n in _warnings(small, DATA)]
