"""SepaReg Pretrain's widget: binds the .ui to the logic (SlicerNNUnet's shape: the module file only mounts it).

UI only: every action is a call on the injected logic (:class:`SepaRegPretrainLib.Logic.PretrainLogic`, or the
module's ``SepaRegPretrainLogic``), whose signals drive the per-stage progress bars and the log. Tested against fakes
only (it needs Slicer's Qt application); the logic underneath runs real background pretraining in the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import qt
import slicer

from SepaRegPretrainLib.Install import ensureRequirements
from SepaRegPretrainLib.Logic import METHODS, STAGE_TITLES, STAGES, PretrainRequest, run_status

SETTINGS = "SepaReg/Pretrain/"
UI_FILE = Path(__file__).resolve().parent.parent / "Resources" / "UI" / "SepaRegPretrain.ui"


class Widget:
    """The module panel. ``widget.uiWidget`` goes into the module's layout; ``widget.logic`` runs the pretraining."""

    def __init__(self, logic) -> None:
        self.logic = logic
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.stageBars: dict[str, qt.QProgressBar] = {}
        self.setup()

    def setup(self) -> None:
        self.uiWidget = slicer.util.loadUI(str(UI_FILE))
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        for method in METHODS:
            self.ui.methodComboBox.addItem(method)
        self.ui.encoderComboBox.addItem("ResNet-50 (paper)", "resnet50")
        self.ui.encoderComboBox.addItem("ResNet-18 (faster)", "resnet18")
        self.ui.encoderComboBox.addItem("ResNet-18 slim (fastest; the starter models)", "resnet18-slim")
        self.ui.encoderComboBox.addItem("Swin Transformer (SwinUNETR)", "swin")
        self.ui.shippedEncodersLabel.text = self.logic.shippedEncodersText()
        for stage in STAGES:
            item = qt.QListWidgetItem(STAGE_TITLES[stage])
            item.setData(qt.Qt.UserRole, stage)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            self.ui.stagesListWidget.addItem(item)
            bar = qt.QProgressBar()
            bar.setFormat("%p%")
            self.ui.stageProgressWidget.layout().addRow(STAGE_TITLES[stage], bar)
            self.stageBars[stage] = bar
        self.fillDevices()

        settings = qt.QSettings()
        self.ui.archivePathLineEdit.currentPath = settings.value(SETTINGS + "archive", "")
        self.ui.outputPathLineEdit.currentPath = settings.value(SETTINGS + "output", "")

        self.ui.scanButton.connect("clicked(bool)", self.onScan)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.outputPathLineEdit.connect("currentPathChanged(QString)", self.onOutputChanged)
        self.timer.connect("timeout()", self.logic.poll)
        self.logic.progressChanged.connect(self.onProgress)
        self.logic.logMessage.connect(self.onLog)
        self.logic.finished.connect(self.onFinished)
        self.logic.scanFinished.connect(self.onScanFinished)
        self.updateButtons()

    def cleanup(self):
        self.timer.stop()

    def fillDevices(self):
        from separeg.runtime.devices import list_devices

        self.ui.deviceComboBox.clear()
        for device, label in list_devices():
            self.ui.deviceComboBox.addItem(label, device)

    def request(self) -> PretrainRequest:
        stages = []
        for i in range(self.ui.stagesListWidget.count):
            item = self.ui.stagesListWidget.item(i)
            if item.checkState() == qt.Qt.Checked:
                stages.append(item.data(qt.Qt.UserRole))
        return PretrainRequest(
            archive=Path(self.ui.archivePathLineEdit.currentPath), out_dir=Path(self.ui.outputPathLineEdit.currentPath),
            method=self.ui.methodComboBox.currentText, encoder=self.ui.encoderComboBox.currentData,
            iterations=self.ui.iterationsSpinBox.value, batch_size=self.ui.batchSizeSpinBox.value,
            clusters=self.ui.clustersSpinBox.value, stages=tuple(stages),
            device=self.ui.deviceComboBox.currentData or "auto", restart=self.ui.restartCheckBox.checked,
            channels=self.ui.channelsLineEdit.text.strip())

    # ------------------------------------------------------------------------------------------------ actions
    def onScan(self):
        archive = self.ui.archivePathLineEdit.currentPath
        if not archive or not os.path.isdir(archive):
            slicer.util.errorDisplay("Choose an existing archive folder first.")
            return
        if not ensureRequirements():
            return
        manifest = Path(slicer.app.temporaryPath) / "SepaReg" / "scan_manifest.json"
        self.ui.statusLabel.text = "Scanning the archive..."
        self.logic.scan(archive, manifest)
        self.timer.start()
        self.updateButtons()

    def onScanFinished(self, manifest, message):
        table = self.ui.scanTable
        rows = self.logic.manifestRows(manifest) if manifest else []
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        self.ui.statusLabel.text = message
        self.updateButtons()

    def onStart(self):
        request = self.request()
        problems = request.problems()
        if problems:
            slicer.util.errorDisplay("\n".join(problems))
            return
        if not ensureRequirements():
            return
        settings = qt.QSettings()
        settings.setValue(SETTINGS + "archive", str(request.archive))
        settings.setValue(SETTINGS + "output", str(request.out_dir))
        self.ui.logTextEdit.clear()
        try:
            self.logic.start(request)
        except (ValueError, RuntimeError, OSError) as exc:
            slicer.util.errorDisplay(f"Could not start the pretraining: {exc}")
            return
        for bar in self.stageBars.values():
            bar.value = 0
        self.onProgress(self.logic.progress, None)
        self.ui.statusLabel.text = "Running..."
        self.timer.start()
        self.updateButtons()

    def onStop(self):
        self.logic.stop()
        self.ui.statusLabel.text = "Stopping after the current step (a checkpoint is saved)..."

    def onOutputChanged(self, path):
        status = run_status(path) if path else None
        if status and status["exists"]:
            done = ", ".join(STAGE_TITLES[s] for s in status["done"]) or "none"
            self.ui.statusLabel.text = (f"Existing run (finished stages: {done}). "
                                        + ("Start resumes it." if status["resumable"] else "")
                                        + (f" Encoder: {status['encoder']}" if status["encoder"] else ""))
        self.updateButtons()

    # ------------------------------------------------------------------------------------------------ updates
    def onProgress(self, progress, stage):
        for name, row in progress.stages.items():
            bar = self.stageBars[name]
            bar.value = row.percent
            eta = f", {row.eta_s / 60:.0f} min left" if row.state == "running" and row.eta_s else ""
            bar.setFormat(f"%p% {row.state}{eta}")

    def onLog(self, message, level):
        self.ui.logTextEdit.appendPlainText(message if level in ("info", "output") else f"{level.upper()}: {message}")

    def onFinished(self, state, message):
        self.timer.stop()
        self.ui.statusLabel.text = f"{state.value.capitalize()}: {message}"
        if state.value == "failed":
            log = Path(self.ui.outputPathLineEdit.currentPath) / "slicer_log.txt"
            slicer.util.errorDisplay(f"Pretraining failed: {message}\n\nThe log is in {log}")
        self.updateButtons()

    def updateButtons(self):
        running = self.logic is not None and self.logic.isRunning
        self.ui.startButton.enabled = not running
        self.ui.stopButton.enabled = running
        self.ui.scanButton.enabled = not running
