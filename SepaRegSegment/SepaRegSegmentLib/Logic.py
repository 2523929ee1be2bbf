"""SepaRegSegment logic: fine-tune, Auto-contour, evaluate, correct-and-learn and export.

No widgets and no direct MRML calls: the scene is reached through an injected :class:`SceneIO`-like object and
the core runs as ``separeg`` background processes (:class:`separeg.runtime.background.BackgroundRun`), so the tests
drive this class with a fake scene and real processes. Every task is one background run at a time; results come back
through signals, on the thread that calls :meth:`poll` (the widget's timer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from separeg.runtime.background import BackgroundRun, RunState, Signal, cli_command, core_root, default_python
from separeg.runtime.events import Event, EventType

STOP_FILE = "STOP"
TRAINING_SET_LABELS = "labels.json"
# Slicer's name for the segment of value v when it loads a label map without a table (loadSegmentation).
SEGMENT_BY_VALUE = re.compile(r"Segment_(\d+)")
# Node attributes Auto-contour leaves on its segmentation (saved with the scene): the model that made it
# ({"model": {"path", "name", "sha256"}, "separeg_version"}, as in the core's segmentation.json) and each segment's
# name and content fingerprint then ([{"id", "name", "sha256"}]), so Export can tell automatic contours from edited
# ones.
CONTOUR_MODEL_ATTRIBUTE = "SepaReg.ContourModel"
CONTOUR_SEGMENTS_ATTRIBUTE = "SepaReg.ContourSegments"


def refuseUselessModel(path: Path) -> None:
    """A fine-tuned model whose best validation DSC is 0 % found no organ: it is not installed over a working one
    (the run folder keeps it). A best epoch chosen on training data is accepted: the core's log says so."""
    from separeg.runtime.bundle import read_bundle_info

    validation = read_bundle_info(path).get("validation") or {}
    if validation.get("mean_dsc") == 0:
        raise ValueError(f"its best {'training' if validation.get('on_training_data') else 'validation'} DSC is 0 %: "
                         f"the model found none of the organs, so it was not installed ({path} is kept). Train "
                         "longer, on more cases, or from a pretrained encoder")


@dataclass
class ModelInfo:
    name: str
    path: Path
    labels: list[dict]
    backbone: str
    description: str
    channels: list[str] = field(default_factory=lambda: ["CT"])  # input channels, in order (segmentation models)

    @property
    def organNames(self) -> list[str]:
        return [lb.get("tg263") or lb["name"] for lb in self.labels]


@dataclass
class TrainingCase:
    """A loaded volume and its segmentation (scene nodes, passed through to the scene adapter)."""

    name: str
    volumeNode: object
    segmentationNode: object


@dataclass
class FinetuneRequest:
    outDir: Path
    modelName: str
    cases: Sequence[TrainingCase] = ()
    dataFolder: Path | None = None  # instead of cases: a folder the core reads (NIfTI pairs or DICOM + RTSTRUCT)
    organs: Sequence[str] = ()  # organ (TG-263) names to train; segment names are matched to them
    init: Path | None = None  # encoder bundle (file or shipped name) from pretraining, or a model to continue
    unlabelled: Path | None = None  # unlabelled CTs: adds Mean Teacher consistency training on them
    epochs: int = 50
    device: str = "auto"
    extraArgs: Sequence[str] = ()

    def problems(self) -> list[str]:
        found = []
        if not self.cases and self.dataFolder is None:
            found.append("add at least one training case (a volume with its segmentation) or choose a data folder")
        if self.cases and len(self.cases) < 2:
            found.append("fine-tuning needs 2 cases (1 for training, 1 for validation); add another case")
        if self.cases and not self.organs:
            found.append("choose the organs to train")
        if not re.fullmatch(r"[\w .-]+", self.modelName or ""):
            found.append("name the model with letters, digits, spaces, '-', '_' or '.'")
        if self.init is not None and not Path(self.init).is_file():
            from separeg.runtime.errors import InputError
            from separeg.runtime.model_store import resolve_model

            try:
                resolve_model(self.init)
            except InputError:
                found.append(f"initial model {self.init} does not exist")
        if self.unlabelled is not None and not Path(self.unlabelled).is_dir():
            found.append(f"the unlabelled CT folder {self.unlabelled} does not exist")
        return found


@dataclass
class ContourOrigin:
    """The model that made a segmentation (Auto-contour) and what a planner changed in it since.

    Attributes:
        model: ``{"model": {"path", "name", "sha256"}, "separeg_version"}``, as in the core's ``segmentation.json``.
        changes: the segments edited, renamed, added or removed since Auto-contour ("Parotid_L edited"); empty when
            the segments are still the model's output.
    """

    model: dict
    changes: list[str] = field(default_factory=list)

    @property
    def generation(self) -> str:
        """``separeg export --generation``: automatic (unchanged model output) or semiautomatic (edited by a person)."""
        return "semiautomatic" if self.changes else "automatic"

    @property
    def modelName(self) -> str:
        return str((self.model.get("model") or {}).get("name") or "?")


@dataclass
class TaskResult:
    task: str
    state: RunState
    message: str
    outputs: dict = field(default_factory=dict)


def matchSegments(segmentNames: Sequence[str], organs: Sequence[str]) -> dict[str, str]:
    """Segment name -> organ (TG-263) name, through the core's synonym table ("Parotid L" -> "Parotid_L")."""
    from separeg.rt.organs import to_tg263

    wanted = {organ: organ for organ in organs}
    wanted.update({to_tg263(organ) or organ: organ for organ in organs})
    matched = {}
    for name in segmentNames:
        organ = wanted.get(name) or wanted.get(to_tg263(name) or "")
        if organ is not None and organ not in matched.values():
            matched[name] = organ
    return matched


def labelNamesByValue(table) -> dict[int, str]:
    """Organ name (TG-263 when known) by label value, from a label table file (labels.json, CSV; the core's
    formats) or from a list of labels as in a model (``[{"value", "name", "tg263"}, ...]``)."""
    if isinstance(table, str | os.PathLike):
        from separeg.rt.labels import load_label_table

        table = [label.to_dict() for label in load_label_table(table)]
    return {int(lb["value"]): lb.get("tg263") or lb["name"] for lb in table}


def labelTableBeside(path: str | os.PathLike) -> Path | None:
    """``labels.json`` in the folder of a label map file, when there is one."""
    candidate = Path(path).parent / TRAINING_SET_LABELS
    return candidate if candidate.is_file() else None


def unnamedSegmentsHint(names: Sequence[str]) -> str:
    """What to do when segments carry Slicer's ``Segment_<value>`` names ("" when they do not)."""
    unnamed = [n for n in names if SEGMENT_BY_VALUE.fullmatch(n)]
    if not unnamed:
        return ""
    return (f". Segments named {', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''} are the values of a "
            "label map Slicer loaded without a label table: select the model whose label table those values follow "
            "(SepaReg then names them from it), put a labels.json beside the file before loading it, or rename the "
            "segments in Segment Editor to organ names (TG-263, e.g. Parotid_L)")


def labelTable(organs: Sequence[str]) -> dict:
    """A label table (values 1..N in the given order) in the core's JSON format."""
    from separeg.rt.labels import LabelTable

    return LabelTable.from_names(organs).to_dict()


def maskFingerprint(mask) -> str:
    """SHA-256 of a boolean mask and its shape: equal for the same voxels on the same grid."""
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    digest = hashlib.sha256(repr(tuple(mask.shape)).encode())
    digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest()


def safeName(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "case"


class SegmentLogic:
    """Runs the segmentation tasks. ``scene`` is a :class:`SceneIO` (or a fake of it).

    Args:
        scene: moves nodes to files and back.
        workDir: per-task temporary folders go here (default: a new temporary folder).
        python: interpreter of the background runs (default: PythonSlicer in Slicer, else this Python).
        runFactory: builds the :class:`BackgroundRun` (tests may inject a fake).

    Signals: ``progress(str stage, int step, int total, float|None eta)``, ``logMessage(str, str level)``,
    ``finished(TaskResult)``.
    """

    def __init__(self, scene, workDir: str | os.PathLike | None = None, python: str | None = None,
                 runFactory: Callable[..., BackgroundRun] = BackgroundRun) -> None:
        self.scene = scene
        self.workDir = Path(workDir) if workDir else Path(tempfile.mkdtemp(prefix="SepaReg-"))
        self.python = python or default_python()
        self.runFactory = runFactory
        self.run: BackgroundRun | None = None
        self.task: str | None = None
        self._onDone: Callable[[], dict] | None = None
        self.progress = Signal(str, int, int, object)
        self.logMessage = Signal(str, str)
        self.finished = Signal(TaskResult)

    # ------------------------------------------------------------------------------------------------- models
    def models(self) -> list[ModelInfo]:
        """Installed segmentation models (per-user folder, then shipped models)."""
        return self._bundles("segmentation")

    def encoders(self) -> list[ModelInfo]:
        """Pretrained encoders in the model folders (the shipped ``separeg-encoder-hn-ct`` first of all)."""
        return self._bundles("encoder")

    # ------------------------------------------------------------------------------------- segment names
    def nameSegmentsByValue(self, segmentationNode, table) -> dict[str, str]:
        """Rename ``Segment_<v>`` segments to the organ of value v in ``table`` (see :func:`labelNamesByValue`).

        Slicer's ``loadSegmentation`` names the segments of a label map ``Segment_1``, ``Segment_2``, ...; with a
        table they get organ names that fine-tuning and evaluation can match. Returns ``{old name: new name}``.
        """
        names = labelNamesByValue(table)
        taken = {name for _, name in self.scene.segments(segmentationNode)}
        renamed = {}
        for segmentId, name in self.scene.segments(segmentationNode):
            match = SEGMENT_BY_VALUE.fullmatch(name)
            organ = names.get(int(match.group(1))) if match else None
            if organ and organ not in taken:
                self.scene.renameSegment(segmentationNode, segmentId, organ)
                taken.add(organ)
                renamed[name] = organ
        if renamed:
            self.logMessage.emit(f"{segmentationNode.GetName()}: segments named by value: "
                                 + ", ".join(f"{a} -> {b}" for a, b in renamed.items()), "info")
        return renamed

    def loadSegmentation(self, path: str | os.PathLike, table=None):
        """Load a segmentation or label map file; ``Segment_<v>`` segments are named from ``table`` or, when none is
        given, from ``labels.json`` beside the file."""
        node = self.scene.loadSegmentationFile(path)
        table = table if table is not None else labelTableBeside(path)
        if table is not None:
            self.nameSegmentsByValue(node, table)
        return node

    def _bundles(self, kind: str) -> list[ModelInfo]:
        from separeg.runtime.bundle import read_bundle_info
        from separeg.runtime.model_store import list_models

        found = []
        for path in list_models():
            try:
                info = read_bundle_info(path)
            except Exception as exc:  # noqa: BLE001 - one damaged file must not hide the other models
                self.logMessage.emit(f"skipping {path}: {exc}", "warning")
                continue
            if info.get("kind") != kind:
                continue
            labels = info.get("labels", {}).get("labels", [])
            arch = info["architecture"]
            backbone = str(arch.get("backbone") or arch.get("encoder"))
            release = info.get("release", {})
            if kind == "encoder":
                description = f"{backbone} encoder" + (f"; {release['data']}" if release.get("data") else "")
            else:
                training = info.get("training", {})
                description = (f"{backbone}, {len(labels)} organs, "
                               f"{training.get('training_cases', '?')} training case(s)")
            if release.get("limits"):
                description += f". {release['limits']}"
            channels = [c if isinstance(c, str) else c.get("name", "?")
                        for c in (info.get("inputs") or {}).get("channels") or ["CT"]]
            found.append(ModelInfo(path.stem, path, labels, backbone, description, channels))
        return found

    def model(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise ValueError(f"no installed model named {name!r}; import one or fine-tune one first")

    def importModel(self, path: str | os.PathLike, name: str | None = None, replace: bool = False) -> Path:
        from separeg.runtime.model_store import install_model

        return install_model(path, name, replace=replace)

    def exportModel(self, name: str, destination: str | os.PathLike) -> Path:
        destination = Path(destination)
        if destination.is_dir():
            destination = destination / f"{name}.separeg"
        tmp = destination.with_name(f".{destination.name}.tmp")
        shutil.copyfile(self.model(name).path, tmp)
        os.replace(tmp, destination)
        return destination

    # -------------------------------------------------------------------------------------------- background
    @property
    def isRunning(self) -> bool:
        return self.run is not None and self.run.running

    def poll(self) -> None:
        if self.run is not None and self.run.running:
            self.run.poll()

    def stop(self) -> None:
        if self.isRunning:
            self.logMessage.emit(f"stopping {self.task}...", "info")
            self.run.stop()

    def _taskDir(self, task: str) -> Path:
        folder = self.workDir / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        n = 1
        while folder.exists():
            folder = folder.with_name(f"{folder.name.rsplit('~', 1)[0]}~{n}")
            n += 1
        folder.mkdir(parents=True)
        return folder

    def _start(self, task: str, command: str, args: Sequence, onDone: Callable[[], dict], *,
               stopFile: Path | None = None, logPath: Path | None = None) -> BackgroundRun:
        if self.isRunning:
            raise RuntimeError(f"{self.task} is still running; wait for it or stop it first")
        self.task = task
        self._onDone = onDone
        self.run = self.runFactory(cli_command(self.python, command, *args), cwd=core_root(), stop_file=stopFile,
                                   log_path=logPath)
        self.run.event.connect(self._onEvent)
        self.run.finished.connect(self._onFinished)
        self.run.start()
        self.logMessage.emit(f"{task}: separeg {command} {' '.join(str(a) for a in args)}", "info")
        return self.run

    def _onEvent(self, event: Event) -> None:
        if event.type is EventType.PROGRESS:
            self.progress.emit(event.stage or "", event.step or 0, event.total or 0, event.eta_s)
        elif event.msg:
            prefix = f"[{event.stage}] " if event.stage else ""
            self.logMessage.emit(prefix + event.msg, event.level or event.type.value)

    def _onFinished(self, state: RunState, message: str) -> None:
        outputs: dict = {}
        if state is RunState.DONE and self._onDone is not None:
            try:
                outputs = self._onDone() or {}
            except Exception as exc:  # noqa: BLE001 - shown to the user, with the run's own outputs kept
                state, message = RunState.FAILED, f"the run finished but its result could not be loaded: {exc}"
        self.finished.emit(TaskResult(self.task or "", state, message, outputs))

    # ------------------------------------------------------------------------------------------- Auto-contour
    def autoContour(self, volumeNode, modelName: str, device: str = "auto", outputName: str | None = None,
                    extraVolumeNodes: Sequence = ()) -> BackgroundRun:
        """Contour ``volumeNode`` with an installed model; ``finished`` carries ``outputs["segmentationNode"]``.

        A model with several input channels takes its further co-registered volumes, in its channel order, as
        ``extraVolumeNodes``; the result lies on ``volumeNode``'s grid.
        """
        model = self.model(modelName)
        if len(model.channels) != 1 + len(extraVolumeNodes):
            names = ", ".join(model.channels)
            raise ValueError(f"{modelName} takes {len(model.channels)} co-registered volume(s) ({names}), in that "
                             f"order; {1 + len(extraVolumeNodes)} given")
        folder = self._taskDir("contour")
        ct = self.scene.exportVolume(volumeNode, folder / "ct.nii.gz")
        extras = [self.scene.exportVolume(node, folder / f"channel{k + 2}.nii.gz")
                  for k, node in enumerate(extraVolumeNodes)]
        out = folder / "result"
        name = outputName or f"{volumeNode.GetName()} {modelName}"

        def load() -> dict:
            node = self.scene.loadSegmentation(out / "segmentation.nii.gz", out / "segmentation.json", volumeNode,
                                               name)
            description = json.loads((out / "segmentation.json").read_text(encoding="utf-8"))
            self.rememberContourModel(node, volumeNode, description)
            for warning in description.get("warnings", []):
                self.logMessage.emit(warning, "warning")
            return {"segmentationNode": node, "folder": out, "labels": description["labels"]}

        return self._start("Auto-contour", "contour", [ct, *extras, "--model", model.path, "--out", out, "--device",
                                                       device],
                           load, logPath=folder / "log.txt")

    # ------------------------------------------------------------------------------------ contour provenance
    def segmentFingerprints(self, segmentationNode, volumeNode) -> list[dict]:
        """``[{"id", "name", "sha256"}]``: each segment's name and :func:`maskFingerprint` on the volume's grid."""
        return [{"id": sid, "name": name,
                 "sha256": maskFingerprint(self.scene.segmentArray(segmentationNode, sid, volumeNode))}
                for sid, name in self.scene.segments(segmentationNode)]

    def rememberContourModel(self, segmentationNode, volumeNode, description: dict) -> None:
        """Record on the node the model of ``description`` (the core's ``segmentation.json``) and the segments as
        it made them (node attributes, saved with the scene); without a model there, the node is left as it is."""
        if not description.get("model"):
            return
        model = {"model": description["model"], "separeg_version": description.get("separeg_version")}
        self.scene.setNodeAttribute(segmentationNode, CONTOUR_MODEL_ATTRIBUTE, json.dumps(model))
        self.scene.setNodeAttribute(segmentationNode, CONTOUR_SEGMENTS_ATTRIBUTE,
                                    json.dumps(self.segmentFingerprints(segmentationNode, volumeNode)))

    def contourOrigin(self, segmentationNode, volumeNode) -> ContourOrigin | None:
        """The model that made the segmentation and the segments changed since (compared on ``volumeNode``'s grid,
        organ by organ), or ``None`` for contours Auto-contour did not make (drawn by hand, imported)."""
        text = self.scene.nodeAttribute(segmentationNode, CONTOUR_MODEL_ATTRIBUTE)
        if not text:
            return None
        try:
            model = json.loads(text)
            made = json.loads(self.scene.nodeAttribute(segmentationNode, CONTOUR_SEGMENTS_ATTRIBUTE) or "null")
            if not (isinstance(model, dict) and isinstance(model.get("model"), dict) and isinstance(made, list)):
                raise ValueError("unexpected content")
            before = {str(s["id"]): (str(s["name"]), str(s["sha256"])) for s in made}
        except (ValueError, TypeError, KeyError) as exc:
            self.logMessage.emit(f"{segmentationNode.GetName()}: the record of the model that made it is unreadable "
                                 f"({exc}); its contours are exported as manual", "warning")
            return None
        changes = []
        now = self.segmentFingerprints(segmentationNode, volumeNode)
        for segment in now:
            old = before.pop(segment["id"], None)
            if old is None:
                changes.append(f"{segment['name']} added")
                continue
            if old[0] != segment["name"]:
                changes.append(f"{old[0]} renamed {segment['name']}")
            if old[1] != segment["sha256"]:
                changes.append(f"{segment['name']} edited")
        changes += [f"{name} removed" for name, _ in before.values()]
        return ContourOrigin(model, changes)

    # ---------------------------------------------------------------------------------------------- fine-tune
    def writeCase(self, case: TrainingCase, organs: Sequence[str], folder: Path) -> list[str]:
        """Write one case as ``<name>_ct.nii.gz`` + ``<name>_oar.nii.gz``; returns the organs it annotates."""
        segments = self.scene.segments(case.segmentationNode)
        matched = matchSegments([name for _, name in segments], organs)
        if not matched:
            names = [n for _, n in segments]
            raise ValueError(f"case {case.name}: no segment matches the organs {', '.join(organs)} (segments: "
                             f"{', '.join(names) or 'none'}); rename the segments or pick organs"
                             + unnamedSegmentsHint(names))
        values = {organ: i + 1 for i, organ in enumerate(organs)}
        stem = safeName(case.name)
        self.scene.exportVolume(case.volumeNode, folder / f"{stem}_ct.nii.gz")
        self.scene.exportSegmentsAsLabelmap(case.segmentationNode, case.volumeNode, folder / f"{stem}_oar.nii.gz",
                                            {sid: values[matched[name]] for sid, name in segments if name in matched})
        return sorted(set(matched.values()))

    def finetune(self, request: FinetuneRequest) -> BackgroundRun:
        """Fine-tune in the background; on success the model is installed as ``request.modelName``."""
        problems = request.problems()
        if problems:
            raise ValueError("; ".join(problems))
        out = Path(request.outDir)
        data = request.dataFolder
        if request.cases:
            data = out / "data"
            data.mkdir(parents=True, exist_ok=True)
            for case in request.cases:
                annotated = self.writeCase(case, request.organs, data)
                self.logMessage.emit(f"case {case.name}: {', '.join(annotated)}", "info")
            (data / TRAINING_SET_LABELS).write_text(json.dumps(labelTable(request.organs), indent=1),
                                                     encoding="utf-8")
        run = out / "run"
        args = [data, "--out", run, "--epochs", request.epochs, "--device", request.device,
                "--stop-file", out / STOP_FILE, *request.extraArgs]
        if request.init is not None:
            args += ["--init", str(request.init)]
        if request.unlabelled is not None:
            args += ["--mean-teacher", "--unlabelled", request.unlabelled]

        def install() -> dict:
            refuseUselessModel(run / "model.separeg")
            path = self.importModel(run / "model.separeg", request.modelName, replace=True)
            return {"model": path}

        return self._start("Fine-tune", "finetune", args, install, stopFile=out / STOP_FILE,
                           logPath=out / "log.txt")

    # ------------------------------------------------------------------------------------- correct and learn
    def trainingSetDir(self, modelName: str) -> Path:
        from separeg.runtime.model_store import user_model_dir

        return user_model_dir() / "training" / safeName(modelName)

    def addToTrainingSet(self, volumeNode, segmentationNode, modelName: str) -> Path:
        """Store a corrected case for "Update model" (beside the per-user models; case names must be unique)."""
        model = self.model(modelName)
        self.nameSegmentsByValue(segmentationNode, model.labels)  # a label map loaded without names: the model's
        folder = self.trainingSetDir(modelName)
        folder.mkdir(parents=True, exist_ok=True)
        name = safeName(volumeNode.GetName())
        n = 1
        while (folder / f"{name}_ct.nii.gz").exists():
            n += 1
            name = f"{safeName(volumeNode.GetName())}_{n}"
        annotated = self.writeCase(TrainingCase(name, volumeNode, segmentationNode), model.organNames, folder)
        (folder / TRAINING_SET_LABELS).write_text(json.dumps({"schema": 1, "labels": model.labels}, indent=1),
                                                   encoding="utf-8")
        self.logMessage.emit(f"added {name} ({', '.join(annotated)}) to the training set of {modelName}: "
                             f"{len(self.trainingSet(modelName))} case(s)", "info")
        return folder / f"{name}_ct.nii.gz"

    def trainingSet(self, modelName: str) -> list[Path]:
        folder = self.trainingSetDir(modelName)
        return sorted(folder.glob("*_ct.nii.gz")) if folder.is_dir() else []

    def updateModel(self, modelName: str, epochs: int = 10, device: str = "auto",
                    extraArgs: Sequence[str] = ()) -> BackgroundRun:
        """A short fine-tune of the model on its stored corrected cases; the model is replaced when it succeeds."""
        model = self.model(modelName)
        cases = self.trainingSet(modelName)
        if len(cases) < 2:
            raise ValueError(f"the training set of {modelName} has {len(cases)} case(s); add at least 2 corrected "
                             "cases (one is held out to check the update)")
        backup = model.path.with_name(f"{model.path.stem}.previous.separeg.bak")
        shutil.copyfile(model.path, backup)
        request = FinetuneRequest(outDir=self._taskDir("update"), modelName=modelName,
                                  dataFolder=self.trainingSetDir(modelName), init=model.path, epochs=epochs,
                                  device=device, extraArgs=tuple(extraArgs))
        self.logMessage.emit(f"previous version kept as {backup}", "info")
        return self.finetune(request)

    # ------------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, predictionNode, referenceNode, volumeNode, labels=None) -> list[dict]:
        """DSC (%), HD95 (mm) and volumes per organ present in both segmentations (matched by name).

        ``labels`` (a label table, e.g. the selected model's labels) names ``Segment_<v>`` segments of either
        segmentation first (:meth:`nameSegmentsByValue`).
        """
        from separeg.evaluate.metrics import organ_metrics
        from separeg.rt.organs import to_tg263

        if labels is not None:
            for node in (predictionNode, referenceNode):
                self.nameSegmentsByValue(node, labels)

        pred = self.scene.segmentArrays(predictionNode, volumeNode)
        ref = self.scene.segmentArrays(referenceNode, volumeNode)
        refByOrgan = {to_tg263(name) or name: name for name in ref}
        rows = []
        for predName, mask in pred.items():
            refName = refByOrgan.get(to_tg263(predName) or predName)
            if refName is None:
                continue
            # organ_metrics wants label maps; one organ at a time keeps overlapping segments apart
            result = organ_metrics(mask.astype("uint8"), ref[refName].astype("uint8"),
                                   self.scene.spacing(volumeNode), {1: predName})[0]
            rows.append({"organ": predName, "reference": refName, "status": result.status,
                         "dsc": None if result.dsc is None else 100 * result.dsc, "hd95_mm": result.hd95_mm,
                         "volume_pred_ml": result.volume_pred_ml, "volume_ref_ml": result.volume_ref_ml})
        if not rows:
            raise ValueError("no segment name matches between the two segmentations; rename them (TG-263 names, "
                             "e.g. Parotid_L) so they can be paired" + unnamedSegmentsHint([*pred, *ref]))
        return rows

    # -------------------------------------------------------------------------------------------------- export
    def export(self, segmentationNode, volumeNode, outputFolder: str | os.PathLike, *, rtstruct: bool = True,
               seg: bool = True, nifti: bool = True, useSlicerRT: bool = True) -> BackgroundRun | None:
        """Export to RTSTRUCT / DICOM SEG / NIfTI.

        RTSTRUCT goes through SlicerRT's exporter when it is installed and the volume came from DICOM (and
        ``useSlicerRT``); everything else through ``separeg export``, which writes the CT as a new DICOM series
        first when the volume has none. Returns the background run, or ``None`` when SlicerRT did all the work.

        Generation type (:meth:`contourOrigin`): a segmentation made by Auto-contour names its model and is
        AUTOMATIC while its segments are the model's output, SEMIAUTOMATIC once a planner edited, renamed, added or
        removed segments; any other segmentation is MANUAL, with no algorithm named.
        """
        out = Path(outputFolder)
        out.mkdir(parents=True, exist_ok=True)
        fromDicom = self.scene.dicomSeriesFiles(volumeNode) is not None
        if rtstruct and useSlicerRT and fromDicom and self.scene.hasSlicerRT():
            self.scene.exportRtstructWithSlicerRT(segmentationNode, volumeNode, out)
            self.logMessage.emit(f"RTSTRUCT written by SlicerRT to {out}", "info")
            rtstruct = False
            if not (seg or nifti):
                return None
        folder = self._taskDir("export")
        segments = self.scene.segments(segmentationNode)
        organs = [name for _, name in segments]
        origin = self.contourOrigin(segmentationNode, volumeNode)
        self.scene.exportSegmentsAsLabelmap(segmentationNode, volumeNode, folder / "labels.nii.gz",
                                            {sid: i + 1 for i, (sid, _) in enumerate(segments)})
        table = labelTable(organs)
        if origin is not None:
            table.update(origin.model)  # "model", "separeg_version": the core names the model in the exports
        (folder / "labels.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        ct = self.scene.copyDicomSeries(volumeNode, folder / "ct") or self.scene.exportVolume(volumeNode,
                                                                                            folder / "ct.nii.gz")
        args = [folder / "labels.nii.gz", "--ct", ct, "--out", out, "--labels", folder / "labels.json"]
        if origin is not None:
            args += ["--generation", origin.generation]
            self.logMessage.emit(
                f"{segmentationNode.GetName()}: contours of {origin.modelName}, "
                + (f"edited since Auto-contour ({', '.join(origin.changes)}): semiautomatic" if origin.changes
                   else "unchanged since Auto-contour: automatic"), "info")
        args += [flag for flag, on in (("--rtstruct", rtstruct), ("--seg", seg), ("--nifti", nifti)) if on]
        return self._start("Export", "export", args, lambda: {"folder": out}, logPath=folder / "log.txt")
