"""SepaRegSegment's contour provenance: Auto-contour records on its segmentation the model that made it and each
segment as it was made, so that Export can tell automatic contours from edited ones. Mixed into
:class:`SepaRegSegmentLib.Logic.SegmentLogic`, whose ``scene`` (a :class:`SceneIO`) and ``logMessage`` signal it
uses. No Slicer, Qt or MRML imports."""

from __future__ import annotations

import json

from SepaRegSegmentLib.Requests import ContourOrigin, maskFingerprint

__all__ = ["CONTOUR_MODEL_ATTRIBUTE", "CONTOUR_SEGMENTS_ATTRIBUTE", "ContourProvenance"]

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
