"""Real-MRML tier: SepaReg Segment's tasks on Slicer's real scene, module logics and ``slicer.util`` (slicer-core).

The module's own ``SepaRegSegmentLogic`` (constructed as the widget does) drives real background ``separeg`` runs;
volumes and segmentations are real MRML nodes, read and written by Slicer's real readers, writers and logics
(Testing/slicer_tier.py lists the few stand-ins). Checked against the core's own results voxel for voxel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SepaRegSegmentLib.Provenance import CONTOUR_MODEL_ATTRIBUTE
from SepaRegSegmentLib.Requests import TrainingCase
from test_slicer_hygiene import SceneDiff

from conftest import run_done as run

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
TINY = ("--steps-per-epoch", "2", "--batch-size", "2")
HN_OAR_7 = ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Bone_Mandible"]
TYPE_CODES = {"Brainstem": "119238007", "SpinalCord": "2748008", "Parotid_R": "45289007", "Parotid_L": "45289007",
              "Esophagus": "32849002", "Larynx": "4596009", "Bone_Mandible": "91609006"}


@pytest.fixture()
def logic(segment_logic):
    return segment_logic


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def core_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The core's (SimpleITK, LPS) geometry as Slicer's IJK-to-RAS: diag(-1, -1, 1) x (direction x spacing, origin)."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix


def segments(node) -> dict:
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i)
            for i in range(segmentation.GetNumberOfSegments())}


def test_volumes_load_with_the_core_geometry(real_slicer, logic, lung1_subset: Path, tmp_path: Path) -> None:
    """NIfTI, a DICOM series (non-zero origin) read by Slicer's reader, and a rotated copy: IJK-to-RAS and voxels
    as the core reads them; a volume written by the module (``exportNode``) reads back identically in the core."""
    from separeg.io.dicom_series import read_dicom_series
    from separeg.io.volumes import read_volume

    slicer = real_slicer
    dicom = read_dicom_series(lung1_subset)
    rotated = sitk.Image(dicom)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotated.SetDirection(tuple((rotation @ np.array(dicom.GetDirection()).reshape(3, 3)).ravel()))
    sitk.WriteImage(rotated, str(tmp_path / "rotated.nrrd"))
    files = sorted(str(p) for p in lung1_subset.glob("*.dcm"))
    loaded = {
        "nifti": (slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz")), read_volume(SAMPLES / "pt_1_ct.nii.gz")),
        "dicom": (slicer.util.loadVolume(files[0], {"fileNames": files}), dicom),
        "rotated": (slicer.util.loadVolume(str(tmp_path / "rotated.nrrd")), rotated),
    }
    assert np.abs(np.array(dicom.GetOrigin())).min() > 1  # a real patient position, not the origin
    for name, (node, image) in loaded.items():
        assert node.IsA("vtkMRMLScalarVolumeNode"), name
        np.testing.assert_allclose(ijk_to_ras(node), core_ijk_to_ras(image), atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image), name)
        written = read_volume(logic.scene.exportVolume(node, tmp_path / f"{name}_export.nii.gz"))
        np.testing.assert_allclose(core_ijk_to_ras(written), core_ijk_to_ras(image), atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image), name)


def test_auto_contour_with_hn_oar_7_then_evaluate(real_slicer, logic, tmp_path: Path) -> None:
    import vtk

    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_203_ct.nii.gz"))
    slicer.mrmlScene.GetSubjectHierarchyNode()
    diff = SceneDiff(slicer.mrmlScene)  # every node class, not only volumes (test_slicer_hygiene.py)
    result = run(logic, lambda: logic.autoContour(volume, "hn-oar-7", device="cpu"))
    node = result.outputs["segmentationNode"]
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetDisplayNode() is not None
    assert node.GetNodeReference("referenceImageGeometryRef") is volume
    diff.check("Auto-contour", node)  # no temporary label map, nor its display node, is left
    labels = logic.model("hn-oar-7").labels
    found = segments(node)
    assert [s.GetName() for s in found.values()] == HN_OAR_7 == [lb["tg263"] for lb in labels]
    for segment, label in zip(found.values(), labels, strict=True):
        np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in label["color"]], atol=1e-6)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")

    # terminology: parsed by Slicer's terminology logic and found in Slicer's DICOM master table (the type meaning
    # is blanked first; the table fills it back in)
    terminologies = slicer.modules.terminologies.logic()
    for segment in found.values():
        serialized = segment.GetTerminology()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(serialized, entry), serialized
        assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
        assert entry.GetTypeObject().GetCodeValue() == TYPE_CODES[segment.GetName()]
        meaning = entry.GetTypeObject().GetCodeMeaning()
        entry.GetTypeObject().SetCodeMeaning("?")
        assert terminologies.UpdateEntryFromLoadedTerminologies(entry, [], [])
        assert entry.GetTypeObject().GetCodeMeaning() == meaning, segment.GetName()
    sides = {s.GetName(): slicer.vtkSlicerTerminologyEntry() for s in found.values() if "Parotid" in s.GetName()}
    for segment in found.values():
        if segment.GetName() in sides:
            terminologies.DeserializeTerminologyEntry(segment.GetTerminology(), sides[segment.GetName()])
    assert {n: e.GetTypeModifierObject().GetCodeMeaning() for n, e in sides.items()} == {
        "Parotid_R": "Right", "Parotid_L": "Left"}

    # the segments are the core's label map, voxel for voxel, on the CT's grid; organs not found are empty
    core = sitk.ReadImage(str(result.outputs["folder"] / "segmentation.nii.gz"))
    written = sitk.GetArrayFromImage(core)
    reference = volume.GetImageData().GetDimensions()
    for sid, segment in found.items():
        value = HN_OAR_7.index(segment.GetName()) + 1
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
        assert mask.shape == written.shape == tuple(reversed(reference))
        np.testing.assert_array_equal(mask > 0, written == value, segment.GetName())
    empty = [s.GetName() for sid, s in found.items() if not slicer.util.arrayFromSegmentBinaryLabelmap(
        node, sid, volume).any()]
    assert empty == [lb["tg263"] for lb in result.outputs["labels"] if lb["volume_cc"] == 0]  # Esophagus here
    # an organ the model did not find is an empty segment (made certain: the same result without the brainstem)
    folder = tmp_path / "no brainstem"
    folder.mkdir()
    without = sitk.GetImageFromArray(np.where(written == 1, 0, written).astype(np.uint8))
    without.CopyInformation(core)
    sitk.WriteImage(without, str(folder / "segmentation.nii.gz"))
    shutil.copy(result.outputs["folder"] / "segmentation.json", folder / "segmentation.json")
    again = logic.scene.loadSegmentation(folder / "segmentation.nii.gz", folder / "segmentation.json", volume, "again")
    assert [name for _, name in logic.scene.segments(again)] == HN_OAR_7
    assert not logic.scene.segmentArray(again, logic.scene.segments(again)[0][0], volume).any()
    for sid in found:  # the internal labelmaps lie on the CT's voxel grid (same IJK-to-RAS, extent inside it)
        internal = node.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap")
        assert internal.IsA("vtkOrientedImageData")
        matrix = vtk.vtkMatrix4x4()
        internal.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)],
                                   ijk_to_ras(volume), atol=1e-6)
        extent, full = internal.GetExtent(), volume.GetImageData().GetExtent()
        assert all(full[2 * a] <= extent[2 * a] and extent[2 * a + 1] <= full[2 * a + 1] for a in range(3)) or \
            extent[1] < extent[0], (extent, full)

    # Evaluate against the reference label map as Slicer loads it (Segment_<value>): with no table beside the file,
    # refused with the hint (never named from the model by guess); named from the table the planner chose
    bare = tmp_path / "no table"
    bare.mkdir()
    shutil.copy(SAMPLES / "pt_203_oar.nii.gz", bare / "pt_203_oar.nii.gz")
    raw = logic.scene.loadSegmentationFile(bare / "pt_203_oar.nii.gz")
    with pytest.raises(ValueError, match="Segment_1, Segment_2.*choose the table those values follow"):
        logic.evaluate(node, raw, volume)
    rows = {r["organ"]: r for r in logic.evaluate(node, raw, volume, labels=labels)}
    reference_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_203_oar.nii.gz")))
    from separeg.evaluate.metrics import organ_metrics

    spacing = tuple(float(s) for s in volume.GetSpacing())
    for organ, row in rows.items():
        value = HN_OAR_7.index(organ) + 1
        expected = organ_metrics((written == value).astype("uint8"), (reference_labels == value).astype("uint8"),
                                 spacing, {1: organ})[0]
        assert row["status"] == expected.status, organ
        assert row["dsc"] == pytest.approx(None if expected.dsc is None else 100 * expected.dsc), organ
    assert set(rows) == {HN_OAR_7[v - 1] for v in np.unique(reference_labels) if v}  # organs in the reference
    assert max(row["dsc"] or 0 for row in rows.values()) > 50


def test_label_maps_get_organ_names_by_value(real_slicer, logic, tmp_path: Path) -> None:
    """Slicer names a label map's segments Segment_<value>; labels.json beside the file names them by organ."""
    raw = logic.scene.loadSegmentationFile(SAMPLES / "pt_1_oar.nii.gz")
    assert [name for _, name in logic.scene.segments(raw)] == ["Segment_1", "Segment_2", "Segment_3", "Segment_4",
                                                               "Segment_7"]
    named = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")  # labels.json is beside it
    assert [name for _, name in logic.scene.segments(named)] == ["Brainstem", "SpinalCord", "Parotid_R",
                                                                 "Parotid_L", "Bone_Mandible"]
    folder = tmp_path / "no table"
    folder.mkdir()
    shutil.copy(SAMPLES / "pt_1_oar.nii.gz", folder / "pt_1_oar.nii.gz")
    unnamed = logic.loadSegmentation(folder / "pt_1_oar.nii.gz")
    assert logic.scene.segments(unnamed)[0][1] == "Segment_1"
    with pytest.raises(ValueError, match="Segment_1, Segment_2, Segment_3, ... are the values of a label map"):
        logic.writeCase(TrainingCase("pt_1", None, unnamed), ["Parotid_L"], tmp_path)


def test_planner_segment_names_are_matched_through_synonyms(real_slicer, logic, tmp_path: Path) -> None:
    """Evaluate and the training-case writer pair "Lt Parotid" / "Mandible" with Parotid_L / Bone_Mandible."""
    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz"))
    prediction = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")  # TG-263 names from labels.json
    bare = tmp_path / "no table"  # a label map without a table beside it: only the planner's names
    bare.mkdir()
    shutil.copy(SAMPLES / "pt_1_oar.nii.gz", bare / "pt_1_oar.nii.gz")
    reference = logic.scene.loadSegmentationFile(bare / "pt_1_oar.nii.gz")
    logic.nameSegmentsByValue(reference, [{"value": 4, "name": "Lt Parotid"}, {"value": 7, "name": "Mandible"}])
    slicer.mrmlScene.GetSubjectHierarchyNode()
    count = slicer.mrmlScene.GetNumberOfNodes()
    rows = {r["organ"]: r for r in logic.evaluate(prediction, reference, volume)}
    assert slicer.mrmlScene.GetNumberOfNodes() == count  # no temporary node left behind
    assert set(rows) == {"Parotid_L", "Bone_Mandible"}
    assert rows["Parotid_L"]["reference"] == "Lt Parotid" and rows["Bone_Mandible"]["reference"] == "Mandible"
    for row in rows.values():
        assert row["dsc"] == pytest.approx(100.0) and row["hd95_mm"] == 0 and row["status"] == "ok"
    annotated = logic.writeCase(TrainingCase("pt_1", volume, reference), ["Parotid_L", "Parotid_R", "Bone_Mandible"],
                                tmp_path)
    assert annotated == ["Bone_Mandible", "Parotid_L"]  # Segment_3 (the right parotid) has no organ name here
    oar = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pt_1_oar.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz")))
    np.testing.assert_array_equal(oar, np.select([source == 4, source == 7], [1, 3], 0))  # values of the organ list
    assert slicer.mrmlScene.GetNumberOfNodes() == count


def test_export_from_scene_nodes_leaves_no_node_behind(real_slicer, logic, tmp_path: Path) -> None:
    import pydicom

    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz"))
    segmentation = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")
    slicer.mrmlScene.GetSubjectHierarchyNode()  # Slicer's singleton, made on first use
    count = slicer.mrmlScene.GetNumberOfNodes()
    out = tmp_path / "export é"
    run(logic, lambda: logic.export(segmentation, volume, out))
    assert slicer.mrmlScene.GetNumberOfNodes() == count
    rtstruct = pydicom.dcmread(out / "rtstruct.dcm")
    assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["Brainstem", "SpinalCord", "Parotid_R",
                                                                        "Parotid_L", "Bone_Mandible"]
    ct_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (out / "ct_dicom").rglob("*.dcm")}
    referenced = {item.ReferencedSOPInstanceUID for roi in rtstruct.ROIContourSequence for contour in
                  roi.ContourSequence for item in contour.ContourImageSequence}
    assert referenced and referenced <= ct_uids  # the volume had no DICOM: written as a new series first
    # contours Auto-contour did not make (here a label map loaded from a file) are manual: no algorithm named
    assert logic.contourOrigin(segmentation, volume) is None
    assert {roi.ROIGenerationAlgorithm for roi in rtstruct.StructureSetROISequence} == {"MANUAL"}
    assert not any("ROIGenerationDescription" in roi for roi in rtstruct.StructureSetROISequence)
    assert json.loads((out / "export.json").read_text())["algorithm"] is None
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz")))
    np.testing.assert_array_equal(written == 5, source == 7)  # Bone_Mandible: 5th segment, value 7 in the file


def test_export_of_auto_contours_names_the_model_until_a_planner_edits_them(real_slicer, logic, tmp_path: Path) -> None:
    """Auto-contour records its model on the segmentation node; Export then writes AUTOMATIC contours naming the
    model while the segments are the model's output, SEMIAUTOMATIC (still naming it) once a planner edited one."""
    import pydicom

    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_203_ct.nii.gz"))
    result = run(logic, lambda: logic.autoContour(volume, "hn-oar-7", device="cpu"))
    node = result.outputs["segmentationNode"]
    described = json.loads((result.outputs["folder"] / "segmentation.json").read_text())
    recorded = json.loads(node.GetAttribute(CONTOUR_MODEL_ATTRIBUTE))
    assert recorded == {"model": described["model"], "separeg_version": described["separeg_version"]}
    assert recorded["model"]["name"] == "hn-oar-7"

    def exported(out: Path) -> tuple[set, set, dict]:
        rtstruct = pydicom.dcmread(out / "rtstruct.dcm")
        rois = rtstruct.StructureSetROISequence
        return ({roi.ROIGenerationAlgorithm for roi in rois}, {roi.get("ROIGenerationDescription") for roi in rois},
                json.loads((out / "export.json").read_text()))

    count = slicer.mrmlScene.GetNumberOfNodes()
    run(logic, lambda: logic.export(node, volume, tmp_path / "unedited", seg=False))
    kinds, descriptions, manifest = exported(tmp_path / "unedited")
    assert kinds == {"AUTOMATIC"} and manifest["generation"] == "AUTOMATIC" and "notice" in manifest
    assert len(descriptions) == 1 and "hn-oar-7" in descriptions.pop()
    assert manifest["algorithm"]["name"] == "hn-oar-7"
    assert manifest["algorithm"]["bundle_sha256"] == described["model"]["sha256"]
    np.testing.assert_array_equal(  # what was exported is the core's label map, voxel for voxel
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "unedited" / "segmentation.nii.gz"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(result.outputs["folder"] / "segmentation.nii.gz"))))
    assert slicer.mrmlScene.GetNumberOfNodes() == count

    # a planner erases part of the left parotid (as Segment Editor's eraser leaves it: the segment's labelmap updated)
    [(sid, _)] = [(sid, name) for sid, name in logic.scene.segments(node) if name == "Parotid_L"]
    original = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
    edited = original.copy()
    edited[int(np.nonzero(original.any(axis=(1, 2)))[0].mean()):] = 0  # the upper half of its slices
    assert 0 < edited.sum() < original.sum()
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, node, sid, volume)
    assert logic.contourOrigin(node, volume).changes == ["Parotid_L edited"]
    run(logic, lambda: logic.export(node, volume, tmp_path / "edited", seg=False, nifti=False))
    kinds, descriptions, manifest = exported(tmp_path / "edited")
    assert kinds == {"SEMIAUTOMATIC"} and manifest["generation"] == "SEMIAUTOMATIC" and "notice" not in manifest
    assert len(descriptions) == 1 and "hn-oar-7" in descriptions.pop()
    assert manifest["algorithm"]["name"] == "hn-oar-7"
    # the edit undone: automatic again; a renamed, a removed or an added segment is an edit too
    slicer.util.updateSegmentBinaryLabelmapFromArray(original, node, sid, volume)
    assert logic.contourOrigin(node, volume).generation == "automatic"
    logic.scene.renameSegment(node, sid, "Lt Parotid")
    node.GetSegmentation().RemoveSegment(logic.scene.segments(node)[0][0])
    node.GetSegmentation().AddEmptySegment("GTV", "GTV")
    assert logic.contourOrigin(node, volume).changes == ["Parotid_L renamed Lt Parotid", "GTV added",
                                                        "Brainstem removed"]


def test_correct_and_learn_on_real_nodes(real_slicer, logic, tmp_path: Path) -> None:
    """Corrected cases (label maps as Slicer loads them: Segment_<value>) go into the model's training set named
    by the model's table; Update model fine-tunes the installed model on them and keeps the previous version."""
    from separeg.runtime.model_store import resolve_model

    slicer = real_slicer
    logic.importModel(resolve_model("hn-oar-7"), "hn-oar-7 local")
    for name in ("pt_1", "pt_22"):
        volume = slicer.util.loadVolume(str(SAMPLES / f"{name}_ct.nii.gz"))
        segmentation = logic.scene.loadSegmentationFile(SAMPLES / f"{name}_oar.nii.gz")  # Segment_1 ...
        logic.addToTrainingSet(volume, segmentation, "hn-oar-7 local")
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(logic.trainingSetDir("hn-oar-7 local")
                                                           / f"{name}_ct_oar.nii.gz")))  # volume "pt_1_ct"
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / f"{name}_oar.nii.gz")))
        np.testing.assert_array_equal(stored, source)  # same values: the model's table is the file's
    logic.addToTrainingSet(volume, segmentation, "hn-oar-7 local")  # the same name again: stored as a new case
    assert [p.name for p in logic.trainingSet("hn-oar-7 local")] == ["pt_1_ct_ct.nii.gz", "pt_22_ct_2_ct.nii.gz",
                                                                     "pt_22_ct_ct.nii.gz"]
    table = json.loads((logic.trainingSetDir("hn-oar-7 local") / "labels.json").read_text())
    assert [lb["tg263"] for lb in table["labels"]] == HN_OAR_7
    model = logic.model("hn-oar-7 local")
    before = model.path.read_bytes()
    run(logic, lambda: logic.updateModel("hn-oar-7 local", epochs=1, device="cpu", extraArgs=TINY))
    assert model.path.read_bytes() != before
    assert model.path.with_name(f"{model.path.stem}.previous.separeg.bak").read_bytes() == before


def test_label_maps_are_named_from_the_table_that_travels_with_them(real_slicer, logic, tmp_path: Path) -> None:
    """Label maps loaded by Slicer's own loader (File > Add Data: Segment_<value>) are named from the table beside
    their file (labels.json, or the segmentation.json of ``separeg contour``), not from the model's table by guess;
    with none, Add to training set asks for one."""
    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz"))
    source = sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz"))
    values = sitk.GetArrayFromImage(source)
    other = tmp_path / "other table"  # the same label map, with values that do not follow hn-oar-7's table
    other.mkdir()
    shutil.copy(SAMPLES / "pt_1_oar.nii.gz", other / "pt_1_oar.nii.gz")
    (other / "labels.json").write_text(json.dumps({"1": "Parotid_L", "2": "Brainstem", "3": "Bone_Mandible",
                                                   "4": "SpinalCord", "7": "Parotid_R"}))
    loaded = slicer.util.loadSegmentation(str(other / "pt_1_oar.nii.gz"))
    assert logic.scene.segments(loaded)[0][1] == "Segment_1"
    logic.addToTrainingSet(volume, loaded, "hn-oar-7")
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(logic.trainingSetDir("hn-oar-7") / "pt_1_ct_oar.nii.gz")))
    model = {name: i + 1 for i, name in enumerate(HN_OAR_7)}  # the case's values follow the model's organs
    np.testing.assert_array_equal(stored, np.select(
        [values == 1, values == 2, values == 3, values == 4, values == 7],
        [model["Parotid_L"], model["Brainstem"], model["Bone_Mandible"], model["SpinalCord"], model["Parotid_R"]], 0))

    contour = tmp_path / "contour result"  # the core's contour output: segmentation.json describes the values
    contour.mkdir()
    result = sitk.GetImageFromArray(np.select([values == 4, values == 7], [1, 2], 0).astype(np.uint8))
    result.CopyInformation(source)
    sitk.WriteImage(result, str(contour / "segmentation.nii.gz"))
    (contour / "segmentation.json").write_text(json.dumps({"labels": [
        {"value": 1, "name": "Parotid_L", "tg263": "Parotid_L"}, {"value": 2, "name": "Mandible",
                                                                  "tg263": "Bone_Mandible"}]}))
    prediction = slicer.util.loadSegmentation(str(contour / "segmentation.nii.gz"))
    reference = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")
    rows = {r["organ"]: r["dsc"] for r in logic.evaluate(prediction, reference, volume)}
    assert rows == {"Parotid_L": pytest.approx(100.0), "Bone_Mandible": pytest.approx(100.0)}

    bare = tmp_path / "no table"
    bare.mkdir()
    shutil.copy(SAMPLES / "pt_1_oar.nii.gz", bare / "pt_1_oar.nii.gz")
    unnamed = slicer.util.loadSegmentation(str(bare / "pt_1_oar.nii.gz"))
    with pytest.raises(ValueError, match="Segment_1, Segment_2, Segment_3, ... are the values of a label map .*"
                                         "choose the table those values follow"):
        logic.addToTrainingSet(volume, unnamed, "hn-oar-7")
    logic.addToTrainingSet(volume, unnamed, "hn-oar-7", labels=SAMPLES / "labels.json")  # the planner's choice


def test_an_export_into_a_used_folder_says_what_the_folder_now_holds(real_slicer, logic, tmp_path: Path) -> None:
    """One folder, one result: exporting again into a folder (NIfTI only now) leaves none of the earlier RTSTRUCT,
    SEG or CT series beside it (the core removes them), and the task's message, which the panel shows, names only
    what this export wrote."""
    slicer = real_slicer
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz"))
    segmentation = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")
    out = tmp_path / "export"
    first = run(logic, lambda: logic.export(segmentation, volume, out))
    assert {"rtstruct.dcm", "seg.dcm", "ct_dicom"} <= {p.name for p in out.iterdir()}
    assert "rtstruct.dcm" in first.message
    second = run(logic, lambda: logic.export(segmentation, volume, out, rtstruct=False, seg=False))
    assert {p.name for p in out.iterdir()} == {"segmentation.nii.gz", "export.json"}
    assert second.message == f"wrote segmentation.nii.gz in {out}; manifest export.json"
