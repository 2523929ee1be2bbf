"""The only place SepaRegSegment touches the MRML scene: volumes and segmentations to files and back.

Everything else in the module works on files. This adapter runs against Slicer's real MRML, module logics and
``slicer.util`` in the test tier (Testing/test_slicer_real_scene.py, PyPI slicer-core) and in the module's self-test
in Slicer; Testing/slicer_fakes.py keeps small fakes for the logic tests that do not need a scene.
API references (Slicer 5.10+): ``slicer/util.py`` (exportNode, arrayFromSegmentBinaryLabelmap,
loadLabelVolume), ``ImportLabelmapToSegmentationNode``, ``vtkSegmentation::AddEmptySegment``,
``vtkSegment::SetTerminology`` (SLICER_NOTES §5).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def removeNode(node, colorNode: bool = False) -> None:
    """Remove a temporary node with its display and storage nodes, which ``RemoveNode`` leaves in the scene, and
    (``colorNode``) the colour table ``ExportSegmentsToLabelmapNode`` made for it, as ``slicer.util`` does."""
    import slicer

    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    storages = [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    colors = [d.GetColorNode() for d in displays if d is not None] if colorNode else []
    for other in [node, *displays, *storages, *colors]:
        if other is not None:
            slicer.mrmlScene.RemoveNode(other)


def terminologyEntry(label: dict) -> str | None:
    """Slicer's ``~``-separated terminology entry for a label of ``segmentation.json`` (core registry codes)."""
    from separeg.rt.terminology import terminology

    codes = terminology(label.get("tg263") or "")
    return codes.slicer_entry() if codes is not None else None


def setTerminology(segment, entry: str | None) -> None:
    """Give a segment its terminology entry (``SetTerminology`` in Slicer 5.10+, the tag before)."""
    if not entry:
        return
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


class SceneIO:
    """Moves data between the scene and files for the background runs."""

    # ------------------------------------------------------------------------------------------------ volumes
    def exportVolume(self, volumeNode, path: Path) -> Path:
        """Write a scalar volume as NIfTI/NRRD (LPS on disk, as every file reader expects)."""
        import slicer

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not slicer.util.exportNode(volumeNode, str(path)):
            raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")
        return path

    def exportSegmentsAsLabelmap(self, segmentationNode, referenceVolumeNode, path: Path,
                                 valueBySegmentId: dict[str, int]) -> Path:
        """Write the given segments as one label map on the reference volume's grid (later segments win overlaps)."""
        import slicer

        shape = slicer.util.arrayFromVolume(referenceVolumeNode).shape
        labels = np.zeros(shape, dtype=np.uint8)
        for segmentId, value in valueBySegmentId.items():
            labels[self.segmentArray(segmentationNode, segmentId, referenceVolumeNode)] = value
        labelNode = slicer.modules.volumes.logic().CreateAndAddLabelVolume(referenceVolumeNode, "SepaRegExport")
        try:
            slicer.util.updateVolumeFromArray(labelNode, labels)
            self.exportVolume(labelNode, path)
        finally:
            removeNode(labelNode)
        return Path(path)

    def segmentArray(self, segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
        """One segment as a boolean mask (K, J, I) on the reference volume's grid.

        As ``slicer.util.arrayFromSegmentBinaryLabelmap``, whose temporary label map leaves its display node in
        the scene (seen against real MRML in Testing/test_slicer_real_scene.py); this one removes it too.
        """
        import slicer
        import vtk

        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SepaRegSegment")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, ids, labelNode,
                                                                                  referenceVolumeNode):
                raise RuntimeError(f"could not export segment {segmentId} of {segmentationNode.GetName()}")
            return slicer.util.arrayFromVolume(labelNode) > 0
        finally:
            removeNode(labelNode, colorNode=True)

    def segments(self, segmentationNode) -> list[tuple[str, str]]:
        """``[(segment id, name)]`` in the segmentation's order."""
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        return [(sid, segmentation.GetSegment(sid).GetName()) for sid in ids]

    def renameSegment(self, segmentationNode, segmentId: str, name: str) -> None:
        segmentationNode.GetSegmentation().GetSegment(segmentId).SetName(name)

    def nodeAttribute(self, node, name: str) -> str | None:
        """A node attribute (``vtkMRMLNode::GetAttribute``; saved with the scene), or ``None``."""
        return node.GetAttribute(name)

    def setNodeAttribute(self, node, name: str, value: str | None) -> None:
        """Set (``None``: remove) a node attribute."""
        if value is None:
            node.RemoveAttribute(name)
        else:
            node.SetAttribute(name, value)

    def loadSegmentationFile(self, path: Path):
        """A segmentation node from a file (``.seg.nrrd``, or a label map: Slicer names its segments
        ``Segment_<value>``)."""
        import slicer

        return slicer.util.loadSegmentation(str(path))

    def sourceFile(self, node) -> Path | None:
        """The file a node was loaded from (its storage node's file name), or ``None`` (made in the scene)."""
        storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
        name = storage.GetFileName() if storage is not None else None
        return Path(name) if name else None

    def segmentArrays(self, segmentationNode, referenceVolumeNode) -> dict[str, np.ndarray]:
        """Segment name -> boolean mask (K, J, I) on the reference volume's grid."""
        return {name: self.segmentArray(segmentationNode, sid, referenceVolumeNode)
                for sid, name in self.segments(segmentationNode)}

    def spacing(self, volumeNode) -> tuple[float, float, float]:
        return tuple(float(s) for s in volumeNode.GetSpacing())

    # ------------------------------------------------------------------------------------------ segmentations
    def loadSegmentation(self, labelmapPath: Path, labelsJsonPath: Path, referenceVolumeNode, name: str):
        """A segmentation node with one named, coloured segment per organ of ``segmentation.json``.

        Segments get the TG-263 name, the colour and, where known, the terminology code; organs the model did not
        find get an empty segment, so the planner sees that they were looked for. Shown in 2D and 3D.
        """
        import slicer

        description = json.loads(Path(labelsJsonPath).read_text(encoding="utf-8"))
        temporary = None
        labelNode = slicer.util.loadLabelVolume(str(labelmapPath), {"show": False})
        try:
            labels = slicer.util.arrayFromVolume(labelNode)
            reference = slicer.util.arrayFromVolume(referenceVolumeNode)
            if labels.shape != reference.shape:
                raise RuntimeError(f"the contour has shape {labels.shape}, the volume {reference.shape}")
            segNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segNode.CreateDefaultDisplayNodes()
            segNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
            segmentation = segNode.GetSegmentation()
            # one temporary label map for every organ: slicer.util.updateSegmentBinaryLabelmapFromArray would leave
            # one display node per organ in the scene (Slicer/Slicer#8463)
            temporary = slicer.modules.volumes.logic().CreateAndAddLabelVolume(referenceVolumeNode, "SepaRegImport")
            for label in description["labels"]:
                segmentName = label.get("tg263") or label["name"]
                color = [c / 255.0 for c in label["color"]]
                segmentId = segmentation.AddEmptySegment(segmentName, segmentName, color)
                mask = (labels == label["value"]).astype(np.uint8)
                if mask.any():
                    self.importMask(mask, temporary, segNode, segmentId)
                setTerminology(segmentation.GetSegment(segmentId), terminologyEntry(label))
        finally:
            removeNode(labelNode)
            if temporary is not None:
                removeNode(temporary)
        segNode.CreateClosedSurfaceRepresentation()
        return segNode

    def importMask(self, mask: np.ndarray, temporaryLabelNode, segmentationNode, segmentId: str) -> None:
        """Set a segment from a 0/1 mask (K, J, I) through a temporary label map on the reference grid (what
        ``slicer.util.updateSegmentBinaryLabelmapFromArray`` does, with a label map the caller removes)."""
        import slicer
        import vtk

        slicer.util.updateVolumeFromArray(temporaryLabelNode, mask)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(temporaryLabelNode,
                                                                                   segmentationNode, ids):
            raise RuntimeError(f"could not import segment {segmentId} into {segmentationNode.GetName()}")

    # ------------------------------------------------------------------------------------------------- DICOM
    def dicomSeriesFiles(self, volumeNode) -> list[Path] | None:
        """The DICOM files the volume was loaded from (through the DICOM database), or ``None``."""
        import slicer

        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        files = [database.fileForInstance(uid) for uid in uids]
        if not all(files):
            return None
        return [Path(f) for f in files]

    def copyDicomSeries(self, volumeNode, folder: Path) -> Path | None:
        """Copy the volume's DICOM series into ``folder`` (the core reads a series from a folder), or ``None``."""
        files = self.dicomSeriesFiles(volumeNode)
        if not files:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(files):
            shutil.copyfile(path, folder / f"{i:05d}.dcm")
        return folder

    def hasSlicerRT(self) -> bool:
        import slicer

        return hasattr(slicer.modules, "dicomrtimportexport")

    def exportRtstructWithSlicerRT(self, segmentationNode, volumeNode, outputFolder: Path) -> None:
        """RTSTRUCT (and the CT) through SlicerRT's DICOM RT exporter (SLICER_NOTES §6); raises on failure."""
        import slicer
        from DicomRtImportExportPlugin import DicomRtImportExportPluginClass

        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        if not studyItem or studyItem == shNode.GetSceneItemID():
            patientItem = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "SepaReg patient")
            studyItem = shNode.CreateStudyItem(patientItem, "SepaReg study")
            shNode.SetItemParent(shNode.GetItemByDataNode(volumeNode), studyItem)
        shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), studyItem)
        exporter = DicomRtImportExportPluginClass()
        exportables = (exporter.examineForExport(shNode.GetItemByDataNode(volumeNode))
                       + exporter.examineForExport(shNode.GetItemByDataNode(segmentationNode)))
        for exportable in exportables:
            exportable.directory = str(outputFolder)
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(f"SlicerRT export failed: {error}")
