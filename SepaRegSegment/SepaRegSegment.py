"""SepaRegSegment: Auto-contour, fine-tune, correct-and-learn, evaluate and export with SepaReg models.

The module file declares the module and mounts the widget (SlicerNNUnet's shape); the work is in SepaRegSegmentLib
(Widget: the panel; Logic: tasks as ``separeg`` background processes; SceneIO: the only code that touches MRML) and
in the ``separeg`` core. ``Testing/test_slicer_real_*.py`` construct these classes against Slicer's real MRML.
"""

from __future__ import annotations

import unittest
from pathlib import Path

import slicer
from SepaRegSegmentLib.Logic import SegmentLogic
from SepaRegSegmentLib.Requests import FinetuneRequest, TrainingCase
from SepaRegSegmentLib.SceneIO import SceneIO
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class SepaRegSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SepaReg Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SepaReg developers"]
        self.parent.helpText = (
            "Auto-contour organs at risk on CT with a SepaReg model, correct the result in Segment Editor and "
            "teach the model with it, fine-tune a new model from a few annotated scans, evaluate against a "
            "reference and export RTSTRUCT / DICOM SEG / NIfTI. Exports of Auto-contour results name the model: "
            "AUTOMATIC while unchanged, SEMIAUTOMATIC once edited; other contours are MANUAL. Automatic contours "
            "must be reviewed before clinical use.")
        self.parent.acknowledgementText = (
            "Implements SepaReg (Wang et al., AAAI 2022). Sample data: OpenKBP (TCIA head-and-neck CT).")


class SepaRegSegmentWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: SepaRegSegmentLogic | None = None
        self.widget = None

    def setup(self):
        from SepaRegSegmentLib.Widget import Widget

        ScriptedLoadableModuleWidget.setup(self)
        self.logic = SepaRegSegmentLogic()
        self.widget = Widget(self.logic)
        self.layout.addWidget(self.widget.uiWidget)

    def cleanup(self):
        if self.widget is not None:
            self.widget.cleanup()


class SepaRegSegmentLogic(SegmentLogic, ScriptedLoadableModuleLogic):
    """The module's logic: :class:`SegmentLogic` on the real scene, plus Slicer's parameter node.

    Our base comes first and each ``__init__`` is called once, explicitly: ``ScriptedLoadableModuleLogic.__init__``
    calls ``super().__init__()`` (Slicer >= 5.0), which after it in this order is ``object.__init__``. The other
    order ran ``SegmentLogic.__init__()`` without its arguments (TypeError: the module did not open).
    """

    def __init__(self):
        SegmentLogic.__init__(self, SceneIO(), workDir=Path(slicer.app.temporaryPath) / "SepaReg")
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameters(self):
        """The parameter node wrapped as :class:`SepaRegSegmentLib.Parameters.SegmentParameters` (the widget binds
        it to the node selectors)."""
        from SepaRegSegmentLib.Parameters import SegmentParameters

        return SegmentParameters(self.getParameterNode())


class SepaRegSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (``make slicer-test``) and in the real-MRML tier: label maps loaded as Slicer loads them (named
    from labels.json), a tiny fine-tune from the loaded pairs (installed, or refused as useless saying why),
    Auto-contour with the shipped model, segments checked, evaluation."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_finetune_autocontour_evaluate()

    def test_finetune_autocontour_evaluate(self):
        import tempfile

        from separeg.experiments.demo import SAMPLE_DATA
        from separeg.runtime.background import RunState

        work = Path(tempfile.mkdtemp(prefix="SepaRegSegmentTest "))
        logic = SepaRegSegmentLogic()
        cases = []
        for name in ("pt_1", "pt_22"):
            volume = slicer.util.loadVolume(str(SAMPLE_DATA / f"{name}_ct.nii.gz"))
            segmentation = logic.loadSegmentation(SAMPLE_DATA / f"{name}_oar.nii.gz")  # labels.json is beside it
            cases.append(TrainingCase(name, volume, segmentation))
        organs = [name for _, name in logic.scene.segments(cases[0].segmentationNode)]
        self.assertIn("Bone_Mandible", organs)  # named by value from labels.json, not Segment_7
        self.delayDisplay("Tiny fine-tune")
        request = FinetuneRequest(outDir=work / "finetune", modelName="SepaRegSelfTest", cases=cases, organs=organs,
                                  epochs=1, device="cpu", extraArgs=["--encoder", "resnet18-slim",
                                                                     "--steps-per-epoch", "2", "--batch-size", "2"])
        results = []
        logic.finished.connect(results.append)
        run = logic.finetune(request)
        self.assertEqual(run.wait(timeout=900), RunState.DONE, run.message)
        if results[-1].state is RunState.DONE:
            self.assertEqual(logic.model("SepaRegSelfTest").organNames, organs)
        else:  # two steps find almost no organ: the useless-model rule (< 1 % DSC) refuses it, saying why
            self.assertIn("the model was not installed", results[-1].message)
        self.delayDisplay("Auto-contour with the shipped model")
        run = logic.autoContour(cases[0].volumeNode, "hn-oar-7", device="cpu")
        self.assertEqual(run.wait(timeout=900), RunState.DONE, run.message)
        node = results[-1].outputs["segmentationNode"]
        self.assertLessEqual(set(organs), {name for _, name in logic.scene.segments(node)})
        origin = logic.contourOrigin(node, cases[0].volumeNode)  # the model recorded on the node: exports name it
        self.assertEqual((origin.modelName, origin.generation), ("hn-oar-7", "automatic"))
        rows = logic.evaluate(node, cases[0].segmentationNode, cases[0].volumeNode)
        self.assertEqual([row["organ"] for row in rows if row["dsc"] is not None], organs)
        self.delayDisplay("Test passed")


if __name__ == "__main__":
    unittest.main()
