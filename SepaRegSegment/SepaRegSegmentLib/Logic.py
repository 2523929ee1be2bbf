"""SepaRegSegment logic: fine-tune, Auto-contour, evaluate, correct-and-learn and export.

No widgets and no direct MRML calls: the scene is reached through an injected :class:`SceneIO`-like object and
the core runs as ``separeg`` background processes (:class:`separeg.runtime.background.BackgroundRun`), so the tests
drive this class with a fake scene and real processes. Every task is one background run at a time; results come back
through signals, on the thread that calls :meth:`poll` (the widget's timer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from separeg.runtime.background import BackgroundRun, RunState, Signal, cli_command, core_root, default_python
from separeg.runtime.events import Event, EventType
from SepaRegSegmentLib.Models import ModelLibrary
from SepaRegSegmentLib.Provenance import ContourProvenance, SegmentNaming
from SepaRegSegmentLib.Requests import (
    TRAINING_SET_LABELS,
    AfterRunError,
    FinetuneRequest,
    TaskResult,
    TrainingCase,
    labelTable,
    matchSegments,
    refuseUselessModel,
    safeName,
    unnamedSegmentsHint,
)

STOP_FILE = "STOP"


def afterRun(step: Callable[[], dict]) -> Callable[[], dict]:
    """``step`` as the end of a run: its errors become :class:`AfterRunError` (the run's own outputs are kept)."""

    def done() -> dict:
        try:
            return step()
        except (RuntimeError, OSError) as exc:
            raise AfterRunError(f"{exc}; the run's other outputs are kept") from exc

    return done


class SegmentLogic(ModelLibrary, ContourProvenance, SegmentNaming):
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
            except AfterRunError as exc:  # the run's result was refused or not exported: say so, and what to do
                state, message = RunState.FAILED, f"the run finished, but {exc}"
            except Exception as exc:  # noqa: BLE001 - shown to the user, with the run's own outputs kept
                state, message = RunState.FAILED, f"the run finished but its result could not be loaded: {exc}"
        if outputs.get("note"):  # what Slicer did after the run (e.g. SlicerRT's RTSTRUCT)
            message = f"{message}; {outputs['note']}"
        self.finished.emit(TaskResult(self.task or "", state, message, outputs))

    def _finishNow(self, task: str, work: Callable[[], dict]) -> None:
        """A task done on the spot, without a background run: ``finished`` reports it as a run would (done, or
        failed with the error), so the panel's status ends the same way; ``work`` returns the outputs and a
        ``note`` (the message)."""
        if self.isRunning:
            raise RuntimeError(f"{self.task} is still running; wait for it or stop it first")
        self.task, self.run = task, None
        try:
            outputs = work()
        except (RuntimeError, OSError, ValueError) as exc:  # AfterRunError is a RuntimeError
            self.finished.emit(TaskResult(task, RunState.FAILED, str(exc)))
            return
        self.finished.emit(TaskResult(task, RunState.DONE, outputs.pop("note", ""), outputs))

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
            return {"segmentationNode": node, "folder": out, "labels": description["labels"],
                    "warnings": description.get("warnings", [])}

        return self._start("Auto-contour", "contour", [ct, *extras, "--model", model.path, "--out", out, "--device",
                                                       device],
                           load, logPath=folder / "log.txt")

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

    def finetune(self, request: FinetuneRequest, task: str = "Fine-tune") -> BackgroundRun:
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
        if request.archive is not None:  # registered first (progress stage "archive"), then trained on
            args += ["--archive", request.archive]

        def install() -> dict:
            refuseUselessModel(run / "model.separeg")
            path = self.importModel(run / "model.separeg", request.modelName, replace=True)
            return {"model": path}

        return self._start(task, "finetune", args, install, stopFile=out / STOP_FILE,
                           logPath=out / "log.txt")

    # ------------------------------------------------------------------------------------- correct and learn
    def trainingSetDir(self, modelName: str) -> Path:
        from separeg.runtime.model_store import user_model_dir

        return user_model_dir() / "training" / safeName(modelName)

    def addToTrainingSet(self, volumeNode, segmentationNode, modelName: str, labels=None) -> Path:
        """Store a corrected case for "Update model" (beside the per-user models; case names must be unique).

        ``Segment_<v>`` segments are named by :meth:`nameSegments` (the table travelling with the data, else
        ``labels``), never from the model's table by guess; the case's values then follow the model's organs.
        """
        model = self.model(modelName)
        self.nameSegments(segmentationNode, labels)
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
        request = FinetuneRequest(outDir=self._taskDir("update"), modelName=modelName,
                                  dataFolder=self.trainingSetDir(modelName), init=model.path, epochs=epochs,
                                  device=device, extraArgs=tuple(extraArgs))
        self.keepPreviousVersion(model)
        return self.finetune(request, task="Update model")

    def keepPreviousVersion(self, model) -> None:
        """Back up a per-user model before its update replaces it (``<name>.previous.separeg.bak`` beside it).

        Nothing is written into the extension's install folder (read-only, or replaced when the extension is
        updated): the update of a shipped model is installed as a per-user model of the same name, which
        :mod:`separeg.runtime.model_store` finds first, and the shipped file stays as it is.
        """
        from separeg.runtime.model_store import user_model_dir

        userDir = user_model_dir()
        if model.path.parent.resolve() != userDir.resolve():
            self.logMessage.emit(f"{model.name} is a shipped model: the update is installed as your own copy in "
                                 f"{userDir}, which takes its place (delete that copy to use the shipped one again)",
                                 "info")
            return
        backup = userDir / f"{model.path.stem}.previous.separeg.bak"
        shutil.copyfile(model.path, backup)
        self.logMessage.emit(f"previous version kept as {backup}", "info")

    # ------------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, predictionNode, referenceNode, volumeNode, labels=None) -> list[dict]:
        """DSC (%), HD95 (mm) and volumes per organ present in both segmentations (matched by name).

        ``Segment_<v>`` segments of either segmentation are named first by :meth:`nameSegments`: from the table
        travelling with each (``labels.json`` / ``segmentation.json`` beside its file), else from ``labels`` (a
        table the planner chose); left unnamed, they are refused with the hint.
        """
        from separeg.evaluate.metrics import organ_metrics
        from separeg.rt.organs import to_tg263

        for node in (predictionNode, referenceNode):
            self.nameSegments(node, labels)

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
        first when the volume has none; SlicerRT writes after the core's run. Returns the background run, or ``None``
        when SlicerRT did all the work (``finished`` has then reported it already, done or failed).

        Generation type (:meth:`contourOrigin`): a segmentation made by Auto-contour names its model and is
        AUTOMATIC while its segments are the model's output, SEMIAUTOMATIC once a planner edited, renamed, added or
        removed segments; any other segmentation is MANUAL, with no algorithm named.
        """
        out = Path(outputFolder)
        out.mkdir(parents=True, exist_ok=True)
        fromDicom = self.scene.dicomSeriesFiles(volumeNode) is not None
        slicerRT = rtstruct and useSlicerRT and fromDicom and self.scene.hasSlicerRT()

        def withSlicerRT() -> dict:
            self.scene.exportRtstructWithSlicerRT(segmentationNode, volumeNode, out)
            note = f"RTSTRUCT written by SlicerRT to {out}"
            self.logMessage.emit(note, "info")
            return {"folder": out, "note": note}

        if slicerRT and not (seg or nifti):
            return self._finishNow("Export", withSlicerRT)
        rtstruct = rtstruct and not slicerRT
        folder = self._taskDir("export")
        args = [*self._exportInputs(segmentationNode, volumeNode, folder), "--out", out]
        args += [flag for flag, on in (("--rtstruct", rtstruct), ("--seg", seg), ("--nifti", nifti)) if on]
        # SlicerRT writes after the core, into the folder the core accepted (the core checks the folder first)
        return self._start("Export", "export", args, afterRun(withSlicerRT) if slicerRT else lambda: {"folder": out},
                           logPath=folder / "log.txt")

    def _exportInputs(self, segmentationNode, volumeNode, folder: Path) -> list:
        """Write what ``separeg export`` reads (label map, labels.json naming the model, CT) into ``folder``;
        returns those arguments, with ``--generation`` for contours Auto-contour made."""
        segments = self.scene.segments(segmentationNode)
        origin = self.contourOrigin(segmentationNode, volumeNode)
        self.scene.exportSegmentsAsLabelmap(segmentationNode, volumeNode, folder / "labels.nii.gz",
                                            {sid: i + 1 for i, (sid, _) in enumerate(segments)})
        table = labelTable([name for _, name in segments])
        if origin is not None:
            table.update(origin.model)  # "model", "separeg_version": the core names the model in the exports
        (folder / "labels.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        ct = self.scene.copyDicomSeries(volumeNode, folder / "ct") or self.scene.exportVolume(volumeNode,
                                                                                            folder / "ct.nii.gz")
        args = [folder / "labels.nii.gz", "--ct", ct, "--labels", folder / "labels.json"]
        if origin is not None:
            args += ["--generation", origin.generation]
            self.logMessage.emit(
                f"{segmentationNode.GetName()}: contours of {origin.modelName}, "
                + (f"edited since Auto-contour ({', '.join(origin.changes)}): semiautomatic" if origin.changes
                   else "unchanged since Auto-contour: automatic"), "info")
        return args
