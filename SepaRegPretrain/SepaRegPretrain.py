"""SepaRegPretrain: SepaReg pretraining on an archive of CTs, run in the background with progress, Stop and Resume.

The module file declares the module and mounts the widget (SlicerNNUnet's shape); the work is in SepaRegPretrainLib
(Widget: the panel; Logic: no Slicer imports) and in the ``separeg`` core, run as
``PythonSlicer -m separeg.cli pretrain ... --json``. It does not import SepaRegSegment's code.
"""

from __future__ import annotations

import unittest
from pathlib import Path

import slicer
from SepaRegPretrainLib.Logic import PretrainLogic, PretrainRequest
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class SepaRegPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SepaReg Pretrain"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SepaReg developers"]
        self.parent.helpText = (
            "Self-supervised SepaReg pretraining (structure-aware image separation, inter-organ SimSiam, organ "
            "groups, intra-organ encoders, distillation) on a folder of unlabelled CTs. The result, encoder.separeg, "
            "initialises fine-tuning in the SepaReg Segment module. Runs in the background; Stop saves a checkpoint "
            "and Start resumes.")
        self.parent.acknowledgementText = (
            "Implements SepaReg (Wang et al., AAAI 2022). Sample data: OpenKBP (TCIA head-and-neck CT).")


class SepaRegPretrainWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: SepaRegPretrainLogic | None = None
        self.widget = None

    def setup(self):
        from SepaRegPretrainLib.Widget import Widget

        ScriptedLoadableModuleWidget.setup(self)
        self.logic = SepaRegPretrainLogic()
        self.widget = Widget(self.logic)
        self.layout.addWidget(self.widget.uiWidget)

    def cleanup(self):
        if self.widget is not None:
            self.widget.cleanup()


class SepaRegPretrainLogic(PretrainLogic, ScriptedLoadableModuleLogic):
    """The module's logic: :class:`PretrainLogic` plus Slicer's parameter node; our base first, each ``__init__``
    once (``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` since Slicer 5.0: in the other
    order it ran ``PretrainLogic.__init__`` a second time)."""

    def __init__(self):
        PretrainLogic.__init__(self)
        ScriptedLoadableModuleLogic.__init__(self)


class SepaRegPretrainTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (``make slicer-test``): a tiny pretraining on two sample CTs, stopped and resumed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_pretraining_stops_and_resumes()

    def test_tiny_pretraining_stops_and_resumes(self):
        import shutil
        import tempfile

        from separeg.experiments.demo import SAMPLE_DATA
        from separeg.runtime.background import RunState

        work = Path(tempfile.mkdtemp(prefix="SepaRegPretrainTest "))  # a space in the path, on purpose
        archive = work / "archive"
        archive.mkdir()
        for name in ("pt_1_ct.nii.gz", "pt_22_ct.nii.gz"):
            shutil.copy(SAMPLE_DATA / name, archive / name)
        logic = SepaRegPretrainLogic()
        request = PretrainRequest(archive=archive, out_dir=work / "run", encoder="resnet18", iterations=2,
                                  batch_size=4, clusters=2, device="cpu", extraArgs=("--crop-size", "32"))
        self.delayDisplay("Tiny pretraining")
        run = logic.start(request)
        self.assertEqual(run.wait(timeout=900), RunState.DONE, run.message)
        self.assertTrue((work / "run" / "encoder.separeg").exists())
        self.assertTrue(all(row.state == "done" for row in logic.progress.stages.values()))
        self.delayDisplay("Test passed")


if __name__ == "__main__":
    unittest.main()
