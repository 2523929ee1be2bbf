"""Real-MRML tier: scene hygiene. No SepaReg Segment operation leaves a node behind in Slicer's scene.

Each operation runs between two snapshots of every node in the scene (ID -> class, all classes): the only new nodes
may be the operation's outputs (a loaded or contoured segmentation) with their own display and storage nodes, and no
node that was there may vanish. A node left behind is saved with the scene and piles up with every use (issue 30:
one ``vtkMRMLLabelMapVolumeDisplayNode`` per organ per Auto-contour, left by
``slicer.util.updateSegmentBinaryLabelmapFromArray``, Slicer/Slicer#8463).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from SepaRegSegmentLib.Requests import TrainingCase

from conftest import run_done as run

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"


@pytest.fixture()
def logic(segment_logic):
    return segment_logic


def sceneNodes(scene) -> dict[str, str]:
    """Every node of the scene: ID -> class name."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return {node.GetID(): node.GetClassName() for node in nodes}


def withOwnNodes(*outputs) -> dict[str, str]:
    """The output nodes and the display and storage nodes that belong to them: ID -> class name."""
    owned = {}
    for node in outputs:
        parts = [node, *(node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())),
                 *(node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes()))]
        owned.update({part.GetID(): part.GetClassName() for part in parts if part is not None})
    return owned


class SceneDiff:
    """Checks that an operation adds only its outputs (with their own display/storage nodes) and removes nothing."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.before = sceneNodes(scene)

    def check(self, what: str, *outputs) -> None:
        after = sceneNodes(self.scene)
        gone = {i: c for i, c in self.before.items() if i not in after}
        new = {i: c for i, c in after.items() if i not in self.before}
        expected = withOwnNodes(*outputs)
        left = {i: c for i, c in new.items() if i not in expected}
        assert not left, f"{what} left node(s) behind: {sorted(left.values())}"
        assert not gone, f"{what} removed node(s): {sorted(gone.values())}"
        assert set(expected) <= set(after), f"{what}: its output is not in the scene"
        self.before = after


def test_no_operation_leaves_a_node_behind(real_slicer, logic, tmp_path: Path) -> None:
    """Load label maps, Auto-contour, evaluate, export, add to the training set, write fine-tuning cases: each
    adds nothing to the scene but its outputs (every node class counted)."""
    slicer = real_slicer
    slicer.mrmlScene.GetSubjectHierarchyNode()  # Slicer's singleton, made on first use
    volume = slicer.util.loadVolume(str(SAMPLES / "pt_1_ct.nii.gz"))
    diff = SceneDiff(slicer.mrmlScene)

    reference = logic.loadSegmentation(SAMPLES / "pt_1_oar.nii.gz")  # a label map, named from labels.json
    diff.check("loading a label map", reference)
    contoured = run(logic, lambda: logic.autoContour(volume, "hn-oar-7", device="cpu")).outputs["segmentationNode"]
    diff.check("Auto-contour", contoured)
    logic.evaluate(contoured, reference, volume)
    diff.check("Evaluate")
    run(logic, lambda: logic.export(contoured, volume, tmp_path / "export"))
    diff.check("Export")
    logic.addToTrainingSet(volume, reference, "hn-oar-7")
    diff.check("Add to training set")
    logic.writeCase(TrainingCase("pt_1", volume, reference), ["Parotid_L", "Bone_Mandible"], tmp_path)
    diff.check("writing a fine-tuning case")
