"""SepaReg Segment's parameter node: the scene's choices (which CT, which segmentations), saved with the scene.

Slicer's ``parameterNodeWrapper`` (S:Base/Python/slicer/parameterNodeWrapper, Slicer 5.4+) binds each field to the
widget whose ``SlicerParameterName`` property names it in ``Resources/UI/SepaRegSegment.ui``
(``Testing/test_slicer_layout.py`` checks the names and node classes agree). Folders and the model stay per-user
settings: they belong to the computer, not to the scene.
"""

from __future__ import annotations

from typing import Optional

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper


@parameterNodeWrapper
class SegmentParameters:
    # Auto-contour, correct and learn
    inputVolume: Optional[vtkMRMLScalarVolumeNode]  # noqa: UP045 - evaluated at runtime by the wrapper
    correctedSegmentation: Optional[vtkMRMLSegmentationNode]  # noqa: UP045
    # fine-tune: the case being added
    trainingVolume: Optional[vtkMRMLScalarVolumeNode]  # noqa: UP045
    trainingSegmentation: Optional[vtkMRMLSegmentationNode]  # noqa: UP045
    # evaluate
    predictionSegmentation: Optional[vtkMRMLSegmentationNode]  # noqa: UP045
    referenceSegmentation: Optional[vtkMRMLSegmentationNode]  # noqa: UP045
    evaluationVolume: Optional[vtkMRMLScalarVolumeNode]  # noqa: UP045
    # export
    exportSegmentation: Optional[vtkMRMLSegmentationNode]  # noqa: UP045
    exportVolume: Optional[vtkMRMLScalarVolumeNode]  # noqa: UP045
