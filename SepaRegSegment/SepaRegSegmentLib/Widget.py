"""SepaReg Segment's widget: binds the .ui to the logic (SlicerNNUnet's shape: the module file only mounts it).

UI only: every task is a call on the injected logic (:class:`SepaRegSegmentLib.Logic.SegmentLogic`, or the module's
``SepaRegSegmentLogic``), whose signals drive the progress bar, the log and the results. Tested against fakes only
(it needs Slicer's Qt application); the logic and the scene code underneath run against real MRML in the tier.
"""

from __future__ import annotations

from pathlib import Path

import qt
import slicer

from SepaRegSegmentLib.Install import ensureRequirements
from SepaRegSegmentLib.Requests import FinetuneRequest, TrainingCase, unnamedSegmentsHint

SETTINGS = "SepaReg/Segment/"
# labelTableComboBox data: no table (ask), the file in labelTablePathLineEdit, or "model:<name>" (that model's table)
NO_TABLE, TABLE_FILE, MODEL_TABLE = "", "file", "model:"
UI_FILE = Path(__file__).resolve().parent.parent / "Resources" / "UI" / "SepaRegSegment.ui"


class Widget:
    """The module panel. ``widget.uiWidget`` goes into the module's layout; ``widget.logic`` runs the tasks."""

    def __init__(self, logic) -> None:
        self.logic = logic
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.cases: list[TrainingCase] = []
        self.channelSelectors: list = []  # volume selectors of a multichannel model's further channels
        self.parameters = None  # the scene's choices (Parameters.SegmentParameters), bound to the node selectors
        self.parameterGuiTag = None
        self.sceneObservers: list[int] = []
        self.setup()

    def setup(self) -> None:
        self.uiWidget = slicer.util.loadUI(str(UI_FILE))
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        self.fillDevices()
        self.fillModels()
        self.fillEncoders()
        self.ui.exportFolderPathLineEdit.currentPath = qt.QSettings().value(SETTINGS + "exportFolder", "")

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)
        self.ui.autoContourButton.connect("clicked(bool)", self.onAutoContour)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.updateModelButton.connect("clicked(bool)", self.onUpdateModel)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.trainingSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTrainingSegmentation)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.stopButton.connect("clicked(bool)", self.logic.stop)
        self.timer.connect("timeout()", self.logic.poll)
        self.logic.progress.connect(self.onProgress)
        self.logic.logMessage.connect(self.onLog)
        self.logic.finished.connect(self.onFinished)
        self.connectParameters()
        scene = slicer.mrmlScene
        self.sceneObservers = [scene.AddObserver(scene.StartCloseEvent, self.disconnectParameters),
                               scene.AddObserver(scene.EndCloseEvent, self.connectParameters)]
        self.updateButtons()

    def cleanup(self):
        self.timer.stop()
        self.disconnectParameters()
        for tag in self.sceneObservers:
            slicer.mrmlScene.RemoveObserver(tag)
        self.sceneObservers = []

    # --------------------------------------------------------------------------------------------- parameters
    def connectParameters(self, *_):
        """Bind the node selectors to the scene's parameter node (again after the scene was closed)."""
        self.disconnectParameters()
        if hasattr(self.logic, "getParameters"):
            self.parameters = self.logic.getParameters()
            self.parameterGuiTag = self.parameters.connectGui(self.ui)

    def disconnectParameters(self, *_):
        if self.parameters is not None and self.parameterGuiTag is not None:
            self.parameters.disconnectGui(self.parameterGuiTag)
        self.parameters = self.parameterGuiTag = None

    # ------------------------------------------------------------------------------------------------- models
    def fillDevices(self):
        from separeg.runtime.devices import list_devices

        for device, label in list_devices():
            self.ui.deviceComboBox.addItem(label, device)

    def fillEncoders(self):
        """Shipped and installed encoders first (the default start for fine-tuning), then the installed models (their
        network comes along; organs both label tables name keep their output weights), then random initialisation."""
        self.ui.initEncoderComboBox.clear()
        for encoder in self.logic.encoders():
            self.ui.initEncoderComboBox.addItem(encoder.name, encoder.name)
            self.ui.initEncoderComboBox.setItemData(self.ui.initEncoderComboBox.count - 1, encoder.description,
                                                    qt.Qt.ToolTipRole)
        for model in self.logic.models():
            self.ui.initEncoderComboBox.addItem(f"{model.name} (model: its network and shared organs)", model.name)
            self.ui.initEncoderComboBox.setItemData(
                self.ui.initEncoderComboBox.count - 1,
                f"{model.description}. Organs your label table shares with it (by TG-263 name) keep what it learned; "
                "new organs start fresh. With its own organs this continues the model.", qt.Qt.ToolTipRole)
        self.ui.initEncoderComboBox.addItem("Random initialisation", "")

    def fillModels(self, select: str | None = None):
        models = self.logic.models()
        self.ui.modelComboBox.clear()
        for model in models:
            self.ui.modelComboBox.addItem(model.name, model.name)
        if select:
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(select))
        self.fillLabelTables(models)
        self.onModelChanged()

    def fillLabelTables(self, models):
        """The tables a planner may choose for label maps that carry none; "ask" stays the default, so that no
        table is guessed from the selected model (issue 30)."""
        combo = self.ui.labelTableComboBox
        chosen = combo.currentData
        combo.clear()
        combo.addItem("None: ask when a label map has no table", NO_TABLE)
        combo.addItem("The label table file below", TABLE_FILE)
        for model in models:
            combo.addItem(f"The label table of {model.name}", MODEL_TABLE + model.name)
        combo.setCurrentIndex(max(0, combo.findData(chosen or NO_TABLE)))

    @property
    def labelTable(self):
        """The table the planner chose for ``Segment_<value>`` segments (a file, a model's labels), or None."""
        choice = self.ui.labelTableComboBox.currentData or NO_TABLE
        if choice == TABLE_FILE:
            return self.ui.labelTablePathLineEdit.currentPath or None
        if choice.startswith(MODEL_TABLE):
            return self.logic.model(choice.removeprefix(MODEL_TABLE)).labels
        return None

    @property
    def modelName(self) -> str | None:
        return self.ui.modelComboBox.currentData

    @property
    def device(self) -> str:
        return self.ui.deviceComboBox.currentData or "auto"

    def onModelChanged(self, *_):
        if not self.modelName:
            self.ui.modelInfoLabel.text = "No model installed: import a .separeg file or fine-tune one."
            self.updateChannelSelectors(["CT"])
        else:
            model = self.logic.model(self.modelName)
            self.ui.modelInfoLabel.text = f"{model.description}: {', '.join(model.organNames)}"
            self.updateChannelSelectors(model.channels)
            self.ui.trainingSetLabel.text = f"{len(self.logic.trainingSet(self.modelName))} corrected case(s) stored"
        self.updateButtons()

    def updateChannelSelectors(self, channels: list[str]):
        """One volume selector per input channel: the first is inputVolumeSelector, further ones are added below it."""
        layout = self.ui.inputVolumeSelector.parentWidget().layout()
        for selector in self.channelSelectors:
            layout.removeRow(selector)
        self.channelSelectors = []
        self.ui.label_3.text = f"{channels[0]} volume:"
        for row, name in enumerate(channels[1:], start=1):
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.noneEnabled = False
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = f"The {name} volume, co-registered with the {channels[0]} volume"
            layout.insertRow(row, f"{name} volume:", selector)
            self.channelSelectors.append(selector)

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import SepaReg model", "",
                                              "SepaReg model (*.separeg)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not import the model", waitCursor=True):
            installed = self.logic.importModel(path)
            self.fillModels(select=installed.stem)

    def onExportModel(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export SepaReg model",
                                              f"{self.modelName}.separeg", "SepaReg model (*.separeg)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not export the model"):
                self.logic.exportModel(self.modelName, path)

    # -------------------------------------------------------------------------------------------------- tasks
    def startTask(self, task: str, start):
        """Run ``start()`` (which starts a background task) with the checks and displays every task shares.

        The status line tells how it ends every time: refused (not started), running until ``finished`` (done,
        failed, stopped), or already ended when the logic did the work on the spot (SlicerRT's export).
        """
        if not ensureRequirements():
            self.showStatus(f"{task}: not started: SepaReg's Python packages are not installed")
            return
        self.ui.progressBar.value = 0
        try:
            start()
        except (ValueError, RuntimeError, OSError) as exc:
            self.showStatus(f"{task}: not started: {exc}")
            slicer.util.errorDisplay(f"{task} was not started: {exc}")
            return
        if self.logic.isRunning:  # else finished has already been reported (onFinished)
            self.showStatus(f"{task}: running...")
            self.timer.start()
        self.updateButtons()

    def runNow(self, task: str, work) -> bool:
        """A task done on the spot: ``work()`` returns the result message; errors are shown. The status line says
        how it ended. Returns whether it succeeded."""
        try:
            message = work()
        except (ValueError, RuntimeError, OSError) as exc:
            self.showStatus(f"{task}: failed: {exc}")
            slicer.util.errorDisplay(f"{task} failed: {exc}")
            return False
        self.showStatus(f"{task}: done: {message}")
        return True

    def showStatus(self, text: str):
        self.ui.statusLabel.text = text

    def onAutoContour(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None or not self.modelName:
            slicer.util.errorDisplay("Choose a CT volume and a model.")
            return
        extras = [selector.currentNode() for selector in self.channelSelectors]
        if None in extras:
            slicer.util.errorDisplay("Choose a volume for every input channel of the model.")
            return
        self.startTask("Auto-contour", lambda: self.logic.autoContour(volume, self.modelName, self.device,
                                                                     extraVolumeNodes=extras))

    def onAddToTrainingSet(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.correctedSegmentationSelector.currentNode()
        if volume is None or segmentation is None or not self.modelName:
            slicer.util.errorDisplay("Choose the CT (Auto-contour section), its corrected segmentation and a model.")
            return
        modelName = self.modelName

        def add() -> str:
            path = self.logic.addToTrainingSet(volume, segmentation, modelName, labels=self.labelTable)
            return f"{path.name} stored; {len(self.logic.trainingSet(modelName))} case(s) for {modelName}"

        self.runNow("Add to training set", add)
        self.onModelChanged()

    def onUpdateModel(self):
        self.startTask("Update model", lambda: self.logic.updateModel(self.modelName, self.ui.updateEpochsSpinBox.value,
                                                                     self.device))

    def onAddCase(self):
        volume = self.ui.trainingVolumeSelector.currentNode()
        segmentation = self.ui.trainingSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.errorDisplay("Choose a volume and its segmentation.")
            return
        self.cases.append(TrainingCase(volume.GetName(), volume, segmentation))
        self.showCases()

    def onRemoveCase(self):
        row = self.ui.casesTable.currentRow()
        if 0 <= row < len(self.cases):
            del self.cases[row]
            self.showCases()

    def showCases(self):
        self.ui.casesTable.setRowCount(len(self.cases))
        for r, case in enumerate(self.cases):
            for c, text in enumerate((case.name, case.volumeNode.GetName(), case.segmentationNode.GetName())):
                self.ui.casesTable.setItem(r, c, qt.QTableWidgetItem(text))
        self.updateButtons()

    def onTrainingSegmentation(self, node):
        """Name a label map's ``Segment_<value>`` segments from its own or the chosen table; without one, ask."""
        if node is None:
            return
        self.logic.nameSegments(node, self.labelTable)
        unnamed = self.logic.unnamedSegments(node)
        if unnamed:
            self.showStatus(f"{node.GetName()}: organs unknown{unnamedSegmentsHint(unnamed)}")
        if not self.ui.organsLineEdit.text:
            self.ui.organsLineEdit.text = ", ".join(name for _, name in self.logic.scene.segments(node)
                                                    if name not in unnamed)

    def onFinetune(self):
        folder = self.ui.finetuneOutputPathLineEdit.currentPath
        if not folder:
            slicer.util.errorDisplay("Choose an output folder for the fine-tuning run.")
            return
        dataFolder = self.ui.dataFolderPathLineEdit.currentPath
        unlabelled = self.ui.unlabelledPathLineEdit.currentPath
        archive = self.ui.finetuneArchivePathLineEdit.currentPath
        init = self.ui.initPathLineEdit.currentPath or self.ui.initEncoderComboBox.currentData
        request = FinetuneRequest(
            outDir=Path(folder), modelName=self.ui.newModelNameLineEdit.text.strip(), cases=list(self.cases),
            dataFolder=Path(dataFolder) if dataFolder and not self.cases else None,
            organs=[o.strip() for o in self.ui.organsLineEdit.text.split(",") if o.strip()],
            init=Path(init) if init else None, epochs=self.ui.epochsSpinBox.value, device=self.device,
            unlabelled=Path(unlabelled) if unlabelled else None, archive=Path(archive) if archive else None)
        self.startTask("Fine-tune", lambda: self.logic.finetune(request))

    def onEvaluate(self):
        nodes = (self.ui.predictionSegmentationSelector.currentNode(),
                 self.ui.referenceSegmentationSelector.currentNode(), self.ui.evaluationVolumeSelector.currentNode())
        if None in nodes:
            slicer.util.errorDisplay("Choose the prediction, the reference and their CT volume.")
            return
        if not ensureRequirements():  # evaluation runs in Slicer's process and needs scipy
            return
        rows = []

        def evaluate() -> str:
            rows.extend(self.logic.evaluate(*nodes, labels=self.labelTable))  # no table chosen: ask, never guess
            return f"{len(rows)} organ(s) compared"

        if self.runNow("Evaluate", evaluate):
            self.showMetrics(rows)

    def showMetrics(self, rows: list[dict]):
        table = self.ui.metricsTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = (row["organ"], row["dsc"], row["hd95_mm"], row["volume_pred_ml"], row["volume_ref_ml"])
            for c, value in enumerate(values):
                text = value if isinstance(value, str) else ("n/a" if value is None else f"{value:.1f}")
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def onExport(self):
        segmentation = self.ui.exportSegmentationSelector.currentNode()
        volume = self.ui.exportVolumeSelector.currentNode()
        folder = self.ui.exportFolderPathLineEdit.currentPath
        if segmentation is None or volume is None or not folder:
            slicer.util.errorDisplay("Choose the segmentation, its CT volume and an output folder.")
            return
        qt.QSettings().setValue(SETTINGS + "exportFolder", folder)
        formats = {"rtstruct": self.ui.rtstructCheckBox.checked, "seg": self.ui.segCheckBox.checked,
                   "nifti": self.ui.niftiCheckBox.checked}
        self.startTask("Export", lambda: self.logic.export(segmentation, volume, folder, **formats))

    # ------------------------------------------------------------------------------------------------ updates
    def onProgress(self, stage, step, total, eta):
        self.ui.progressBar.value = int(100 * step / total) if total else 0
        self.ui.statusLabel.text = (f"{self.logic.task}: {stage} {step}/{total}"
                                    + (f", {eta / 60:.1f} min left" if eta else ""))

    def onLog(self, message, level):
        self.ui.logTextEdit.appendPlainText(message if level in ("info", "output") else f"{level.upper()}: {message}")

    def onFinished(self, result):
        self.timer.stop()
        warnings = result.outputs.get("warnings") or []
        # the planner must see a body-site or left-out-organ warning without opening the log
        suffix = f" | {len(warnings)} warning(s), first: {warnings[0]}" if warnings else ""
        self.showStatus(f"{result.task}: {result.state.value}: {result.message}{suffix}")
        if result.state.value == "done":
            self.ui.progressBar.value = 100
            node = result.outputs.get("segmentationNode")
            if node is not None:
                self.ui.correctedSegmentationSelector.setCurrentNode(node)
                self.ui.predictionSegmentationSelector.setCurrentNode(node)
                self.ui.exportSegmentationSelector.setCurrentNode(node)
                slicer.util.setSliceViewerLayers(background=self.ui.inputVolumeSelector.currentNode())
            if "model" in result.outputs:
                self.fillModels(select=Path(result.outputs["model"]).stem)
        elif result.state.value == "failed":
            slicer.util.errorDisplay(f"{result.task} failed: {result.message}")
        self.updateButtons()

    def updateButtons(self):
        running = self.logic is not None and self.logic.isRunning
        hasModel = bool(self.modelName)
        for button in (self.ui.autoContourButton, self.ui.addToTrainingSetButton, self.ui.updateModelButton,
                       self.ui.exportModelButton):
            button.enabled = hasModel and not running
        for button in (self.ui.finetuneButton, self.ui.exportButton, self.ui.importModelButton):
            button.enabled = not running
        self.ui.stopButton.enabled = running

