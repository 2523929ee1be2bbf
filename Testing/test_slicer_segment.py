"""SepaRegSegment's logic where no scene is needed, with small fakes of the slicer API and real background runs.

Everything that touches MRML (loading, Auto-contour into a segmentation, evaluate, export, fine-tune from loaded
cases, correct-and-learn, segment naming) runs against Slicer's real MRML in test_slicer_real_scene.py and
test_slicer_real_modules.py (the slicer-core tier); Testing/README.md lists what stays fake-only.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import SimpleITK as sitk
import slicer_fakes
from SepaRegSegmentLib.Logic import SegmentLogic
from SepaRegSegmentLib.Requests import FinetuneRequest, TrainingCase, matchSegments
from SepaRegSegmentLib.SceneIO import SceneIO

from conftest import run_task
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
    return run_task(logic, start)


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


def _recording_logic(monkeypatch, tmp_path: Path) -> tuple[SegmentLogic, list[list[str]]]:
    """A logic whose background runs only record their command lines (never started)."""
    slicer_fakes.install(monkeypatch)
    commands = []

    class Recorded:
        running = False  # so that the next task may start

        def __init__(self, command, **_):
            commands.append([str(c) for c in command])
            self.event, self.finished = Signal(object), Signal(object, str)

        def start(self):
            pass

    return SegmentLogic(SceneIO(), workDir=tmp_path, python=sys.executable, runFactory=Recorded), commands


def test_unlabelled_folder_adds_mean_teacher_to_the_command(monkeypatch, tmp_path: Path) -> None:
    logic, commands = _recording_logic(monkeypatch, tmp_path)
    request = FinetuneRequest(outDir=tmp_path / "ft", modelName="m", dataFolder=SAMPLES, unlabelled=tmp_path)
    logic.finetune(request)
    command = commands[-1]
    assert command[command.index("--unlabelled") + 1] == str(tmp_path) and "--mean-teacher" in command
    missing = FinetuneRequest(outDir=tmp_path, modelName="m", dataFolder=SAMPLES, unlabelled=tmp_path / "nowhere")
    assert "unlabelled CT folder" in " ".join(missing.problems())


def test_archive_folder_adds_archive_propagation_to_the_command(monkeypatch, tmp_path: Path) -> None:
    """The optional "Unlabelled archive" folder becomes ``--archive`` (not Mean Teacher); a missing one is refused."""
    logic, commands = _recording_logic(monkeypatch, tmp_path)
    logic.finetune(FinetuneRequest(outDir=tmp_path / "ft", modelName="m", dataFolder=SAMPLES, archive=tmp_path))
    command = commands[-1]
    assert command[command.index("--archive") + 1] == str(tmp_path) and "--mean-teacher" not in command
    logic.finetune(FinetuneRequest(outDir=tmp_path / "ft", modelName="m", dataFolder=SAMPLES))
    assert "--archive" not in commands[-1]
    missing = FinetuneRequest(outDir=tmp_path, modelName="m", dataFolder=SAMPLES, archive=tmp_path / "nowhere")
    assert "unlabelled archive folder" in " ".join(missing.problems())


def uselessBundle(folder: Path, meanDsc: float, onTrainingData: bool = False) -> Path:
    import torch

    from separeg.runtime.bundle import save_bundle

    return save_bundle(folder / f"dsc{meanDsc}.separeg", kind="segmentation", architecture={"backbone": "x"},
                       state_dict={"w": torch.zeros(1)},
                       metadata={"validation": {"mean_dsc": meanDsc, "on_training_data": onTrainingData}})


def test_a_model_that_found_no_organ_is_not_installed(tmp_path: Path) -> None:
    from SepaRegSegmentLib.Requests import ModelRefused, refuseUselessModel

    with pytest.raises(ModelRefused, match=r"not installed: its best validation mean DSC is 0.00 %.*1 % floor"):
        refuseUselessModel(uselessBundle(tmp_path, 0.0))
    with pytest.raises(ModelRefused, match="its best training mean DSC is 0.00 %"):
        refuseUselessModel(uselessBundle(tmp_path, 0.0, onTrainingData=True))
    with pytest.raises(ModelRefused, match="validation mean DSC is 0.00 %"):  # 2.2e-05: installed before issue 30
        refuseUselessModel(uselessBundle(tmp_path, 2.2e-05))
    refuseUselessModel(uselessBundle(tmp_path, 0.41))  # a model that found something is installed


# ------------------------------------------------------------------------------- runs and the panel, with fakes
class CoreStandIn:
    """A ``separeg`` background run without a process: it ends at its first poll as ``ENDS`` says; a finished
    ``finetune`` leaves ``MODEL`` (default: its ``--init`` model) as the run's ``model.separeg``."""

    ENDS: tuple = (RunState.DONE, "wrote the requested files")
    MODEL: Path | None = None

    def __init__(self, command, **_) -> None:
        self.command = [str(c) for c in command]
        self.event, self.finished = Signal(object), Signal(object, str)
        self.running = False

    def start(self) -> None:
        self.running = True

    def poll(self) -> None:
        state, message = self.ENDS
        if "finetune" in self.command and state is RunState.DONE:
            out = Path(self.command[self.command.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.MODEL or self.command[self.command.index("--init") + 1], out / "model.separeg")
        self.end(state, message)

    def stop(self) -> None:
        self.end(RunState.CANCELLED, "stopped")

    def end(self, state: RunState, message: str) -> None:
        self.running = False
        self.finished.emit(state, message)


def standIn(ends: tuple = CoreStandIn.ENDS, model: Path | None = None) -> type:
    return type("Run", (CoreStandIn,), {"ENDS": ends, "MODEL": model})


def test_a_useless_fine_tune_is_refused_saying_why_and_what_to_try(monkeypatch, tmp_path: Path) -> None:
    """A fine-tune whose best validation DSC is 2.2e-05 (under the shared 1 % floor) is not installed, and the
    message says so, with the score and what to try (not "its result could not be loaded")."""
    slicer_fakes.install(monkeypatch)
    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "models"))
    logic = SegmentLogic(SceneIO(), workDir=tmp_path / "work", python=sys.executable,
                         runFactory=standIn(model=uselessBundle(tmp_path, 2.2e-05)))
    request = FinetuneRequest(outDir=tmp_path / "ft", modelName="weak", dataFolder=SAMPLES)
    [result] = run(logic, lambda: logic.finetune(request))
    assert result.state is RunState.FAILED
    assert result.message.startswith("the run finished, but the model was not installed: its best validation mean "
                                     "DSC is 0.00 %, below the 1 % floor")
    assert "Train longer" in result.message and "could not be loaded" not in result.message
    assert "weak" not in {m.name for m in logic.models()}


def test_updating_a_shipped_model_writes_only_under_the_user_folder(monkeypatch, tmp_path: Path) -> None:
    """Update model on a shipped model: nothing is written into the extension's folder; the update is a per-user
    model of the same name, which the model store then finds first."""
    from separeg.runtime import model_store

    slicer_fakes.install(monkeypatch)
    shipped = tmp_path / "extension" / "models"
    shipped.mkdir(parents=True)
    shutil.copyfile(resolve_model("hn-oar-7"), shipped / "hn-oar-7.separeg")
    monkeypatch.setattr(model_store, "shipped_model_dir", lambda: shipped)
    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "user"))
    logic = SegmentLogic(SceneIO(), workDir=tmp_path / "work", python=sys.executable, runFactory=standIn())
    assert logic.model("hn-oar-7").path.parent == shipped
    cases = logic.trainingSetDir("hn-oar-7")
    cases.mkdir(parents=True)
    for name in ("pt_1", "pt_22"):
        for part in ("ct", "oar"):
            shutil.copyfile(SAMPLES / f"{name}_{part}.nii.gz", cases / f"{name}_{part}.nii.gz")

    def files(folder: Path) -> dict:
        return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}

    before = files(shipped)
    [result] = run(logic, lambda: logic.updateModel("hn-oar-7", epochs=1, device="cpu"))
    assert (result.task, result.state) == ("Update model", RunState.DONE), result.message
    assert files(shipped) == before  # no backup, no copy, nothing written into the installed extension
    updated = logic.model("hn-oar-7").path
    assert updated.parent == tmp_path / "user" and model_store.resolve_model("hn-oar-7") == updated
    assert cases.parent.parent == tmp_path / "user"  # the corrected cases are the user's too


# ------------------------------------------------------------------------------------------ the panel, with fakes
class FakeComboBox:
    """QComboBox as the panel uses it: items with data, ``currentData`` and ``count`` properties."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []
        self.index = -1

    def addItem(self, text: str, data=None) -> None:
        self.items.append((text, data))
        self.index = max(self.index, 0)

    def clear(self) -> None:
        self.items, self.index = [], -1

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self.index = index

    def setItemData(self, *_) -> None:
        pass

    def connect(self, *_) -> None:
        pass

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.index][1] if 0 <= self.index < len(self.items) else None


class StubScene:
    """SceneIO's answers for the panel tests, on slicer_fakes nodes: segments and their masks, files written empty,
    a volume from DICOM and SlicerRT when asked (``rtError``: SlicerRT's export fails)."""

    def __init__(self, dicom: bool = False, slicerRT: bool = False, rtError: str | None = None) -> None:
        self.dicom, self.slicerRT, self.rtError = dicom, slicerRT, rtError
        self.rtWritten: list[Path] = []

    def segments(self, node) -> list[tuple[str, str]]:
        return [(sid, segment.GetName()) for sid, segment in node.segmentation.segments.items()]

    def renameSegment(self, node, segmentId: str, name: str) -> None:
        node.segmentation.segments[segmentId].SetName(name)

    def segmentArrays(self, node, volumeNode) -> dict:
        return {segment.GetName(): node.segmentation.masks[sid] > 0 for sid, segment in
                node.segmentation.segments.items()}

    def spacing(self, volumeNode) -> tuple:
        return volumeNode.GetSpacing()

    def sourceFile(self, node) -> None:
        return None  # made in the scene: no table travels with it

    def nodeAttribute(self, node, name: str) -> None:
        return None

    def written(self, path: Path, *_) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        return Path(path)

    def exportVolume(self, node, path: Path) -> Path:
        return self.written(path)

    def exportSegmentsAsLabelmap(self, node, volumeNode, path: Path, values: dict) -> Path:
        return self.written(path)

    def copyDicomSeries(self, node, folder: Path) -> None:
        return None

    def dicomSeriesFiles(self, node) -> list[Path] | None:
        return [Path("ct.dcm")] if self.dicom else None

    def hasSlicerRT(self) -> bool:
        return self.slicerRT

    def exportRtstructWithSlicerRT(self, segmentationNode, volumeNode, out: Path) -> None:
        if self.rtError:
            raise RuntimeError(f"SlicerRT export failed: {self.rtError}")
        self.rtWritten.append(out)


def fakeUi(selected: dict) -> mock.MagicMock:
    """The panel's widgets: combo boxes, texts and paths as plain values, node selectors returning ``selected``."""
    ui = mock.MagicMock()
    for name in ("modelComboBox", "deviceComboBox", "initEncoderComboBox", "labelTableComboBox"):
        setattr(ui, name, FakeComboBox())
    for name in ("statusLabel", "modelInfoLabel", "trainingSetLabel", "label_3", "organsLineEdit",
                 "newModelNameLineEdit"):
        setattr(ui, name, types.SimpleNamespace(text=""))
    for name in ("exportFolderPathLineEdit", "labelTablePathLineEdit", "finetuneOutputPathLineEdit",
                 "dataFolderPathLineEdit", "unlabelledPathLineEdit", "finetuneArchivePathLineEdit", "initPathLineEdit"):
        setattr(ui, name, types.SimpleNamespace(currentPath=""))
    for name in ("rtstructCheckBox", "segCheckBox", "niftiCheckBox"):
        setattr(ui, name, types.SimpleNamespace(checked=True))
    ui.progressBar = types.SimpleNamespace(value=0)
    for name, node in selected.items():
        getattr(ui, name).currentNode.return_value = node
    return ui


class Panel:
    """The module's Widget on fake Qt and slicer modules, a real SegmentLogic on a StubScene and CoreStandIn runs."""

    def __init__(self, monkeypatch, tmp_path: Path, scene: StubScene, run: type = CoreStandIn,
                 selected: dict | None = None) -> None:
        self.errors: list[str] = []
        self.ui = fakeUi(selected or {})
        qt = types.ModuleType("qt")
        qt.QTimer, qt.QFileDialog = mock.MagicMock, mock.MagicMock()
        qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default=None: default,
                                                     setValue=lambda *_: None)
        qt.QTableWidgetItem, qt.Qt = str, types.SimpleNamespace(ToolTipRole=3)
        slicer = types.ModuleType("slicer")
        slicer.mrmlScene, slicer.qMRMLNodeComboBox = mock.MagicMock(), mock.MagicMock
        slicer.util = types.SimpleNamespace(
            loadUI=lambda path: mock.MagicMock(), childWidgetVariables=lambda widget: self.ui,
            errorDisplay=lambda text, **_: self.errors.append(text), setSliceViewerLayers=lambda **_: None,
            mainWindow=lambda: None, tryWithErrorDisplay=self.tryWithErrorDisplay)
        monkeypatch.setitem(sys.modules, "qt", qt)
        monkeypatch.setitem(sys.modules, "slicer", slicer)
        import SepaRegSegmentLib.Widget as module

        for name, value in (("qt", qt), ("slicer", slicer), ("ensureRequirements", lambda: True)):
            monkeypatch.setattr(module, name, value)
        monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "models"))
        self.logic = SegmentLogic(scene, workDir=tmp_path / "work", python=sys.executable, runFactory=run)
        self.logic.importModel(resolve_model("hn-oar-7"), "tiny", replace=True)
        self.widget = module.Widget(self.logic)

    @contextlib.contextmanager
    def tryWithErrorDisplay(self, message=None, show=True, waitCursor=False):
        """As slicer.util's: shows the error, then raises it again."""
        try:
            yield
        except Exception as exc:
            self.errors.append(f"{message}\n\n{exc}" if message else str(exc))
            raise

    @property
    def status(self) -> str:
        return self.ui.statusLabel.text

    def finish(self) -> None:
        """What the panel's timer does until the task ends."""
        while self.logic.isRunning:
            self.logic.poll()


def exportPanel(monkeypatch, tmp_path: Path, scene: StubScene, run: type = CoreStandIn, **formats) -> Panel:
    case = globals()["case"]("pt_1")
    panel = Panel(monkeypatch, tmp_path, scene, run, {"exportSegmentationSelector": case.segmentationNode,
                                                      "exportVolumeSelector": case.volumeNode})
    panel.ui.exportFolderPathLineEdit.currentPath = str(tmp_path / "out")
    for name, on in formats.items():
        getattr(panel.ui, f"{name}CheckBox").checked = on
    return panel


def test_the_status_line_tells_how_export_ended(monkeypatch, tmp_path: Path) -> None:
    """Done, failed, stopped, and SlicerRT's RTSTRUCT (no background run): the status line never stays at
    "running..." and says what happened; failures are shown too."""
    panel = exportPanel(monkeypatch, tmp_path, StubScene())
    panel.widget.onExport()
    assert panel.status == "Export: running..."
    panel.finish()
    assert panel.status == "Export: done: wrote the requested files" and not panel.errors

    failing = exportPanel(monkeypatch, tmp_path, StubScene(), standIn((RunState.FAILED, "exit code 1: no space")))
    failing.widget.onExport()
    failing.finish()
    assert failing.status == "Export: failed: exit code 1: no space" and failing.errors == [
        "Export failed: exit code 1: no space"]

    stopped = exportPanel(monkeypatch, tmp_path, StubScene())
    stopped.widget.onExport()
    stopped.logic.stop()  # the Stop button
    assert stopped.status == "Export: cancelled: stopped" and not stopped.logic.isRunning

    slicerRT = StubScene(dicom=True, slicerRT=True)
    onlyRT = exportPanel(monkeypatch, tmp_path, slicerRT, rtstruct=True, seg=False, nifti=False)
    onlyRT.widget.onExport()
    assert onlyRT.status == f"Export: done: RTSTRUCT written by SlicerRT to {tmp_path / 'out'}"
    assert slicerRT.rtWritten == [tmp_path / "out"] and not onlyRT.logic.isRunning and not onlyRT.errors

    broken = exportPanel(monkeypatch, tmp_path, StubScene(dicom=True, slicerRT=True, rtError="no study"),
                         seg=False, nifti=False)
    broken.widget.onExport()
    assert broken.status == "Export: failed: SlicerRT export failed: no study" and broken.errors


def test_the_status_line_shows_contour_warnings(monkeypatch, tmp_path: Path) -> None:
    """An Auto-contour that warned (another body site, organs left out) says so on the status line, not only in the
    log (issue 30: a head-and-neck model on a chest CT)."""
    from SepaRegSegmentLib.Requests import TaskResult

    panel = Panel(monkeypatch, tmp_path, StubScene())
    warning = "body site: 3 of 6 organs found are far from their training volumes"
    panel.widget.onFinished(TaskResult("Auto-contour", RunState.DONE, "7 organs", {"warnings": [warning]}))
    assert panel.status == f"Auto-contour: done: 7 organs | 1 warning(s), first: {warning}"
    panel.widget.onFinished(TaskResult("Auto-contour", RunState.DONE, "7 organs", {"warnings": []}))
    assert panel.status == "Auto-contour: done: 7 organs"


def test_an_export_the_core_refuses_writes_nothing_with_slicerRT_either(monkeypatch, tmp_path: Path) -> None:
    """The core checks the output folder first (one result per folder): when it refuses, SlicerRT's RTSTRUCT is
    not written into that folder either, and the panel says the core's reason; SlicerRT writes after the core."""
    scene = StubScene(dicom=True, slicerRT=True)
    refused = standIn((RunState.FAILED, "the output folder already holds an export; choose an empty folder"))
    panel = exportPanel(monkeypatch, tmp_path, scene, refused)
    panel.widget.onExport()
    assert not scene.rtWritten
    panel.finish()
    assert panel.status == "Export: failed: the output folder already holds an export; choose an empty folder"
    assert not scene.rtWritten
    accepted = exportPanel(monkeypatch, tmp_path, scene)
    accepted.widget.onExport()
    accepted.finish()
    assert scene.rtWritten == [tmp_path / "out"]
    assert accepted.status == ("Export: done: wrote the requested files; RTSTRUCT written by SlicerRT to "
                               f"{tmp_path / 'out'}")


def test_a_refused_or_failed_task_replaces_the_previous_status(monkeypatch, tmp_path: Path) -> None:
    """A task refused before it starts says so (the status of an earlier task does not stay); a fine-tune whose
    model is refused says why."""
    panel = Panel(monkeypatch, tmp_path, StubScene(), standIn(model=uselessBundle(tmp_path, 2.2e-05)))
    panel.ui.statusLabel.text = "Auto-contour: done: ..."
    panel.ui.finetuneOutputPathLineEdit.currentPath = str(tmp_path / "ft")
    panel.ui.newModelNameLineEdit.text = "bad/name"
    panel.widget.onFinetune()
    assert panel.status.startswith("Fine-tune: not started: add at least one training case")
    assert panel.errors[-1].startswith("Fine-tune was not started: add at least one training case")
    panel.ui.newModelNameLineEdit.text = "weak"
    panel.ui.dataFolderPathLineEdit.currentPath = str(SAMPLES)
    panel.widget.onFinetune()
    panel.finish()
    assert panel.status.startswith("Fine-tune: failed: the run finished, but the model was not installed: its best "
                                   "validation mean DSC is 0.00 %")


def test_the_panel_asks_for_a_label_table_instead_of_guessing(monkeypatch, tmp_path: Path) -> None:
    """A label map whose segments are Segment_<value> is not named from the selected model's table: Evaluate and
    the training segmentation ask for the table; once the planner chooses one, it names them."""
    prediction = case("pt_1")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz")))
    reference = slicer_fakes.make_segmentation("reference", prediction.volumeNode,
                                               {f"Segment_{v}": labels == v for v in (4, 7)})
    panel = Panel(monkeypatch, tmp_path, StubScene(), selected={
        "predictionSegmentationSelector": prediction.segmentationNode, "evaluationVolumeSelector":
        prediction.volumeNode, "referenceSegmentationSelector": reference})
    assert panel.widget.modelName == "tiny"  # a model is selected, as always when one is installed
    panel.widget.onEvaluate()
    assert panel.status.startswith("Evaluate: failed: no segment name matches")
    assert "Segment_4, Segment_7 are the values of a label map" in panel.errors[-1]
    assert "choose the table those values follow under 'Label values'" in panel.errors[-1]
    panel.widget.onTrainingSegmentation(reference)
    assert panel.status.startswith("reference: organs unknown") and panel.ui.organsLineEdit.text == ""

    combo = panel.ui.labelTableComboBox
    combo.setCurrentIndex(combo.findData("model:tiny"))  # the planner says: these values follow tiny's table
    panel.widget.onEvaluate()
    assert panel.status == "Evaluate: done: 2 organ(s) compared"
    assert [name for _, name in panel.logic.scene.segments(reference)] == ["Parotid_L", "Bone_Mandible"]
