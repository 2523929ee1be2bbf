"""DICOM exports a PACS or planning system can trust, checked from outside.

- dciodvfy (Debian ``dicom3tools``) on every exported object, RTSTRUCT, SEG and each written CT slice, of an OpenKBP
  NIfTI export and a LUNG1 DICOM export: no errors (skipped when dciodvfy is not installed; ``make test`` installs
  it where apt-get can).
- plastimatch (Debian ``plastimatch``) rasterises our RTSTRUCTs independently: keyhole holes read back exactly;
  separate (even-odd) holes are filled by its OR of contours, which is why the convention is documented.
- Without the tools, the attributes dciodvfy missed before are checked directly, and the determinism of written CT
  series and the MANUAL/AUTOMATIC generation type are checked with pydicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from separeg.io.dicom_ct import Algorithm, read_ct_series
from separeg.io.dicom_write import write_ct_series
from separeg.rt.export import ExportJob, run_export
from separeg.rt.keyhole import keyhole, nesting
from separeg.rt.labels import LabelTable, load_label_table
from separeg.rt.rtstruct import read_rtstruct
from separeg.rt.rtstruct_write import _slice_contours, write_rtstruct

DCIODVFY = shutil.which("dciodvfy")
PLASTIMATCH = shutil.which("plastimatch")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
needs_plastimatch = pytest.mark.skipif(PLASTIMATCH is None, reason="plastimatch is not installed")
MODEL = Algorithm("hn", "0.1.0", "cd" * 32)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for one DICOM file."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _openkbp_export(openkbp: Path, out: Path, *, model: bool = True, **job) -> Path:
    """pt_1's OAR label map exported on its NIfTI CT (``segmentation.json`` naming a model, or a plain label table)."""
    folder = out.parent / f"{out.name}_in"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(openkbp / "pt_1_oar.nii.gz", folder / "segmentation.nii.gz")
    table = load_label_table(openkbp / "labels.json")
    description = {"labels": [label.to_dict() for label in table]}
    if model:
        model_card = {"name": "hn", "path": "/m/hn.separeg", "sha256": "cd" * 32}
        description |= {"separeg_version": "0.1.0", "model": model_card}
    (folder / "segmentation.json").write_text(json.dumps(description))
    run_export(ExportJob(labelmap=folder / "segmentation.nii.gz", ct=openkbp / "pt_1_ct.nii.gz", out_dir=out, **job))
    return out


@pytest.fixture(scope="module")
def lung1_export(lung1: Path, tmp_path_factory) -> Path:
    """The clinical LUNG1 RTSTRUCT imported and exported again on its DICOM CT (no model: manual contours)."""
    tmp = tmp_path_factory.mktemp("lung1_export")
    ct = read_ct_series(lung1 / "ct")
    rois = read_rtstruct(next((lung1 / "rtstruct").glob("*.dcm")), ct).rois
    labelmap = np.zeros(ct.shape, np.uint8)
    for value, roi in enumerate(rois, start=1):
        labelmap[roi.mask] = value
    image = sitk.GetImageFromArray(labelmap)
    image.CopyInformation(ct.image())
    sitk.WriteImage(image, str(tmp / "lm.nrrd"))
    (tmp / "labels.csv").write_text("value,name\n" + "".join(f"{v},{r.name}\n" for v, r in enumerate(rois, 1)))
    run_export(ExportJob(labelmap=tmp / "lm.nrrd", ct=lung1 / "ct", out_dir=tmp / "out", labels=tmp / "labels.csv",
                         formats=("rtstruct", "seg")))
    return tmp / "out"


# ----------------------------------------------------------------------------------------------- dciodvfy


@needs_dciodvfy
def test_dciodvfy_finds_no_error_in_an_openkbp_nifti_export(openkbp: Path, tmp_path: Path) -> None:
    out = _openkbp_export(openkbp, tmp_path / "out")
    objects = [out / "rtstruct.dcm", out / "seg.dcm", *sorted((out / "ct_dicom").glob("*.dcm"))]
    assert len(objects) == 2 + 128
    errors = {path.name: found for path in objects if (found := dciodvfy_errors(path))}
    assert errors == {}


@needs_dciodvfy
def test_dciodvfy_finds_no_error_in_a_lung1_dicom_export(lung1_export: Path) -> None:
    # LUNG1's CT declares PatientIdentityRemoved YES without a method; the exports must not inherit that error.
    errors = {name: found for name in ("rtstruct.dcm", "seg.dcm") if (found := dciodvfy_errors(lung1_export / name))}
    assert errors == {}


def test_the_attributes_dciodvfy_asked_for(openkbp: Path, lung1_export: Path, tmp_path: Path) -> None:
    out = _openkbp_export(openkbp, tmp_path / "out", formats=("rtstruct",))
    ct = read_ct_series(out / "ct_dicom")
    for rtstruct in (out / "rtstruct.dcm", lung1_export / "rtstruct.dcm"):
        ds = pydicom.dcmread(rtstruct)
        # Frame of Reference module (Type 1 UID, Type 2 indicator), a series number, no one-word person names.
        assert ds.FrameOfReferenceUID == ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
        assert "PositionReferenceIndicator" in ds and int(ds.SeriesNumber) > 0
        assert all(str(o.ROIInterpreter) == "" for o in ds.RTROIObservationsSequence)
    assert ds.DeidentificationMethod  # LUNG1: identity removed, method not recorded in the source
    header = ct.header()
    assert "Laterality" in header and "^" in str(header.PatientName)


# ----------------------------------------------------------------------------------------------- UIDs


def test_a_second_export_gives_identical_ct_files_and_new_rtstruct_and_seg_uids(openkbp: Path,
                                                                               tmp_path: Path) -> None:
    first = _openkbp_export(openkbp, tmp_path / "first")
    second = _openkbp_export(openkbp, tmp_path / "second")
    # The written CT: same UIDs and byte-identical files (no time of writing inside), never two objects, one UID.
    names = sorted(p.name for p in (first / "ct_dicom").iterdir())
    assert len(names) == 128 and names == sorted(p.name for p in (second / "ct_dicom").iterdir())
    for name in names:
        assert (first / "ct_dicom" / name).read_bytes() == (second / "ct_dicom" / name).read_bytes(), name
    header = pydicom.dcmread(first / "ct_dicom" / names[0])
    assert not any(k in header for k in ("SeriesDate", "SeriesTime", "ContentDate", "ContentTime"))
    # RTSTRUCT and SEG: new objects each time, so all-new instance and series UIDs.
    for name in ("rtstruct.dcm", "seg.dcm"):
        a, b = pydicom.dcmread(first / name), pydicom.dcmread(second / name)
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID, name
        assert a.StudyInstanceUID == b.StudyInstanceUID == header.StudyInstanceUID, name
    # Another CT content or other identifiers: other UIDs.
    image = sitk.ReadImage(str(openkbp / "pt_1_ct.nii.gz"))
    named = write_ct_series(image, tmp_path / "named", patient_id="P-7")
    assert named.series_instance_uid != header.SeriesInstanceUID


# ----------------------------------------------------------------------------------------------- generation type


def test_contours_without_a_model_are_manual_and_carry_no_ai_notice(openkbp: Path, tmp_path: Path) -> None:
    manual = _openkbp_export(openkbp, tmp_path / "manual", model=False, formats=("rtstruct", "seg"))
    rt, seg = pydicom.dcmread(manual / "rtstruct.dcm"), pydicom.dcmread(manual / "seg.dcm")
    assert {r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence} == {"MANUAL"}
    assert not any("ROIGenerationDescription" in r for r in rt.StructureSetROISequence)
    text = str(rt) + str(seg)
    assert "not reviewed" not in text and "Automatic" not in text and "Artificial Intelligence" not in text
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"MANUAL"}
    assert not any("SegmentationAlgorithmIdentificationSequence" in s for s in seg.SegmentSequence)
    manifest = json.loads((manual / "export.json").read_text())
    assert manifest["generation"] == "MANUAL" and manifest["algorithm"] is None and "notice" not in manifest

    auto = _openkbp_export(openkbp, tmp_path / "auto", formats=("rtstruct", "seg"))
    rt, seg = pydicom.dcmread(auto / "rtstruct.dcm"), pydicom.dcmread(auto / "seg.dcm")
    assert {r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence} == {"AUTOMATIC"}
    assert "not reviewed by a clinician" in rt.RTROIObservationsSequence[0].ROIObservationDescription
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
    assert json.loads((auto / "export.json").read_text())["notice"]

    edited = _openkbp_export(openkbp, tmp_path / "edited", formats=("rtstruct", "seg"), generation="semiautomatic")
    rt, seg = pydicom.dcmread(edited / "rtstruct.dcm"), pydicom.dcmread(edited / "seg.dcm")
    assert {r.ROIGenerationAlgorithm for r in rt.StructureSetROISequence} == {"SEMIAUTOMATIC"}
    assert "not reviewed" not in str(rt) and {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    from separeg.runtime.errors import InputError

    with pytest.raises(InputError, match="need the model that made them"):
        _openkbp_export(openkbp, tmp_path / "bad", model=False, generation="automatic")


# ----------------------------------------------------------------------------------------------- holes


def _holey_mask() -> np.ndarray:
    """(z, y, x) masks with holes: a ring, two holes side by side, an island inside a hole, a hole left of a hole."""
    mask = np.zeros((3, 48, 56), bool)
    mask[0, 4:30, 4:30] = True
    mask[0, 10:20, 10:20] = False  # ring
    mask[0, 13:16, 13:16] = True  # island in its hole
    mask[1, 4:44, 4:52] = True
    mask[1, 8:14, 30:40] = False  # hole to the right ...
    mask[1, 9:13, 10:18] = False  # ... and one left of it at the same rows: its cut meets the first hole
    mask[1, 30:36, 20:26] = False
    mask[1, 33, 36] = False  # a one-voxel hole
    mask[2, 20:40, 10:30] = True  # no hole
    return mask


def test_keyhole_joins_every_hole_to_its_outer_contour() -> None:
    mask = _holey_mask()
    from separeg.rt.raster import fill_slice

    for k in range(mask.shape[0]):
        contours = _slice_contours(mask[k])
        parents = nesting(contours)
        joined = keyhole(contours)
        outer = sum(1 for i, p in enumerate(parents) if p == -1 or parents[p] != -1)  # outer boundaries and islands
        assert len(joined) == outer
        # Filled one polygon at a time and OR-ed (what plastimatch does), the keyhole contours give the mask.
        filled = np.zeros(mask.shape[1:], bool)
        for polygon in joined:
            y0, x0, part = fill_slice([polygon], *mask.shape[1:])
            filled[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] |= part
        assert np.array_equal(filled, mask[k]), k


def _synthetic_ct(tmp_path: Path, shape: tuple[int, int, int]):
    image = sitk.GetImageFromArray(np.full(shape, -1000, np.int16))
    image.SetSpacing((1.25, 1.25, 3.0))
    image.SetOrigin((-30.0, -20.0, 5.0))
    return read_ct_series(write_ct_series(image, tmp_path / "ct").folder)


def test_both_hole_conventions_read_back_exactly_here(tmp_path: Path) -> None:
    mask = _holey_mask()
    ct = _synthetic_ct(tmp_path, mask.shape)
    table = LabelTable.from_names(["Liver"])
    for holes in ("separate", "keyhole"):
        path = write_rtstruct(tmp_path / f"{holes}.dcm", mask.astype(np.uint8), table, ct, algorithm=MODEL,
                              holes=holes)
        back = read_rtstruct(path, ct).rois[0].mask
        assert np.array_equal(back, mask), holes
        ds = pydicom.dcmread(path)
        assert holes.replace("separate", "even-odd") in ds.StructureSetDescription
        counts = len(ds.ROIContourSequence[0].ContourSequence)
        assert counts == (9 if holes == "separate" else 4), holes  # slice 0: 3 or 2, slice 1: 5 or 1, slice 2: 1


def _plastimatch(rtstruct: Path, ct_folder: Path, out: Path) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation of each ROI, ``(z, y, x)`` bool on the CT's grid."""
    subprocess.run([PLASTIMATCH, "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_folder),
                    "--output-prefix", str(out), "--prefix-format", "nrrd"], check=True, capture_output=True,
                   timeout=300)
    return {p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0 for p in out.glob("*.nrrd")}


@needs_plastimatch
def test_plastimatch_reads_keyhole_holes_and_fills_separate_ones(tmp_path: Path) -> None:
    mask = _holey_mask()
    ct = _synthetic_ct(tmp_path, mask.shape)
    table = LabelTable.from_names(["Liver"])
    got = {}
    for holes in ("separate", "keyhole"):
        path = write_rtstruct(tmp_path / f"{holes}.dcm", mask.astype(np.uint8), table, ct, algorithm=MODEL,
                              holes=holes)
        got[holes] = _plastimatch(path, ct.folder, tmp_path / f"pm_{holes}")["Liver"]
    assert np.array_equal(got["keyhole"], mask)
    from scipy import ndimage

    filled = np.stack([ndimage.binary_fill_holes(m) for m in mask])  # OR of contours: holes filled, islands too
    assert np.array_equal(got["separate"], filled) and filled.sum() > mask.sum()


@needs_plastimatch
def test_plastimatch_cross_check_of_the_lung1_export(lung1: Path, tmp_path: Path) -> None:
    """Every organ of LUNG1, exported with keyhole holes, comes back from plastimatch as our masks."""
    ct = read_ct_series(lung1 / "ct")
    rois = read_rtstruct(next((lung1 / "rtstruct").glob("*.dcm")), ct).rois
    table = LabelTable.from_names([r.name for r in rois])
    masks = {label.tg263 or label.name: roi.mask for label, roi in zip(table, rois, strict=True)}
    from separeg.rt.rtstruct_write import write_rtstruct_masks

    path = write_rtstruct_masks(tmp_path / "rt.dcm", masks, ct, algorithm=None, holes="keyhole")
    back = _plastimatch(path, ct.folder, tmp_path / "pm")
    for name, mask in masks.items():
        differ = int(np.count_nonzero(back[name] != mask))
        print(f"plastimatch vs SepaReg {name}: {mask.sum()} voxels, {differ} differ")
        assert differ <= 1e-4 * mask.sum() + 2, name
