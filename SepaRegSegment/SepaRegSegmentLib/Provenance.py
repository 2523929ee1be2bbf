"""SepaRegSegment's provenance of contours and of segment names, mixed into
:class:`SepaRegSegmentLib.Logic.SegmentLogic`, whose ``scene`` (a :class:`SceneIO`) and ``logMessage`` signal they use.

- Contours: Auto-contour records on its segmentation the model that made it and each segment as it was made, so that
  Export can tell automatic contours from edited ones.
- Names: a label map loaded without names has ``Segment_<value>`` segments; they are named from the label table that
  travels with the data (beside its file) or one the planner chose, never from a guess (issue 30).

No Slicer, Qt or MRML imports."""

from __future__ import annotations

import json
import os
from pathlib import Path

from SepaRegSegmentLib.Requests import (
    SEGMENT_BY_VALUE,
    ContourOrigin,
    labelNamesByValue,
    labelTableBeside,
    maskFingerprint,
)

__all__ = ["CONTOUR_MODEL_ATTRIBUTE", "CONTOUR_SEGMENTS_ATTRIBUTE", "ContourProvenance", "SegmentNaming"]

# Node attributes Auto-contour leaves on its segmentation (saved with the scene): the model that made it
# ({"model": {"path", "name", "sha256"}, "separeg_version"}, as in the core's segmentation.json) and each segment's
# name and content fingerprint then ([{"id", "name", "sha256"}]), so Export can tell automatic contours from edited
# ones.
CONTOUR_MODEL_ATTRIBUTE = "SepaReg.ContourModel"
CONTOUR_SEGMENTS_ATTRIBUTE = "SepaReg.ContourSegments"


class ContourProvenance:
    """The provenance methods of :class:`~SepaRegSegmentLib.Logic.SegmentLogic` (needs ``scene`` and ``logMessage``)."""

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


class SegmentNaming:
    """The segment-naming methods of :class:`~SepaRegSegmentLib.Logic.SegmentLogic` (needs ``scene`` and
    ``logMessage``)."""

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

    def labelTableOf(self, segmentationNode) -> Path | None:
        """The label table that travels with a segmentation loaded from a label map file: ``labels.json`` or the
        core's ``segmentation.json`` beside the file (:func:`labelTableBeside`); ``None`` for any other."""
        source = self.scene.sourceFile(segmentationNode)
        return labelTableBeside(source) if source is not None else None

    def nameSegments(self, segmentationNode, table=None) -> dict[str, str]:
        """Name ``Segment_<v>`` segments from the table that travels with the data, else from ``table`` (one the
        planner chose). Never from a guess: segments no table names keep their names, and whatever needs organ
        names refuses them with :func:`unnamedSegmentsHint`. Returns ``{old name: new name}``."""
        renamed = {}
        for candidate in (self.labelTableOf(segmentationNode), table):
            if candidate is not None:
                renamed.update(self.nameSegmentsByValue(segmentationNode, candidate))
        return renamed

    def unnamedSegments(self, segmentationNode) -> list[str]:
        """The segments that still carry Slicer's ``Segment_<value>`` names."""
        return [name for _, name in self.scene.segments(segmentationNode) if SEGMENT_BY_VALUE.fullmatch(name)]

    def loadSegmentation(self, path: str | os.PathLike, table=None):
        """Load a segmentation or label map file; ``Segment_<v>`` segments are named from ``table`` or, when none is
        given, from ``labels.json`` beside the file."""
        node = self.scene.loadSegmentationFile(path)
        table = table if table is not None else labelTableBeside(path)
        if table is not None:
            self.nameSegmentsByValue(node, table)
        return node
