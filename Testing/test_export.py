"""CT -> DICOM series (NIfTI in, DICOM out, read back equal) and `run_export` on OpenKBP and LUNG1."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from separeg.io.dicom_ct import read_ct_series
from separeg.io.dicom_write import DEFAULT_PATIENT_NAME, dicom_grid, write_ct_series
from separeg.io.volumes import Geometry, read_volume
from separeg.rt.export import ExportJob, run_export
from separeg.rt.labels import load_label_table
from separeg.rt.seg import read_seg
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events, EventType, ListSink


def _same(a: sitk.Image, b: sitk.Image) -> bool:
    return Geometry.of(a).matches(Geometry.of(b), tol_mm=1e-3) and np.array_equal(sitk.GetArrayFromImage(a),
                                                                                   sitk.GetArrayFromImage(b))


def test_nifti_ct_written_as_dicom_reads_back_voxel_exact(openkbp: Path, tmp_path: Path) -> None:
    image = read_volume(openkbp / "pt_1_ct.nii.gz")
    start = time.perf_counter()
    result = write_ct_series(image, tmp_path / "ct_dicom")
    assert time.perf_counter() - start < 10
    assert result.exact and len(list(result.folder.glob("*.dcm"))) == 128
    assert _same(read_volume(result.folder), image)
    ct = read_ct_series(result.folder)
    assert ct.geometry.matches(Geometry.of(image)) and ct.series_instance_uid == result.series_instance_uid
    ds = pydicom.dcmread(ct.files[0])
    assert ds.Modality == "CT" and ds.PatientName == DEFAULT_PATIENT_NAME and ds.PatientID.startswith("SEPAREG-")
    assert ds.Manufacturer == "SepaReg" and ds.FrameOfReferenceUID == result.frame_of_reference_uid
    assert ds.pixel_array.dtype == np.int16 and float(ds.RescaleSlope) == 1.0
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([image.GetSpacing()[1], image.GetSpacing()[0]])
    assert len(set(ct.sop_instance_uids)) == 128
    # Same CT, same identifiers: the same UIDs (a re-export keeps its RTSTRUCT/SEG valid); the folder is replaced.
    again = write_ct_series(image, tmp_path / "ct_dicom")
    assert again.series_instance_uid == result.series_instance_uid and len(list(again.folder.iterdir())) == 128
    named = write_ct_series(image, tmp_path / "named", patient_name="Doe^Jane", patient_id="P-7")
    assert named.study_instance_uid != result.study_instance_uid
    assert pydicom.dcmread(next(named.folder.glob("*.dcm"))).PatientName == "Doe^Jane"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_dicom", "named"]  # no temporary folders left


def test_oblique_left_handed_and_fractional_volumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 3000, size=(6, 20, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.3, 2.7))
    image.SetOrigin((10.5, -20.25, 33.125))
    c, s = math.cos(0.3), math.sin(0.3)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, -1))  # rotated in-plane, slices running inferior: left-handed
    result = write_ct_series(image, tmp_path / "oblique")
    back = read_volume(result.folder)
    assert _same(back, dicom_grid(image))
    # dicom_grid reverses the slices only: every voxel keeps its physical position.
    assert np.allclose(back.TransformIndexToPhysicalPoint((3, 4, 0)), image.TransformIndexToPhysicalPoint((3, 4, 5)))
    floats = sitk.Cast(image, sitk.sitkFloat32) * 0.5
    rounded = write_ct_series(floats, tmp_path / "floats")
    assert not rounded.exact
    assert np.allclose(sitk.GetArrayFromImage(read_volume(rounded.folder)),
                       sitk.GetArrayFromImage(dicom_grid(floats)), atol=0.05)
    with pytest.raises(InputError, match="3D single-channel"):
        write_ct_series(sitk.Image(4, 4, sitk.sitkInt16), tmp_path / "flat")


def _openkbp_case(openkbp: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """pt_1's CT, its OAR label map and a segmentation.json beside it, as `separeg contour` writes it."""
    folder = tmp_path / "contour"
    folder.mkdir()
    shutil.copy(openkbp / "pt_1_oar.nii.gz", folder / "segmentation.nii.gz")
    table = load_label_table(openkbp / "labels.json")
    model = {"path": "/models/hn.separeg", "name": "hn", "sha256": "cd" * 32}
    description = {"separeg_version": "0.1.0", "model": model, "labels": [label.to_dict() for label in table]}
    (folder / "segmentation.json").write_text(json.dumps(description))
    return openkbp / "pt_1_ct.nii.gz", folder / "segmentation.nii.gz", folder / "segmentation.json"


def test_export_of_a_nifti_ct_writes_the_ct_series_seg_rtstruct_and_manifest(openkbp: Path, tmp_path: Path) -> None:
    ct, labelmap, _ = _openkbp_case(openkbp, tmp_path)
    sink = ListSink()
    result = run_export(ExportJob(labelmap=labelmap, ct=ct, out_dir=tmp_path / "out", patient_name="Test^Case"),
                        Events(sink))
    out = tmp_path / "out"
    assert set(result.outputs) == {"ct_dicom", "rtstruct", "seg", "nifti"}
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["outputs"] == {"ct_dicom": "ct_dicom", "rtstruct": "rtstruct.dcm", "seg": "seg.dcm",
                                   "nifti": "segmentation.nii.gz"}
    assert manifest["algorithm"] == {"name": "hn", "version": "0.1.0", "bundle_sha256": "cd" * 32}
    assert manifest["ct_dicom_written"] is True
    ct_series = read_ct_series(out / "ct_dicom")
    assert manifest["referenced_series_instance_uid"] == ct_series.series_instance_uid
    reference = sitk.GetArrayFromImage(read_volume(labelmap))
    table = load_label_table(openkbp / "labels.json")
    seg_back, unmatched = read_seg(out / "seg.dcm", ct_series).to_labelmap(table)
    assert np.array_equal(seg_back, reference) and unmatched == []
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.PatientName == "Test^Case" and seg.StudyInstanceUID == ct_series.study_instance_uid
    assert _same(read_volume(out / "segmentation.nii.gz"), read_volume(labelmap))
    from separeg.rt.rtstruct import read_rtstruct

    rt_back, unmatched = read_rtstruct(out / "rtstruct.dcm", ct_series).to_labelmap(table)
    assert unmatched == []
    for value in np.unique(reference[reference > 0]):  # polygons on a 3.9 mm grid: close, not voxel-exact
        a, b = reference == value, rt_back == value
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.85, table.by_value(int(value)).name
    assert sink.of_type(EventType.DONE)


def test_export_on_a_dicom_series_references_it(lung1: Path, lung1_subset: Path, tmp_path: Path) -> None:
    ct = read_ct_series(lung1_subset)
    labelmap = np.zeros(ct.shape, np.uint8)
    labelmap[2:6, 200:300, 150:250] = 1
    labelmap[1:7, 300:330, 240:270] = 2
    image = sitk.GetImageFromArray(labelmap)
    image.CopyInformation(read_volume(lung1_subset))
    sitk.WriteImage(image, str(tmp_path / "lm.nrrd"))
    (tmp_path / "labels.csv").write_text("value,name\n1,Lung-Left\n2,Spinal-Cord\n")
    result = run_export(ExportJob(labelmap=tmp_path / "lm.nrrd", ct=lung1_subset, out_dir=tmp_path / "out",
                                  labels=tmp_path / "labels.csv", formats=("seg",)))
    assert set(result.outputs) == {"seg"} and not (tmp_path / "out" / "ct_dicom").exists()
    # A label table without a model: manual contours, no algorithm named.
    assert result.series_instance_uid == ct.series_instance_uid and result.algorithm is None
    back = read_seg(result.outputs["seg"], ct)
    assert back.names == ["Lung_L", "SpinalCord"] and np.array_equal(back.masks[1], labelmap == 2)
    with pytest.raises(InputError, match="for a CT given as a NIfTI"):
        run_export(ExportJob(labelmap=tmp_path / "lm.nrrd", ct=lung1_subset, out_dir=tmp_path / "out",
                             labels=tmp_path / "labels.csv", patient_id="X"))


def test_export_errors_say_what_to_fix(openkbp: Path, tmp_path: Path) -> None:
    ct, labelmap, description = _openkbp_case(openkbp, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="not on the grid") as info:
        run_export(ExportJob(labelmap=labelmap, ct=openkbp / "pt_6_ct.nii.gz", out_dir=out))
    assert "spacing 2.734" in str(info.value) and "spacing 3.906" in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        run_export(ExportJob(labelmap=labelmap, ct=tmp_path / "missing", out_dir=out))
    (tmp_path / "two.csv").write_text("value,name\n1,Brainstem\n2,SpinalCord\n")
    with pytest.raises(InputError, match="values 3, 4, 7 that the label table does not list"):
        run_export(ExportJob(labelmap=labelmap, ct=ct, out_dir=out, labels=tmp_path / "two.csv"))
    description.unlink()
    with pytest.raises(InputError, match="no label table"):
        run_export(ExportJob(labelmap=labelmap, ct=ct, out_dir=out))
    with pytest.raises(InputError, match="unknown export format"):
        ExportJob(labelmap=labelmap, ct=ct, out_dir=out, formats=("png",))
    assert not out.exists()  # nothing written before the inputs are checked
