"""SepaRegSegment's logic where no scene is needed, with small fakes of the slicer API and real background runs.

Everything that touches MRML (loading, Auto-contour into a segmentation, evaluate, export, fine-tune from loaded
cases, correct-and-learn, segment naming) runs against Slicer's real MRML in test_slicer_real_scene.py and
test_slicer_real_modules.py (the slicer-core tier); Testing/README.md lists what stays fake-only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import SimpleITK as sitk
import slicer_fakes
from SepaRegSegmentLib.Logic import SegmentLogic
from SepaRegSegmentLib.Requests import FinetuneRequest, TrainingCase, matchSegments
from SepaRegSegmentLib.SceneIO import SceneIO

from separeg.runtime.background import RunState, Signal
from separeg.runtime.model_store import resolve_model

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
# Segment names as planners type them: matched to TG-263 through the synonym table.
SEGMENT_NAMES = {1: "Brainstem", 2: "Spinal Cord", 3: "Parotid R", 4: "Lt Parotid", 5: "Esophagus", 6: "Larynx",
                 7: "Mandible"}


@pytest.fixture()
def logic(monkeypatch, tmp_path: Path) -> SegmentLogic:
    slicer_fakes.install(monkeypatch)
    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "models"))
    logic = SegmentLogic(SceneIO(), workDir=tmp_path / "work", python=sys.executable)
    logic.importModel(resolve_model("hn-oar-7"), "tiny")  # the shipped starter model, installed as a user model
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


def test_models_are_listed_imported_and_exported(logic: SegmentLogic, tmp_path: Path) -> None:
    tiny_model = resolve_model("hn-oar-7")
    models = {m.name: m for m in logic.models()}  # the installed one, plus any shipped starter models
    model = models["tiny"]
    assert model.channels == ["CT"] and model.organNames[-1] == "Bone_Mandible" and "resnet18" in model.description
    with pytest.raises(Exception, match="already installed"):
        logic.importModel(tiny_model, "tiny")
    exported = logic.exportModel("tiny", tmp_path)
    assert exported.read_bytes() == tiny_model.read_bytes()
    with pytest.raises(ValueError, match="no installed model named 'nope'"):
        logic.model("nope")


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


def test_finetune_request_problems() -> None:
    problems = " ".join(FinetuneRequest(outDir=Path("x"), modelName="bad/name").problems())
    assert "add at least one training case" in problems and "name the model" in problems
    one = FinetuneRequest(outDir=Path("x"), modelName="m", cases=[case("pt_1")], organs=["Larynx"])
    assert "needs 2 cases" in " ".join(one.problems())


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


def test_a_model_that_found_no_organ_is_not_installed(tmp_path: Path) -> None:
    import torch
    from SepaRegSegmentLib.Requests import refuseUselessModel

    from separeg.runtime.bundle import save_bundle

    def bundle(name: str, validation: dict) -> Path:
        return save_bundle(tmp_path / f"{name}.separeg", kind="segmentation", architecture={"backbone": "x"},
                           state_dict={"w": torch.zeros(1)}, metadata={"validation": validation})

    with pytest.raises(ValueError, match="best validation DSC is 0 %.*not installed"):
        refuseUselessModel(bundle("useless", {"mean_dsc": 0.0, "on_training_data": False}))
    with pytest.raises(ValueError, match="best training DSC is 0 %"):
        refuseUselessModel(bundle("useless_train", {"mean_dsc": 0.0, "on_training_data": True}))
    refuseUselessModel(bundle("fine", {"mean_dsc": 0.41}))  # a model that found something is installed
