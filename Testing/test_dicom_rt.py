from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.draw import polygon2mask
from test_dicom_ct import rotation, write_series

from separeg.io.dicom_ct import Algorithm, CtSeries, read_ct_series
from separeg.rt.dicom_cases import load_synonyms
from separeg.rt.labels import Label, LabelTable
from separeg.rt.rtstruct import RTSTRUCT_SOP_CLASS, read_rtstruct
from separeg.rt.rtstruct_write import interpreted_type, write_rtstruct, write_rtstruct_masks
from separeg.runtime.errors import InputError

ALGORITHM = Algorithm("test-model", "0.0.1", "ab" * 32)
LUNG1_ROIS = ["GTV-1", "Spinal-Cord", "Lung-Left", "Lung-Right"]


# ----------------------------------------------------------------------------------------------- helpers


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def index_polygon(ct: CtSeries, xy, k: float) -> np.ndarray:
    """Patient (LPS) points of a polygon given in voxel indices (x, y) on slice ``k``."""
    matrix, origin = ct.index_to_lps()
    xy = np.asarray(xy, float)
    return np.column_stack([xy, np.full(len(xy), k)]) @ matrix.T + origin


def square(lo: float, hi: float) -> list[tuple[float, float]]:
    return [(lo, lo), (hi, lo), (hi, hi), (lo, hi)]


def write_contours(path: Path, ct: CtSeries, rois: dict[str, list], *, frame_uid: str | None = None,
                   kinds: dict[str, str] | None = None, numbers: dict[str, int] | None = None) -> Path:
    """A minimal RTSTRUCT: ROI name -> list of (N, 3) LPS contours (its contours' type from ``kinds``)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = frame_uid or ct.frame_of_reference_uid
    series = pydicom.Dataset()
    series.SeriesInstanceUID = ct.series_instance_uid
    study = pydicom.Dataset()
    study.RTReferencedSeriesSequence = [series]
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for i, (name, contours) in enumerate(rois.items(), start=1):
        number = (numbers or {}).get(name, i)
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = pydicom.Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        item.ContourSequence = []
        for points in contours:
            contour = pydicom.Dataset()
            contour.ContourGeometricType = (kinds or {}).get(name, "CLOSED_PLANAR")
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.6f}" for v in np.ravel(points)]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def small_ct(tmp_path: Path) -> CtSeries:
    """4 slices of 40 x 40 voxels, 1 x 1 x 2 mm, identity direction, origin 0."""
    write_series(tmp_path / "ct", np.zeros((4, 40, 40)), spacing=(1.0, 1.0, 2.0))
    return read_ct_series(tmp_path / "ct")


@pytest.fixture(scope="module")
def lung1_ct(lung1: Path) -> CtSeries:
    return read_ct_series(lung1 / "ct")


@pytest.fixture(scope="module")
def lung1_import(lung1: Path, lung1_ct: CtSeries):
    start = time.perf_counter()
    result = read_rtstruct(lung1 / "rtstruct" / "1-1.dcm", lung1_ct)
    print(f"\nLUNG1 RTSTRUCT import: {time.perf_counter() - start:.2f} s")
    return result


# ----------------------------------------------------------------------------------------------- LUNG1


def test_lung1_import_matches_an_independent_rasteriser(lung1: Path, lung1_ct: CtSeries, lung1_import) -> None:
    info = json.loads((lung1 / "info.json").read_text())
    assert [(r.number, r.name) for r in lung1_import.rois] == [(r["number"], r["name"]) for r in info["rois"]]
    assert [r.tg263 for r in lung1_import.rois] == [None, "SpinalCord", "Lung_L", "Lung_R"]
    assert lung1_import.skipped == [] and lung1_import.warnings == []
    assert [r.color for r in lung1_import.rois] == [(0, 255, 120), (255, 192, 96), (64, 64, 255), (64, 64, 255)]
    assert all(r.interpreted_type == "ORGAN" for r in lung1_import.rois)
    # skimage's polygon2mask per contour, XORed per slice: the same voxels (no voxel centre lies on an edge here).
    ds = pydicom.dcmread(lung1 / "rtstruct" / "1-1.dcm")
    matrix, origin = lung1_ct.index_to_lps()
    for item, roi in zip(ds.ROIContourSequence, lung1_import.rois, strict=True):
        reference = np.zeros(lung1_ct.shape, bool)
        for contour in item.ContourSequence:
            ijk = (np.reshape(np.asarray(contour.ContourData, float), (-1, 3)) - origin) @ np.linalg.inv(matrix).T
            reference[round(ijk[0, 2])] ^= polygon2mask(lung1_ct.shape[1:], ijk[:, [1, 0]])
        assert np.array_equal(roi.mask, reference), roi.name
    volumes = {r.name: r.voxels * np.prod(lung1_ct.geometry.spacing) / 1000 for r in lung1_import.rois}
    assert volumes["Lung-Left"] == pytest.approx(2276, abs=1) and volumes["GTV-1"] == pytest.approx(156.3, abs=0.1)


def test_lung1_masks_round_trip(lung1_ct: CtSeries, lung1_import, tmp_path: Path) -> None:
    masks = {r.name: r.mask for r in lung1_import.rois}
    colors = {r.name: r.color for r in lung1_import.rois}
    start = time.perf_counter()
    path = write_rtstruct_masks(tmp_path / "rt.dcm", masks, lung1_ct, algorithm=ALGORITHM, colors=colors)
    print(f"\nLUNG1 RTSTRUCT export (4 ROIs): {time.perf_counter() - start:.2f} s")
    again = read_rtstruct(path, lung1_ct)
    assert [r.name for r in again.rois] == LUNG1_ROIS and again.warnings == [] and again.skipped == []
    for roi in again.rois:
        score = dsc(roi.mask, masks[roi.name])
        print(f"round trip DSC {roi.name}: {score:.6f} ({roi.voxels} voxels)")
        assert score >= 0.98, roi.name
        assert np.array_equal(roi.mask, masks[roi.name]), roi.name  # exact, in fact
        assert roi.color == colors[roi.name]
    check_references(path, lung1_ct)
    ds = pydicom.dcmread(path)
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["GTV", "ORGAN", "ORGAN", "ORGAN"]


def check_references(path: Path, ct: CtSeries) -> None:
    """The RTSTRUCT at ``path`` references ``ct`` as the issue asks, and carries its patient and study."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == RTSTRUCT_SOP_CLASS and ds.Modality == "RTSTRUCT"
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SeriesInstanceUID != ct.series_instance_uid and ds.SOPInstanceUID not in ct.sop_instance_uids
    header = ct.header()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        assert ds.get(keyword) == header.get(keyword, ""), keyword
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ct.frame_of_reference_uid
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == ct.study_instance_uid
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(ct.sop_instance_uids)
    assert {i.ReferencedSOPClassUID for i in series.ContourImageSequence} == {ct.sop_class_uid}
    assert {r.ReferencedFrameOfReferenceUID for r in ds.StructureSetROISequence} == {ct.frame_of_reference_uid}
    slices = set(ct.sop_instance_uids)
    matrix, origin = ct.index_to_lps()
    for item in ds.ROIContourSequence:
        for contour in item.ContourSequence:
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert uid in slices and contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            assert len(points) == contour.NumberOfContourPoints >= 3
            k = ((points - origin) @ np.linalg.inv(matrix).T)[:, 2]
            np.testing.assert_allclose(k, ct.sop_instance_uids.index(uid), atol=1e-3)
    assert ds.Manufacturer == "SepaReg" and ds.ManufacturerModelName == "test-model" and ds.SoftwareVersions == "0.0.1"
    assert ds.StructureSetLabel and ds.SeriesDescription == "SepaReg auto-contours"
    for observation in ds.RTROIObservationsSequence:
        assert "Automatic contour by SepaReg model test-model 0.0.1 (bundle sha256 abab" in \
            observation.ROIObservationDescription
        # ROI Interpreter is a person's name (PN); a program's output has none (Type 2, empty).
        assert observation.ROIInterpreter == "" and observation.ROIObservationLabel == "SepaReg auto"
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    # Frame of Reference module at the top level (the RT Structure Set IOD has it) and a series number.
    assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid and "PositionReferenceIndicator" in ds
    assert int(ds.SeriesNumber) > 0


def test_lung1_labelmap_round_trip(lung1_ct: CtSeries, lung1_import, tmp_path: Path, caplog) -> None:
    table = LabelTable.from_names(LUNG1_ROIS)
    assert [label.tg263 for label in table] == ["", "SpinalCord", "Lung_L", "Lung_R"]
    match = lung1_import.match(table)
    assert match.unmatched == [] and match.matched == {1: "GTV-1", 2: "Spinal-Cord", 3: "Lung-Left", 4: "Lung-Right"}
    # The GTV reaches into the left lung's contour: the smaller organ keeps the overlap.
    assert match.warnings == ["5981 voxels are in both 'Lung-Left' and 'GTV-1'; they go to the smaller, 'GTV-1'"]
    gtv = lung1_import.roi("GTV-1").mask
    assert np.all(match.labelmap[gtv] == 1)
    with caplog.at_level(logging.WARNING, logger="separeg.rt.rtstruct_write"):
        path = write_rtstruct(tmp_path / "rt.dcm", match.labelmap, table, lung1_ct, algorithm=ALGORITHM)
    check_references(path, lung1_ct)
    again = read_rtstruct(path, lung1_ct)
    assert [r.name for r in again.rois] == ["GTV-1", "SpinalCord", "Lung_L", "Lung_R"]  # TG-263 names
    assert [r.color for r in again.rois] == [label.color for label in table]
    assert [r.interpreted_type for r in again.rois] == ["GTV", "ORGAN", "ORGAN", "ORGAN"]
    labelmap, unmatched = again.to_labelmap(table)
    assert unmatched == []
    np.testing.assert_array_equal(labelmap, match.labelmap)


def test_lung1_names_matched_through_the_registry_and_synonyms(lung1_import) -> None:
    table = LabelTable.from_names(["Lung_L", "Heart", "GTV"])
    labelmap, unmatched = lung1_import.to_labelmap(table)
    assert unmatched == ["GTV-1", "Spinal-Cord", "Lung-Right"]  # listed, not silently dropped
    assert labelmap.dtype == np.uint8 and set(np.unique(labelmap)) == {0, 1}
    labelmap, unmatched = lung1_import.to_labelmap(table, synonyms={"gtv 1": "GTV", "Lung-Right": "Lung_L"})
    assert unmatched == ["Spinal-Cord", "Lung-Right"]  # Lung-Right: its label already has Lung-Left
    assert set(np.unique(labelmap)) == {0, 1, 3}


def test_lung1_on_eight_slices_warns_of_contours_off_the_volume(lung1: Path, lung1_subset: Path) -> None:
    ct = read_ct_series(lung1_subset)
    result = read_rtstruct(lung1 / "rtstruct" / "1-1.dcm", ct)
    assert [r.name for r in result.rois] == ["Spinal-Cord", "Lung-Left", "Lung-Right"]
    assert result.skipped == ["GTV-1: no contour on a CT slice (see the warnings)"]
    assert any(w.startswith("ROI 'GTV-1': 21 contour(s) lie beyond the CT's first or last slice at z = ")
               for w in result.warnings)
    lung = result.roi("Lung-Left")
    assert any("beyond the CT's first or last slice" in w and "(off the volume); left out" in w for w in lung.warnings)
    assert lung.box[0] == slice(0, 8) and lung.mask.shape == (8, 512, 512)


# ----------------------------------------------------------------------------------------------- synthetic


def test_ring_and_island(small_ct: CtSeries, tmp_path: Path) -> None:
    rois = {"ring": [index_polygon(small_ct, square(9.5, 30.5), 1), index_polygon(small_ct, square(14.5, 25.5), 1)],
            "island": [index_polygon(small_ct, square(9.5, 30.5), 2), index_polygon(small_ct, square(14.5, 25.5), 2),
                       index_polygon(small_ct, square(18.5, 20.5), 2)]}
    result = read_rtstruct(write_contours(tmp_path / "rt.dcm", small_ct, rois), small_ct)
    ring, island = result.roi("ring").mask, result.roi("island").mask
    assert ring.sum() == 21 * 21 - 11 * 11 == 320 and ring[1].sum() == 320
    assert not ring[1, 20, 20] and ring[1, 10, 10] and not ring[1, 9, 9]
    assert island.sum() == 320 + 4 and island[2, 19:21, 19:21].all()


def test_circle_ring_like_skimage(small_ct: CtSeries, tmp_path: Path) -> None:
    angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    circle = np.column_stack([np.cos(angles), np.sin(angles)])
    outer, inner = circle * 14.2 + (20.3, 19.6), circle[::-1] * 6.1 + (20.3, 19.6)
    rois = {"ring": [index_polygon(small_ct, outer, 3), index_polygon(small_ct, inner, 3)]}
    mask = read_rtstruct(write_contours(tmp_path / "rt.dcm", small_ct, rois), small_ct).roi("ring").mask
    expected = polygon2mask((40, 40), outer[:, ::-1]) ^ polygon2mask((40, 40), inner[:, ::-1])
    np.testing.assert_array_equal(mask[3], expected)
    assert mask[:3].sum() == 0


def test_pydicom_rtstruct_from_another_tool(tmp_path: Path) -> None:
    """pydicom's rtstruct.dcm (no preamble; a 400 x 300 mm box on 3 slices, two isocentre points) on a CT for it."""
    path = get_testdata_file("rtstruct.dcm")
    source = pydicom.dcmread(path, force=True)
    frame = source.ReferencedFrameOfReferenceSequence[0]
    series_uid = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    # 10 mm voxels with centres on the box's edges (x -250 + 10 i, y -200 + 10 j), slices at z -210 ... -170.
    write_series(tmp_path / "ct", np.zeros((5, 40, 50)), spacing=(10.0, 10.0, 10.0), origin=(-250, -200, -210),
                 series_uid=series_uid, frame_uid=frame.FrameOfReferenceUID)
    ct = read_ct_series(tmp_path / "ct")
    result = read_rtstruct(path, ct)
    assert [r.name for r in result.rois] == ["patient"]
    assert result.skipped == ["Isocenter 1: only POINT contours, no closed planar contour",
                              "Isocenter 2: only POINT contours, no closed planar contour"]
    patient = result.rois[0]
    assert patient.interpreted_type == "EXTERNAL" and patient.color == (220, 160, 120)
    # Edges through voxel centres: the left/top edge's centres are in, the right/bottom edge's out.
    assert [int(patient.mask[k].sum()) for k in range(5)] == [0, 40 * 30, 40 * 30, 40 * 30, 0]
    plane = patient.mask[1]
    assert plane[5, 5] and plane[34, 44] and not plane[35, 5] and not plane[5, 45] and not plane[4, 5]
    assert interpreted_type("patient") == "ORGAN" and interpreted_type("BODY") == "EXTERNAL"


@pytest.mark.parametrize("direction", [rotation(30), rotation(-20, 15)])
def test_rotated_grid(tmp_path: Path, direction: np.ndarray) -> None:
    write_series(tmp_path / "ct", np.zeros((5, 30, 32)), spacing=(0.9, 1.1, 2.5), origin=(-12, 7, 40),
                 direction=direction)
    ct = read_ct_series(tmp_path / "ct")
    triangle = [(3.2, 4.1), (27.7, 8.3), (12.4, 25.6)]
    result = read_rtstruct(write_contours(tmp_path / "rt.dcm", ct, {"tri": [index_polygon(ct, triangle, 2)]}), ct)
    mask = result.roi("tri").mask
    np.testing.assert_array_equal(mask[2], polygon2mask((30, 32), np.asarray(triangle)[:, ::-1]))
    assert mask.sum() == mask[2].sum() > 200 and result.warnings == []
    # masks -> RTSTRUCT -> masks on the rotated grid: exact.
    rng = np.random.default_rng(0)
    blobs = np.zeros(ct.shape, bool)
    blobs[1:4, 5:20, 6:25] = rng.random((3, 15, 19)) > 0.3
    path = write_rtstruct_masks(tmp_path / "out.dcm", {"blobs": blobs, "tri": mask}, ct, algorithm=ALGORITHM)
    again = read_rtstruct(path, ct)
    assert again.warnings == []
    np.testing.assert_array_equal(again.roi("blobs").mask, blobs)
    np.testing.assert_array_equal(again.roi("tri").mask, mask)
    check_references(path, ct)


def test_axial_contours_on_a_tilted_grid_are_not_moved(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", np.zeros((5, 30, 30)), spacing=(1.0, 1.0, 2.0), direction=rotation(0, 20))
    ct = read_ct_series(tmp_path / "ct")
    flat = index_polygon(ct, square(5.5, 20.5), 2)
    flat[:, 2] = flat[:, 2].mean()  # an axial polygon in patient space: it crosses the grid's tilted slices
    result = read_rtstruct(write_contours(tmp_path / "rt.dcm", ct, {"Cord": [flat]}), ct)
    assert result.rois == []
    assert result.warnings == [f"ROI 'Cord': 1 contour(s) lie between CT slices (more than 0.25 slice spacing from a "
                               f"slice) at z = {flat[0, 2]:.2f} mm; left out"]


def test_contours_between_beyond_and_outside(small_ct: CtSeries, tmp_path: Path) -> None:
    between = index_polygon(small_ct, square(5.5, 10.5), 1.4)  # 0.4 slice spacing off slice 1
    beyond = index_polygon(small_ct, square(5.5, 10.5), 5)
    outside = index_polygon(small_ct, square(-5.5, 10.5), 2)  # its left and top parts are off the field of view
    inside = index_polygon(small_ct, square(20.5, 22.5), 0)
    path = write_contours(tmp_path / "rt.dcm", small_ct, {"Liver": [between, beyond, outside, inside]})
    result = read_rtstruct(path, small_ct)
    liver = result.roi("Liver")
    assert liver.mask[2].sum() == 11 * 11 and liver.mask[2, 0, 0] and liver.mask[0].sum() == 4
    assert liver.mask[1].sum() == 0 and liver.mask.sum() == 125
    assert liver.warnings == [
        "ROI 'Liver': 1 contour(s) lie between CT slices (more than 0.25 slice spacing from a slice) at z = 2.80 mm; "
        "left out",
        "ROI 'Liver': 1 contour(s) lie beyond the CT's first or last slice at z = 10.00 mm (off the volume); left out",
        "ROI 'Liver': 1 contour(s) reach outside the CT's field of view (off the volume); the parts outside are "
        "clipped"]
    assert result.warnings == liver.warnings


def test_duplicate_empty_and_point_rois(small_ct: CtSeries, tmp_path: Path) -> None:
    box = [index_polygon(small_ct, square(5.5, 10.5), 1)]
    path = write_contours(tmp_path / "rt.dcm", small_ct,
                          {"PTV": box, "ptv": box, "Empty": [], "Marker": [index_polygon(small_ct, [(3, 3)], 1)],
                           "Tiny": [index_polygon(small_ct, square(5.1, 5.4), 1)]},
                          kinds={"Marker": "POINT"}, numbers={"PTV": 10, "ptv": 11})
    result = read_rtstruct(path, small_ct)
    assert [(r.number, r.name) for r in result.rois] == [(10, "PTV"), (11, "ptv [ROI 11]")]
    assert result.warnings == ["ROI name 'ptv' is used by ROIs 10 and 11; ROI 11 is imported as 'ptv [ROI 11]'"]
    assert result.skipped == ["Empty: no contour data (empty ROI)",
                              "Marker: only POINT contours, no closed planar contour",
                              "Tiny: its contours enclose no voxel centre (smaller than a voxel?)"]


def test_references_to_another_scan_are_refused(lung1: Path, small_ct: CtSeries, tmp_path: Path) -> None:
    rtstruct = lung1 / "rtstruct" / "1-1.dcm"
    with pytest.raises(InputError) as info:
        read_rtstruct(rtstruct, small_ct)
    assert "references Frame of Reference 1.3.6.1.4.1.32722.99.99.159382531350253250387871175467326315430" in \
        str(info.value) and f"is in Frame of Reference {small_ct.frame_of_reference_uid}" in str(info.value)
    # Same Frame of Reference, another series.
    frame_uid = json.loads((lung1 / "info.json").read_text())["frame_of_reference_uid"]
    write_series(tmp_path / "other", np.zeros((3, 8, 8)), frame_uid=frame_uid, series_uid="1.2.3.99")
    with pytest.raises(InputError, match=r"references the series 1\.3\.6\.1\.4\.1\.32722\.99\.99\.2989917765213423750"
                                         r"10861296712563382046, not the CT series 1\.2\.3\.99"):
        read_rtstruct(rtstruct, read_ct_series(tmp_path / "other"))


def test_not_an_rtstruct(lung1: Path, small_ct: CtSeries, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"is a CT object \(SOP class CT Image Storage\), not an RT Structure Set"):
        read_rtstruct(small_ct.files[0], small_ct)
    (tmp_path / "notes.txt").write_text("GTV, PTV\n")
    with pytest.raises(InputError, match="not an RT Structure Set|not a readable DICOM file"):
        read_rtstruct(tmp_path / "notes.txt", small_ct)
    with pytest.raises(InputError, match="does not exist"):
        read_rtstruct(tmp_path / "missing.dcm", small_ct)
    with pytest.raises(InputError, match="it is a folder"):
        read_rtstruct(tmp_path, small_ct)


def test_export_checks_and_character_set(tmp_path: Path, caplog) -> None:
    write_series(tmp_path / "ct", np.zeros((3, 10, 10)), patient_name="Müller^Jürgen", charset="ISO_IR 100")
    ct = read_ct_series(tmp_path / "ct")
    table = LabelTable((Label(1, "Œsophage", "Esophagus", (1, 2, 3)), Label(2, "PTV_high", "", (4, 5, 6)),
                        Label(3, "Heart", "Heart", (7, 8, 9))))
    labelmap = np.zeros(ct.shape, np.uint8)
    labelmap[1, 2:5, 2:5], labelmap[1, 6:8, 6:8] = 1, 2
    with caplog.at_level(logging.WARNING, logger="separeg.rt.rtstruct_write"):
        path = write_rtstruct(tmp_path / "rt.dcm", labelmap, table, ct, algorithm=ALGORITHM,
                              interpreted_types={"Esophagus": "AVOIDANCE"})
    assert "label 3 (Heart) has no voxel; no ROI written for it" in caplog.text
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 100" and str(ds.PatientName) == "Müller^Jürgen"
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Esophagus", "PTV_high"]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["AVOIDANCE", "PTV"]
    path = write_rtstruct_masks(tmp_path / "rt2.dcm", {"Œsophage": labelmap == 1, "Oesophagus": labelmap == 1}, ct,
                                algorithm=ALGORITHM)
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jürgen"
    assert ds.StructureSetROISequence[0].ROIName == "Œsophage"
    assert list(ds.ROIContourSequence[1].ROIDisplayColor) == [211, 171, 143]  # the registry's Esophagus colour
    with pytest.raises(InputError, match=r"has shape \(3, 10, 9\) \(z, y, x\), the CT series .* \(3, 10, 10\)"):
        write_rtstruct(tmp_path / "x.dcm", labelmap[..., :9], table, ct, algorithm=ALGORITHM)
    labelmap[0, 0, 0] = 9
    with pytest.raises(InputError, match="holds values 9 that are not in the label table"):
        write_rtstruct(tmp_path / "x.dcm", labelmap, table, ct, algorithm=ALGORITHM)
    assert not (tmp_path / "x.dcm").exists() and [p.name for p in tmp_path.glob(".*")] == []


def test_load_synonyms(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"Cord": "spinal cord", "Tumour": "GTV"}))
    assert load_synonyms(tmp_path / "s.json") == {"Cord": "SpinalCord", "Tumour": "GTV"}
    (tmp_path / "s.csv").write_text("# ours\nname,tg263\nMoelle,Cord\nLt Lung,Lung_L\nGTV-P,GTV\n")
    assert load_synonyms(tmp_path / "s.csv") == {"Moelle": "SpinalCord", "Lt Lung": "Lung_L", "GTV-P": "GTV"}
    for text, match in [("a,b,c\n", "row 1 has 3 fields"), ("a,GTV\na,PTV\n", "maps 'a' to both 'GTV' and 'PTV'"),
                        ("a,\n", "empty name")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(InputError, match=match):
            load_synonyms(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text('["a"]')
    with pytest.raises(InputError, match="must be a JSON object"):
        load_synonyms(tmp_path / "bad.json")
    with pytest.raises(InputError, match="does not exist"):
        load_synonyms(tmp_path / "none.json")

