"""DICOM SEG export and import on the real LUNG1 CT series (134 x 512 x 512) and on a CT written from NIfTI."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from separeg.io.dicom_ct import PATIENT_STUDY_KEYWORDS, Algorithm, CtSeries, read_ct_series
from separeg.rt.labels import LabelTable
from separeg.rt.seg import read_seg, segment_terminology, write_seg
from separeg.runtime.errors import InputError

ALGORITHM = Algorithm(name="tiny-model", version="0.1.0", bundle_hash="ab" * 32)


@pytest.fixture(scope="module")
def lung1_ct(lung1: Path) -> CtSeries:
    return read_ct_series(lung1 / "ct")


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return LabelTable.from_names(["Lung-Left", "Lung-Right", "Spinal-Cord", "GTV-1", "Heart", "Cochlea_L"])


def _organs(shape: tuple[int, int, int]) -> np.ndarray:
    """A few organs over slices 20-110 of the LUNG1 grid, touching each other; value 5 (Heart) absent."""
    labelmap = np.zeros(shape, np.uint8)
    labelmap[30:100, 150:350, 280:420] = 1  # Lung-Left (patient left = +x)
    labelmap[25:105, 150:350, 90:230] = 2  # Lung-Right
    labelmap[20:110, 330:350, 245:265] = 3  # Spinal-Cord
    labelmap[60:66, 200:230, 300:330] = 4  # GTV-1 inside the left lung
    labelmap[50, 0, 0] = 6  # one voxel in the corner
    return labelmap


def test_seg_round_trip_on_lung1(lung1_ct: CtSeries, table: LabelTable, tmp_path: Path, caplog) -> None:
    labelmap = _organs(lung1_ct.shape)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="separeg.rt.seg"):
        path = write_seg(tmp_path / "seg.dcm", labelmap, table, lung1_ct, algorithm=ALGORITHM)
    written = time.perf_counter() - start
    assert "Cochlea_L" in caplog.text  # no confirmed code: generic, with a warning
    start = time.perf_counter()
    back = read_seg(path, lung1_ct)
    read = time.perf_counter() - start
    assert written < 20 and read < 20, (written, read)

    # Masks exactly as written, one segment per organ present, in value order.
    assert back.names == ["Lung_L", "Lung_R", "SpinalCord", "GTV-1", "Cochlea_L"]  # as RTSTRUCT ROIs are named
    assert back.descriptions == ["Lung-Left", "Lung-Right", "Spinal-Cord", "", ""]
    for i, value in enumerate((1, 2, 3, 4, 6)):
        assert np.array_equal(back.masks[i], labelmap == value), back.names[i]
    restored, unmatched = back.to_labelmap(table)
    assert np.array_equal(restored, labelmap) and unmatched == []
    assert back.colors[0] == table.by_value(1).color and back.colors[1] == table.by_value(2).color

    # Read independently with highdicom: references, patient/study, algorithm, codes.
    seg = hd.seg.segread(path)
    ct_header = lung1_ct.header()
    assert seg.SOPInstanceUID not in lung1_ct.sop_instance_uids and seg.SeriesInstanceUID != ct_header.SeriesInstanceUID
    assert seg.Manufacturer == "SepaReg" and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    referenced = {str(ref.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for ref in series.ReferencedInstanceSequence}
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [lung1_ct.series_instance_uid]
    assert referenced and referenced <= set(lung1_ct.sop_instance_uids)
    assert len(referenced) == int(np.count_nonzero(labelmap.any(axis=(1, 2))))  # only slices with an organ
    assert seg.FrameOfReferenceUID == lung1_ct.frame_of_reference_uid
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in ct_header:
            assert seg.get(keyword) == ct_header.get(keyword), keyword
    assert seg.PatientID == "LUNG1-001"
    items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    for item in items.values():
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "tiny-model" and algorithm.AlgorithmVersion == "0.1.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert ALGORITHM.bundle_hash in algorithm.AlgorithmParameters
        assert "RecommendedDisplayCIELabValue" in item
    left = items[1]
    assert left.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert left.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert left.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert items[4].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "RT Target"  # GTV-1 coded as a GTV
    assert items[4].SegmentedPropertyTypeCodeSequence[0].CodeValue == "228791009"
    assert items[5].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    # The volume highdicom builds from the SEG sits on the CT's grid.
    volume = seg.get_volume(combine_segments=True)
    assert np.allclose(volume.spacing, lung1_ct.geometry.spacing[::-1], atol=1e-3)


def test_seg_refuses_labelmaps_it_cannot_write(lung1_ct: CtSeries, table: LabelTable, tmp_path: Path) -> None:
    shape = lung1_ct.shape
    with pytest.raises(InputError, match="134x512x512"):
        write_seg(tmp_path / "a.dcm", np.zeros((10, 512, 512), np.uint8), table, lung1_ct, algorithm=ALGORITHM)
    labelmap = np.zeros(shape, np.uint8)
    labelmap[10, 10, 10] = 9
    with pytest.raises(InputError, match="values 9 that the label table does not list"):
        write_seg(tmp_path / "b.dcm", labelmap, table, lung1_ct, algorithm=ALGORITHM)
    with pytest.raises(InputError, match="empty"):
        write_seg(tmp_path / "c.dcm", np.zeros(shape, np.uint8), table, lung1_ct, algorithm=ALGORITHM)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_read_seg_refuses_another_series_or_missing_slices(lung1_ct: CtSeries, lung1_subset: Path, table: LabelTable,
                                                           tmp_path: Path) -> None:
    path = write_seg(tmp_path / "seg.dcm", _organs(lung1_ct.shape), table, lung1_ct, algorithm=ALGORITHM)
    subset = read_ct_series(lung1_subset)  # 8 slices of the same series
    with pytest.raises(InputError, match="not in the CT series"):
        read_seg(path, subset)
    other = CtSeries(**{**lung1_ct.__dict__, "series_instance_uid": "1.2.3", "frame_of_reference_uid": "1.2.3.4"})
    with pytest.raises(InputError, match="not the CT series 1.2.3"):
        read_seg(path, other)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="not a readable DICOM SEG"):
        read_seg(tmp_path / "junk.dcm", lung1_ct)


def test_non_ascii_names_switch_the_character_set(lung1_ct: CtSeries, tmp_path: Path) -> None:
    table = LabelTable.from_names(["Parotid L (腮腺)"])
    labelmap = np.zeros(lung1_ct.shape, np.uint8)
    labelmap[40:42, 100:110, 100:110] = 1
    path = write_seg(tmp_path / "seg.dcm", labelmap, table, lung1_ct, algorithm=ALGORITHM)
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.SegmentSequence[0].SegmentDescription == "Parotid L (腮腺)"
    assert segment_terminology(table.by_value(1)).type.meaning == "Parotid gland"
