from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom_ct import write_series

from separeg.io.dicom_ct import read_ct_series
from separeg.rt.labels import LabelTable, load_label_table
from separeg.rt.rtstruct import read_rtstruct
from separeg.runtime.errors import InputError, VolumeReadError
from separeg.segment.case_loading import load_case
from separeg.segment.cases import Case, find_cases, read_case_list


@pytest.fixture(scope="module")
def table(openkbp: Path) -> LabelTable:
    return load_label_table(openkbp / "labels.json")


def copy_case(openkbp: Path, patient: str, folder: Path, *, ct: str | None = "{}_ct.nii.gz",
              labels: str | None = "{}_oar.nii.gz") -> None:
    """Copy an OpenKBP case into ``folder`` under the names ``ct`` and ``labels`` ({} = patient); None: leave out."""
    folder.mkdir(parents=True, exist_ok=True)
    if ct is not None:
        shutil.copy(openkbp / f"{patient}_ct.nii.gz", folder / ct.format(patient))
    if labels is not None:
        shutil.copy(openkbp / f"{patient}_oar.nii.gz", folder / labels.format(patient))


def manifest(openkbp: Path) -> dict[str, set[int]]:
    with (openkbp / "manifest.csv").open() as f:
        return {row["patient_id"]: {int(v) for v in row["labels_present"].split(";")} for row in csv.DictReader(f)}


def test_find_cases_by_suffix(openkbp: Path, tmp_path: Path) -> None:
    copy_case(openkbp, "pt_1", tmp_path)
    copy_case(openkbp, "pt_2", tmp_path, labels="{}_seg.nii.gz")
    copy_case(openkbp, "pt_3", tmp_path, labels=None)  # a CT without labels
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / ".hidden_ct.nii.gz").write_bytes(b"")
    cases, unpaired = find_cases(tmp_path)
    assert cases == [Case("pt_1", tmp_path / "pt_1_ct.nii.gz", tmp_path / "pt_1_oar.nii.gz"),
                     Case("pt_2", tmp_path / "pt_2_ct.nii.gz", tmp_path / "pt_2_seg.nii.gz")]
    assert unpaired == [tmp_path / "pt_3_ct.nii.gz"]


def test_find_cases_in_subfolders_and_mixed_extensions(openkbp: Path, tmp_path: Path) -> None:
    copy_case(openkbp, "pt_1", tmp_path / "site_a" / "pt_1", ct="{}_CT.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(openkbp / "pt_2_oar.nii.gz")), str(tmp_path / "pt_2_Labels.nrrd"))
    copy_case(openkbp, "pt_2", tmp_path, labels=None)
    copy_case(openkbp, "pt_4", tmp_path, ct=None)  # labels without a CT
    cases, unpaired = find_cases(tmp_path)
    assert [(c.name, c.image.name, c.labels.name) for c in cases] == [
        ("pt_1", "pt_1_CT.nii.gz", "pt_1_oar.nii.gz"), ("pt_2", "pt_2_ct.nii.gz", "pt_2_Labels.nrrd")]
    assert unpaired == [tmp_path / "pt_4_oar.nii.gz"]


def test_find_cases_in_images_and_labels_folders(openkbp: Path, tmp_path: Path) -> None:
    for patient in ("pt_1", "pt_2"):
        copy_case(openkbp, patient, tmp_path / "images", ct="{}.nii.gz", labels=None)
        copy_case(openkbp, patient, tmp_path / "labels", ct=None, labels="{}.nii.gz")
    shutil.copy(openkbp / "pt_3_ct.nii.gz", tmp_path / "images" / "pt_3.nii.gz")
    nnunet = tmp_path / "nnunet"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    shutil.copy(openkbp / "pt_5_ct.nii.gz", nnunet / "imagesTr" / "kbp_005_0000.nii.gz")
    shutil.copy(openkbp / "pt_5_oar.nii.gz", nnunet / "labelsTr" / "kbp_005.nii.gz")
    cases, unpaired = find_cases(tmp_path)
    assert [(c.name, c.image.relative_to(tmp_path).as_posix(), c.labels.relative_to(tmp_path).as_posix())
            for c in cases] == [
        ("kbp_005", "nnunet/imagesTr/kbp_005_0000.nii.gz", "nnunet/labelsTr/kbp_005.nii.gz"),
        ("pt_1", "images/pt_1.nii.gz", "labels/pt_1.nii.gz"),
        ("pt_2", "images/pt_2.nii.gz", "labels/pt_2.nii.gz")]
    assert unpaired == [tmp_path / "images" / "pt_3.nii.gz"]


def test_find_cases_errors(openkbp: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        find_cases(tmp_path / "missing")
    with pytest.raises(InputError, match="no volume files"):
        find_cases(tmp_path)
    copy_case(openkbp, "pt_3", tmp_path, labels=None)
    with pytest.raises(InputError, match=r"no labelled case \(1 volume file\(s\), none paired.*_oar"):
        find_cases(tmp_path)
    copy_case(openkbp, "pt_3", tmp_path, ct=None)
    copy_case(openkbp, "pt_3", tmp_path, ct=None, labels="{}_seg.nii.gz")
    with pytest.raises(InputError, match="has 2 label maps"):
        find_cases(tmp_path)
    (tmp_path / "pt_3_seg.nii.gz").unlink()
    copy_case(openkbp, "pt_3", tmp_path / "copy")
    with pytest.raises(InputError, match="two cases are named 'pt_3'"):
        find_cases(tmp_path)


def test_read_case_list_json_and_csv(openkbp: Path, tmp_path: Path) -> None:
    copy_case(openkbp, "pt_1", tmp_path / "data")
    copy_case(openkbp, "pt_2", tmp_path / "data")
    lists = tmp_path / "lists"
    lists.mkdir()
    entries = [{"name": "first", "image": "../data/pt_1_ct.nii.gz", "labels": "../data/pt_1_oar.nii.gz"},
               {"image": str(tmp_path / "data" / "pt_2_ct.nii.gz"), "labels": "../data/pt_2_oar.nii.gz"}]
    (lists / "cases.json").write_text(json.dumps(entries))
    (lists / "wrapped.json").write_text(json.dumps({"cases": entries}))
    with (lists / "cases.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "image", "labels"])
        writer.writeheader()
        writer.writerows([{"name": "", **e} if "name" not in e else e for e in entries])
    expected = [Case("first", lists / "../data/pt_1_ct.nii.gz", lists / "../data/pt_1_oar.nii.gz"),
                Case("pt_2", tmp_path / "data" / "pt_2_ct.nii.gz", lists / "../data/pt_2_oar.nii.gz")]
    assert read_case_list(lists / "cases.json") == expected
    assert read_case_list(lists / "wrapped.json") == expected
    assert read_case_list(lists / "cases.csv") == expected
    loaded = load_case(expected[0], LabelTable.from_names(["Brainstem", "SpinalCord", "RightParotid", "LeftParotid",
                                                           "Esophagus", "Larynx", "Mandible"]))
    assert loaded.name == "first" and loaded.annotated == {1, 2, 3, 4, 7}


@pytest.mark.parametrize(("name", "text", "match"), [
    ("a.json", '[{"name": "x", "image": "x_ct.nii.gz"}]', "entry 1 has no labels"),
    ("a.json", '[{"name": "x", "image": "x_ct.nii.gz", "labels": "x_oar.nii.gz"}]',
     "do not exist: x: .*x_ct.nii.gz; x: .*x_oar.nii.gz"),
    ("a.json", '{"cases": "all"}', "must be a JSON list"),
    ("a.json", '[{"image": "x"', "not valid JSON"),
    ("a.json", "[]", "lists no case"),
    ("a.csv", "image,label\nx,y\n", "must name the columns name,image,labels"),
    ("a.txt", "x", "unknown format"),
])
def test_read_case_list_errors(tmp_path: Path, name: str, text: str, match: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=match):
        read_case_list(tmp_path / name)


def test_read_case_list_refuses_duplicate_names(openkbp: Path, tmp_path: Path) -> None:
    copy_case(openkbp, "pt_1", tmp_path)
    entry = {"name": "a", "image": "pt_1_ct.nii.gz", "labels": "pt_1_oar.nii.gz"}
    (tmp_path / "cases.json").write_text(json.dumps([entry, entry]))
    with pytest.raises(InputError, match="two cases are named 'a'"):
        read_case_list(tmp_path / "cases.json")
    with pytest.raises(InputError, match="does not exist"):
        read_case_list(tmp_path / "missing.json")


def test_load_case_pt1(openkbp: Path, table: LabelTable) -> None:
    case = Case("pt_1", openkbp / "pt_1_ct.nii.gz", openkbp / "pt_1_oar.nii.gz")
    loaded = load_case(case, table)
    assert loaded.name == "pt_1"
    assert loaded.annotated == frozenset({1, 2, 3, 4, 7})  # manifest.csv: no Esophagus (5), no Larynx (6)
    assert loaded.not_annotated(table) == {5, 6}  # unknown in this case, not background
    assert loaded.labels.dtype == np.uint8 and loaded.labels.shape == (128, 128, 128)
    assert loaded.image.GetSize() == (128, 128, 128)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.labels)))
    np.testing.assert_array_equal(loaded.labels, reference)


def test_annotated_organs_match_the_manifest(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    expected = manifest(openkbp)
    for patient in ("pt_1", "pt_5", "pt_27", "pt_38", "pt_43", "pt_201"):
        copy_case(openkbp, patient, tmp_path)
    cases, unpaired = find_cases(tmp_path)
    assert not unpaired and len(cases) == 6
    for case in cases:
        assert load_case(case, table).annotated == expected[case.name], case.name


def test_geometry_mismatch_names_both_grids(openkbp: Path, table: LabelTable) -> None:
    case = Case("mixed", openkbp / "pt_1_ct.nii.gz", openkbp / "pt_6_oar.nii.gz")
    with pytest.raises(InputError, match="does not lie on the image's grid") as info:
        load_case(case, table)
    message = str(info.value)
    assert "spacing 3.906x3.906x2.5 mm" in message and "spacing 2.734x2.734x2.5 mm" in message
    assert "pt_1_ct.nii.gz" in message and "pt_6_oar.nii.gz" in message


def test_shifted_origin_is_a_mismatch(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    labels = sitk.ReadImage(str(openkbp / "pt_1_oar.nii.gz"))
    labels.SetOrigin((0.0, 0.0, 5.0))
    sitk.WriteImage(labels, str(tmp_path / "pt_1_oar.nii.gz"))
    with pytest.raises(InputError, match=r"origin \(0.00, 0.00, 5.00\)"):
        load_case(Case("pt_1", openkbp / "pt_1_ct.nii.gz", tmp_path / "pt_1_oar.nii.gz"), table)


def write_labels(openkbp: Path, path: Path, edit) -> Path:
    reference = sitk.ReadImage(str(openkbp / "pt_1_oar.nii.gz"))
    array = edit(sitk.GetArrayFromImage(reference))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def test_unknown_label_value(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    def add_nine(a: np.ndarray) -> np.ndarray:
        a[60, 60:62, 60] = 9
        return a

    labels = write_labels(openkbp, tmp_path / "pt_1_oar.nii.gz", add_nine)
    with pytest.raises(InputError, match=r"holds values 9 that are not in the label table \(values 1, 2, 3, 4, 5, 6, "
                                         r"7: Brainstem, SpinalCord, RightParotid"):
        load_case(Case("pt_1", openkbp / "pt_1_ct.nii.gz", labels), table)


def test_float_and_negative_label_maps(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    ct = openkbp / "pt_1_ct.nii.gz"
    whole = write_labels(openkbp, tmp_path / "whole.nrrd", lambda a: a.astype(np.float32))
    assert load_case(Case("pt_1", ct, whole), table).annotated == {1, 2, 3, 4, 7}
    half = write_labels(openkbp, tmp_path / "half.nrrd", lambda a: a.astype(np.float32) / 2)
    with pytest.raises(InputError, match="fractional values"):
        load_case(Case("pt_1", ct, half), table)
    negative = write_labels(openkbp, tmp_path / "negative.nrrd", lambda a: a.astype(np.int16) - 1)
    with pytest.raises(InputError, match="negative values"):
        load_case(Case("pt_1", ct, negative), table)


def test_empty_label_map_annotates_nothing(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    empty = write_labels(openkbp, tmp_path / "empty.nii.gz", np.zeros_like)
    loaded = load_case(Case("pt_1", openkbp / "pt_1_ct.nii.gz", empty), table)
    assert loaded.annotated == frozenset() and loaded.not_annotated(table) == set(table.values)


def test_missing_files_are_read_errors(openkbp: Path, table: LabelTable, tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match="does not exist"):
        load_case(Case("pt_1", openkbp / "pt_1_ct.nii.gz", tmp_path / "none.nii.gz"), table)


# ----------------------------------------------------------------------------------------------- DICOM cases


LUNG1_TABLE = LabelTable.from_names(["GTV-1", "SpinalCord", "Lung_L", "Lung_R", "Heart"])


def copy_lung1(lung1: Path, folder: Path, *, slices: slice = slice(None), rtstruct: bool = True) -> Path:
    """LUNG1's CT (a run of slices) under folder/ct and its RTSTRUCT under folder/rt."""
    (folder / "ct").mkdir(parents=True)
    for path in sorted((lung1 / "ct").glob("*.dcm"))[slices]:
        shutil.copy(path, folder / "ct" / path.name)
    if rtstruct:
        (folder / "rt").mkdir()
        shutil.copy(lung1 / "rtstruct" / "1-1.dcm", folder / "rt" / "1-1.dcm")
    return folder


def test_dicom_ct_with_rtstruct_is_a_case(lung1: Path, openkbp: Path, tmp_path: Path) -> None:
    cases, unpaired = find_cases(lung1)
    info = json.loads((lung1 / "info.json").read_text())
    assert cases == [Case("LUNG1-001", lung1 / "ct", lung1 / "rtstruct" / "1-1.dcm", info["series_instance_uid"])]
    assert unpaired == [] and cases[0].is_dicom
    loaded = load_case(cases[0], LUNG1_TABLE)
    assert loaded.name == "LUNG1-001" and loaded.labels.dtype == np.uint8 and loaded.labels.shape == (134, 512, 512)
    assert loaded.image.GetSize() == (512, 512, 134) and loaded.image.GetSpacing()[2] == 3.0
    assert loaded.annotated == {1, 2, 3, 4} and loaded.not_annotated(LUNG1_TABLE) == {5}  # no Heart ROI
    assert np.count_nonzero(loaded.labels == 1) == 54639  # the GTV keeps the voxels it shares with the lung


def test_dicom_and_nifti_cases_together(lung1: Path, openkbp: Path, tmp_path: Path, caplog) -> None:
    # Slices 41-48 of 134 hold no GTV contour: the GTV is not annotated in that case.
    copy_lung1(lung1, tmp_path / "lung", slices=slice(40, 48))
    copy_case(openkbp, "pt_1", tmp_path / "kbp")
    write_series(tmp_path / "ct_only" / "ct", np.zeros((3, 8, 8)))  # a CT without RTSTRUCT
    (tmp_path / "ct_only" / "notes.txt").write_text("no contours")
    cases, unpaired = find_cases(tmp_path)
    assert [(c.name, c.is_dicom) for c in cases] == [("LUNG1-001", True), ("pt_1", False)]
    assert unpaired == [tmp_path / "ct_only" / "ct"]
    with caplog.at_level(logging.WARNING):
        loaded = load_case(cases[0], LUNG1_TABLE, synonyms={"Lung-Right": "Heart"})
    assert loaded.labels.shape == (8, 512, 512) and loaded.annotated == {2, 3, 5}
    assert loaded.not_annotated(LUNG1_TABLE) == {1, 4}
    assert "match no organ" not in caplog.text and "beyond the CT's first or last slice" in caplog.text
    direct = read_rtstruct(cases[0].labels, read_ct_series(cases[0].image))
    assert np.count_nonzero(loaded.labels == 5) == direct.roi("Lung-Right").voxels
    with caplog.at_level(logging.WARNING):
        loaded = load_case(cases[0], LabelTable.from_names(["SpinalCord"]))
    assert loaded.annotated == {1}
    assert f"case LUNG1-001: ROIs Lung-Left, Lung-Right of {cases[0].labels} match no organ" in caplog.text


def test_dicom_case_pairing_errors(lung1: Path, tmp_path: Path) -> None:
    copy_lung1(lung1, tmp_path / "a", slices=slice(40, 44))
    shutil.copy(lung1 / "rtstruct" / "1-1.dcm", tmp_path / "a" / "rt" / "copy.dcm")
    with pytest.raises(InputError, match=r"has 2 RTSTRUCTs: .*1-1\.dcm, .*copy\.dcm; keep one"):
        find_cases(tmp_path)
    (tmp_path / "a" / "rt" / "copy.dcm").unlink()
    shutil.rmtree(tmp_path / "a" / "ct")
    with pytest.raises(InputError, match=r"no labelled case \(no volume files, 1 DICOM series or RTSTRUCT"):
        find_cases(tmp_path)


def test_dicom_case_in_a_case_list(lung1: Path, tmp_path: Path) -> None:
    copy_lung1(lung1, tmp_path, slices=slice(40, 48))
    (tmp_path / "cases.json").write_text(json.dumps([{"name": "l1", "image": "ct", "labels": "rt/1-1.dcm"}]))
    cases = read_case_list(tmp_path / "cases.json")
    assert cases == [Case("l1", tmp_path / "ct", tmp_path / "rt" / "1-1.dcm")] and cases[0].is_dicom
    assert load_case(cases[0], LUNG1_TABLE).annotated == {2, 3, 4}
