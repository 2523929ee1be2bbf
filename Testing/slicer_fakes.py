"""Small fakes of the ``slicer`` API for the logic tests that need no scene (test_slicer_segment.py).

Everything that touches MRML is tested against Slicer's real MRML instead (slicer_tier.py, test_slicer_real_*.py);
these fakes only stand in for volume export and node names there, backed by SimpleITK images. Signatures follow
Slicer's ``slicer/util.py`` and the MRML classes (SLICER_NOTES §5); arrays are (K, J, I) like ``arrayFromVolume``.
``install()`` puts the fake module in ``sys.modules`` as ``slicer``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import SimpleITK as sitk


class FakeVolumeNode:
    def __init__(self, name: str, image: sitk.Image, attributes: dict | None = None) -> None:
        self.name, self.image, self.attributes = name, image, dict(attributes or {})

    def GetName(self) -> str:
        return self.name

    def GetSpacing(self) -> tuple[float, float, float]:
        return self.image.GetSpacing()

    def GetAttribute(self, key: str):
        return self.attributes.get(key)


class FakeSegment:
    def __init__(self, name: str, color) -> None:
        self.name, self.color, self.tags = name, tuple(color), {}
        self.terminology: str | None = None

    def GetName(self) -> str:
        return self.name

    def SetName(self, name: str) -> None:
        self.name = name

    def SetTerminology(self, entry: str) -> None:
        self.terminology = entry


class FakeSegmentation:
    def __init__(self) -> None:
        self.segments: dict[str, FakeSegment] = {}
        self.masks: dict[str, np.ndarray] = {}

    def AddEmptySegment(self, segmentId: str = "", segmentName: str = "", color=None) -> str:
        sid = segmentId or f"Segment_{len(self.segments) + 1}"
        assert sid not in self.segments, f"duplicate segment id {sid}"
        self.segments[sid] = FakeSegment(segmentName or sid, color or (0.5, 0.5, 0.5))
        return sid

    def GetSegment(self, sid: str) -> FakeSegment:
        return self.segments[sid]

    def GetNumberOfSegments(self) -> int:
        return len(self.segments)

    def GetNthSegmentID(self, i: int) -> str:
        return list(self.segments)[i]


class FakeSegmentationNode:
    def __init__(self, name: str) -> None:
        self.name, self.segmentation = name, FakeSegmentation()
        self.reference = None
        self.displayed = self.surface = False

    def GetName(self) -> str:
        return self.name

    def GetSegmentation(self) -> FakeSegmentation:
        return self.segmentation

    def CreateDefaultDisplayNodes(self) -> None:
        self.displayed = True

    def SetReferenceImageGeometryParameterFromVolumeNode(self, node) -> None:
        self.reference = node

    def CreateClosedSurfaceRepresentation(self) -> None:
        self.surface = True


class FakeScene:
    def __init__(self) -> None:
        self.nodes: list = []

    def AddNewNodeByClass(self, cls: str, name: str = ""):
        assert cls == "vtkMRMLSegmentationNode", cls
        node = FakeSegmentationNode(name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node) -> None:
        self.nodes.remove(node)


def make_segmentation(name: str, reference: FakeVolumeNode, masks: dict[str, np.ndarray]) -> FakeSegmentationNode:
    node = FakeSegmentationNode(name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for segment_name, mask in masks.items():
        sid = node.segmentation.AddEmptySegment(segment_name, segment_name, (1.0, 0.0, 0.0))
        node.segmentation.masks[sid] = mask.astype(np.uint8)
    return node


def install(monkeypatch) -> types.ModuleType:
    """A fresh fake ``slicer`` module (with its own scene) in ``sys.modules``."""
    scene = FakeScene()

    def array_from_volume(node: FakeVolumeNode) -> np.ndarray:
        return sitk.GetArrayFromImage(node.image)

    def export_node(node: FakeVolumeNode, filename: str, properties=None, world=False) -> bool:
        sitk.WriteImage(node.image, str(filename))
        return True

    def update_volume_from_array(node: FakeVolumeNode, array: np.ndarray) -> None:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(node.image)
        node.image = image

    def load_label_volume(filename: str, properties=None) -> FakeVolumeNode:
        node = FakeVolumeNode(Path(filename).name, sitk.ReadImage(str(filename)))
        scene.nodes.append(node)
        return node

    def segment_array(segmentationNode, segmentId, referenceVolumeNode=None) -> np.ndarray:
        mask = segmentationNode.segmentation.masks.get(segmentId)
        if mask is None:
            return np.zeros(array_from_volume(referenceVolumeNode).shape, np.uint8)
        return mask.copy()

    def update_segment(narray, segmentationNode, segmentId, referenceVolumeNode=None) -> None:
        assert segmentId in segmentationNode.segmentation.segments
        segmentationNode.segmentation.masks[segmentId] = np.array(narray, dtype=np.uint8)

    class VolumesLogic:
        def CreateAndAddLabelVolume(self, reference: FakeVolumeNode, name: str) -> FakeVolumeNode:
            image = sitk.Image(reference.image.GetSize(), sitk.sitkUInt8)
            image.CopyInformation(reference.image)
            node = FakeVolumeNode(name, image)
            scene.nodes.append(node)
            return node

    module = types.ModuleType("slicer")
    module.mrmlScene = scene
    module.util = types.SimpleNamespace(
        arrayFromVolume=array_from_volume, exportNode=export_node, updateVolumeFromArray=update_volume_from_array,
        loadLabelVolume=load_label_volume, arrayFromSegmentBinaryLabelmap=segment_array,
        updateSegmentBinaryLabelmapFromArray=update_segment)
    module.modules = types.SimpleNamespace(volumes=types.SimpleNamespace(logic=VolumesLogic))
    monkeypatch.setitem(sys.modules, "slicer", module)
    return module
