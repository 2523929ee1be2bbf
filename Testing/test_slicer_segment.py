"""SepaRegSegment's logic and scene adapter with fakes of the slicer API and real background ``separeg`` runs."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer_fakes
from SepaRegSegmentLib.Logic import FinetuneRequest, SegmentLogic, TrainingCase, matchSegments
from SepaRegSegmentLib.SceneIO import SceneIO

from separeg.background import RunState, Signal
from separeg.finetune import FinetuneConfig, FinetuneJob, run_finetune

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
TINY = FinetuneConfig(encoder="resnet18", epochs=1, steps_per_epoch=2, batch_size=2, validation_cases=1)
TINY_ARGS = ("--encoder", "resnet18", "--steps-per-epoch", "2", "--batch-size", "2")
# Segment names as planners type them: matched to TG-263 through the synonym table.
SEGMENT_NAMES = {1: "Brainstem", 2: "Spinal Cord", 3: "Parotid R", 4: "Lt Parotid", 5: "Esophagus", 6: "Larynx",
                 7: "Mandible"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("cases")
    for name in ("pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "pt_22_ct.nii.gz", "pt_22_oar.nii.gz", "labels.json"):
        shutil.copy(SAMPLES / name, data / name)
    return run_finetune(FinetuneJob(data=data, out_dir=tmp_path_factory.mktemp("model"), config=TINY, device="cpu"))


@pytest.fixture()
def logic(monkeypatch, tmp_path: Path, tiny_model: Path) -> SegmentLogic:
    slicer_fakes.install(monkeypatch)
    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "models"))
    logic = SegmentLogic(SceneIO(), workDir=tmp_path / "work", python=sys.executable)
    logic.importModel(tiny_model, "tiny")
    return logic


def case(name: str) -> TrainingCase:
    volume = slicer_fakes.FakeVolumeNode(name, sitk.ReadImage(str(SAMPLES / f"{name}_ct.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / f"{name}_oar.nii.gz")))
    masks = {segment: labels == value for value, segment in SEGMENT_NAMES.items() if (labels == value).any()}
    return TrainingCase(name, volume, slicer_fakes.make_segmentation(f"{name} reference", volume, masks))


def run(logic: SegmentLogic, start) -> list:
    results = []
    logic.finished.connect(results.append)
    start()
    deadline = time.monotonic() + 600
    while not results:
        logic.poll()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return results


def test_models_are_listed_imported_and_exported(logic: SegmentLogic, tmp_path: Path, tiny_model: Path) -> None:
    models = {m.name: m for m in logic.models()}  # the installed one, plus any shipped starter models
    model = models["tiny"]
    assert model.channels == ["CT"] and model.organNames[-1] == "Bone_Mandible" and "resnet18" in model.description
    with pytest.raises(Exception, match="already installed"):
        logic.importModel(tiny_model, "tiny")
    exported = logic.exportModel("tiny", tmp_path)
    assert exported.read_bytes() == tiny_model.read_bytes()
    with pytest.raises(ValueError, match="no installed model named 'nope'"):
        logic.model("nope")


def test_auto_contour_gives_named_coloured_segments(logic: SegmentLogic) -> None:
    import slicer  # the fake

    volume = case("pt_203").volumeNode
    [result] = run(logic, lambda: logic.autoContour(volume, "tiny", device="cpu"))
    assert result.state is RunState.DONE, result.message
    node = result.outputs["segmentationNode"]
    bundle_labels = logic.model("tiny").labels
    segments = node.GetSegmentation().segments
    assert [s.GetName() for s in segments.values()] == [lb["tg263"] for lb in bundle_labels]
    assert [s.color for s in segments.values()] == [tuple(c / 255 for c in lb["color"]) for lb in bundle_labels]
    mandible = next(s for s in segments.values() if s.GetName() == "Bone_Mandible")
    assert mandible.terminology.split("~")[2] == "SCT^91609006^Mandible"
    assert node.reference is volume and node.displayed and node.surface
    assert slicer.mrmlScene.nodes == [node]  # the temporary label map node is gone
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(result.outputs["folder"] / "segmentation.nii.gz")))
    for sid, segment in segments.items():
        value = next(lb["value"] for lb in bundle_labels if lb["tg263"] == segment.GetName())
        mask = node.GetSegmentation().masks.get(sid, np.zeros_like(written))
        np.testing.assert_array_equal(mask > 0, written == value)


def test_auto_contour_passes_one_volume_per_model_channel(logic: SegmentLogic, monkeypatch) -> None:
    volume = case("pt_203").volumeNode
    with pytest.raises(ValueError, match=r"tiny takes 1 co-registered volume\(s\) \(CT\), in that order; 2 given"):
        logic.autoContour(volume, "tiny", "cpu", extraVolumeNodes=[volume])
    model = logic.model("tiny")
    monkeypatch.setattr(logic, "model", lambda name: replace(model, channels=["T1", "T2"]))
    started = []
    monkeypatch.setattr(logic, "_start", lambda task, command, args, onDone, **kw: started.append(args))
    logic.autoContour(volume, "tiny", "cpu", extraVolumeNodes=[volume])
    [args] = started
    assert [Path(a).name for a in args[:2]] == ["ct.nii.gz", "channel2.nii.gz"] and args[2] == "--model"


def test_a_failed_run_shows_the_core_message(logic: SegmentLogic) -> None:
    thin = sitk.Image(64, 64, 2, sitk.sitkInt16)
    [result] = run(logic, lambda: logic.autoContour(slicer_fakes.FakeVolumeNode("thin", thin), "tiny", "cpu"))
    assert result.state is RunState.FAILED
    assert "2 slice" in result.message


def test_segment_names_are_matched_through_synonyms() -> None:
    organs = ["Parotid_L", "Parotid_R", "Bone_Mandible", "Liver"]
    assert matchSegments(["Lt Parotid", "Parotid R", "Mandible", "GTV", "L Parotid"], organs) == {
        "Lt Parotid": "Parotid_L", "Parotid R": "Parotid_R", "Mandible": "Bone_Mandible"}


def test_finetune_from_loaded_cases_then_correct_and_learn(logic: SegmentLogic, tmp_path: Path) -> None:
    cases = [case("pt_1"), case("pt_22")]
    organs = ["Parotid_L", "Parotid_R", "Bone_Mandible"]
    request = FinetuneRequest(outDir=tmp_path / "ft", modelName="parotids", cases=cases, organs=organs, epochs=1,
                              device="cpu", extraArgs=TINY_ARGS)
    [result] = run(logic, lambda: logic.finetune(request))
    assert result.state is RunState.DONE, result.message
    model = logic.model("parotids")
    assert model.organNames == organs and result.outputs["model"] == model.path
    oar = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ft" / "data" / "pt_1_oar.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz")))
    np.testing.assert_array_equal(oar == 3, reference == 7)  # Mandible segment -> Bone_Mandible, value 3

    with pytest.raises(ValueError, match="has 0 case"):
        logic.updateModel("parotids")
    for c in cases:
        logic.addToTrainingSet(c.volumeNode, c.segmentationNode, "parotids")
    assert [p.name for p in logic.trainingSet("parotids")] == ["pt_1_ct.nii.gz", "pt_22_ct.nii.gz"]
    before = model.path.read_bytes()
    [update] = run(logic, lambda: logic.updateModel("parotids", epochs=1, device="cpu"))
    assert update.state is RunState.DONE, update.message
    assert logic.model("parotids").path.read_bytes() != before
    assert model.path.with_name("parotids.previous.separeg.bak").read_bytes() == before


def test_finetune_request_problems() -> None:
    problems = " ".join(FinetuneRequest(outDir=Path("x"), modelName="bad/name").problems())
    assert "add at least one training case" in problems and "name the model" in problems
    one = FinetuneRequest(outDir=Path("x"), modelName="m", cases=[case("pt_1")], organs=["Larynx"])
    assert "needs 2 cases" in " ".join(one.problems())


def test_evaluate_pairs_segments_by_organ(logic: SegmentLogic) -> None:
    reference = case("pt_1")
    prediction = slicer_fakes.make_segmentation("pred", reference.volumeNode, {
        "Bone_Mandible": reference.segmentationNode.segmentation.masks["Mandible"] > 0,
        "Parotid_L": np.zeros_like(reference.segmentationNode.segmentation.masks["Mandible"], bool)})
    rows = {r["organ"]: r for r in logic.evaluate(prediction, reference.segmentationNode, reference.volumeNode)}
    assert rows["Bone_Mandible"]["dsc"] == pytest.approx(100.0) and rows["Bone_Mandible"]["hd95_mm"] == 0
    assert rows["Parotid_L"]["reference"] == "Lt Parotid" and rows["Parotid_L"]["status"] == "missed"
    other = slicer_fakes.make_segmentation("other", reference.volumeNode, {"Liver": np.zeros((2, 2, 2), bool)})
    with pytest.raises(ValueError, match="no segment name matches"):
        logic.evaluate(other, reference.segmentationNode, reference.volumeNode)


def test_labels_json_written_for_the_training_set(logic: SegmentLogic) -> None:
    c = case("pt_1")
    logic.addToTrainingSet(c.volumeNode, c.segmentationNode, "tiny")
    logic.addToTrainingSet(c.volumeNode, c.segmentationNode, "tiny")  # same name twice: stored as a new case
    folder = logic.trainingSetDir("tiny")
    assert sorted(p.name for p in folder.glob("*_ct.nii.gz")) == ["pt_1_2_ct.nii.gz", "pt_1_ct.nii.gz"]
    table = json.loads((folder / "labels.json").read_text())
    assert [lb["tg263"] for lb in table["labels"]] == logic.model("tiny").organNames


def test_export_writes_rtstruct_seg_and_nifti_referencing_a_new_ct_series(logic: SegmentLogic, tmp_path: Path) -> None:
    import pydicom

    c = case("pt_1")
    out = tmp_path / "export é"
    [result] = run(logic, lambda: logic.export(c.segmentationNode, c.volumeNode, out))
    assert result.state is RunState.DONE, result.message
    rtstruct = pydicom.dcmread(out / "rtstruct.dcm")
    names = [roi.ROIName for roi in rtstruct.StructureSetROISequence]
    assert {"Parotid_L", "Parotid_R", "Bone_Mandible", "SpinalCord"} <= set(names)  # TG-263 from planners' names
    ct_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (out / "ct_dicom").rglob("*.dcm")}
    referenced = {item.ReferencedSOPInstanceUID for roi in rtstruct.ROIContourSequence for contour in
                  roi.ContourSequence for item in contour.ContourImageSequence}
    assert referenced and referenced <= ct_uids
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    mandible = next(i + 1 for i, name in enumerate(c.segmentationNode.segmentation.segments) if name == "Mandible")
    np.testing.assert_array_equal(written == mandible, c.segmentationNode.segmentation.masks["Mandible"] > 0)


def test_unlabelled_folder_adds_mean_teacher_to_the_command(monkeypatch, tmp_path: Path) -> None:
    slicer_fakes.install(monkeypatch)
    commands = []

    class Recorded:
        def __init__(self, command, **_):
            commands.append([str(c) for c in command])
            self.event, self.finished = Signal(object), Signal(object, str)

        def start(self):
            pass

    logic = SegmentLogic(SceneIO(), workDir=tmp_path, python=sys.executable, runFactory=Recorded)
    request = FinetuneRequest(outDir=tmp_path / "ft", modelName="m", dataFolder=SAMPLES, unlabelled=tmp_path)
    logic.finetune(request)
    command = commands[-1]
    assert command[command.index("--unlabelled") + 1] == str(tmp_path) and "--mean-teacher" in command
    missing = FinetuneRequest(outDir=tmp_path, modelName="m", dataFolder=SAMPLES, unlabelled=tmp_path / "nowhere")
    assert "unlabelled CT folder" in " ".join(missing.problems())
