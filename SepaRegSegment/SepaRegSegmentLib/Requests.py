"""SepaRegSegment's requests and results (fine-tune request and its checks, training cases, models, the origin of a
contour) and the pure helpers the logic uses on segment names and label tables. No Slicer, Qt or MRML imports."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from separeg.runtime.background import RunState

__all__ = ["AfterRunError", "ContourOrigin", "FinetuneRequest", "ModelInfo", "ModelRefused", "SEGMENT_BY_VALUE",
           "TABLES_BESIDE", "TRAINING_SET_LABELS", "TaskResult", "TrainingCase", "labelNamesByValue", "labelTable",
           "labelTableBeside", "maskFingerprint", "matchSegments", "refuseUselessModel", "safeName",
           "unnamedSegmentsHint"]


TRAINING_SET_LABELS = "labels.json"
# Label tables that travel with a label map file, looked for beside it in this order: a labels.json, or the
# segmentation.json that `separeg contour` writes beside its segmentation.nii.gz.
TABLES_BESIDE = (TRAINING_SET_LABELS, "segmentation.json")
# Slicer's name for the segment of value v when it loads a label map without a table (loadSegmentation).
SEGMENT_BY_VALUE = re.compile(r"Segment_(\d+)")


class AfterRunError(RuntimeError):
    """The background run finished, but what follows it in Slicer (installing its model, a SlicerRT export) did
    not happen; the message says what and what to do."""


class ModelRefused(AfterRunError):
    """A fine-tuned model too weak to install (:func:`separeg.segment.model_quality.useless_model_reason`)."""


def refuseUselessModel(path: Path) -> None:
    """Refuse to install a fine-tuned model whose best validation DSC is under the shared floor (1 %): it found
    (almost) none of its organs and must not replace a working one. The run folder keeps it.

    Raises:
        ModelRefused: with the score, the floor and what to try.
    """
    from separeg.runtime.bundle import read_bundle_info
    from separeg.segment.model_quality import useless_model_reason

    reason = useless_model_reason(read_bundle_info(path).get("validation"))
    if reason:
        raise ModelRefused(f"the model was not installed: {reason}. The run folder keeps it ({path}); in this panel "
                           "raise Epochs, add training cases or choose a pretrained encoder, then fine-tune again")


@dataclass
class ModelInfo:
    name: str
    path: Path
    labels: list[dict]
    backbone: str
    description: str
    channels: list[str] = field(default_factory=lambda: ["CT"])  # input channels, in order (segmentation models)

    @property
    def organNames(self) -> list[str]:
        return [lb.get("tg263") or lb["name"] for lb in self.labels]


@dataclass
class TrainingCase:
    """A loaded volume and its segmentation (scene nodes, passed through to the scene adapter)."""

    name: str
    volumeNode: object
    segmentationNode: object


@dataclass
class FinetuneRequest:
    outDir: Path
    modelName: str
    cases: Sequence[TrainingCase] = ()
    dataFolder: Path | None = None  # instead of cases: a folder the core reads (NIfTI pairs or DICOM + RTSTRUCT)
    organs: Sequence[str] = ()  # organ (TG-263) names to train; segment names are matched to them
    init: Path | None = None  # encoder bundle (file or shipped name) from pretraining, or a model to continue
    unlabelled: Path | None = None  # unlabelled CTs: adds Mean Teacher consistency training on them
    archive: Path | None = None  # unlabelled CTs the training cases are registered to; trains on the propagated labels
    epochs: int = 50
    device: str = "auto"
    extraArgs: Sequence[str] = ()

    def problems(self) -> list[str]:
        found = []
        if not self.cases and self.dataFolder is None:
            found.append("add at least one training case (a volume with its segmentation) or choose a data folder")
        if self.cases and len(self.cases) < 2:
            found.append("fine-tuning needs 2 cases (1 for training, 1 for validation); add another case")
        if self.cases and not self.organs:
            found.append("choose the organs to train")
        if not re.fullmatch(r"[\w .-]+", self.modelName or ""):
            found.append("name the model with letters, digits, spaces, '-', '_' or '.'")
        if self.init is not None and not Path(self.init).is_file():
            from separeg.runtime.errors import InputError
            from separeg.runtime.model_store import resolve_model

            try:
                resolve_model(self.init)
            except InputError:
                found.append(f"initial model {self.init} does not exist")
        if self.unlabelled is not None and not Path(self.unlabelled).is_dir():
            found.append(f"the unlabelled CT folder {self.unlabelled} does not exist")
        if self.archive is not None and not Path(self.archive).is_dir():
            found.append(f"the unlabelled archive folder {self.archive} does not exist; choose a folder of CTs")
        return found


@dataclass
class ContourOrigin:
    """The model that made a segmentation (Auto-contour) and what a planner changed in it since.

    Attributes:
        model: ``{"model": {"path", "name", "sha256"}, "separeg_version"}``, as in the core's ``segmentation.json``.
        changes: the segments edited, renamed, added or removed since Auto-contour ("Parotid_L edited"); empty when
            the segments are still the model's output.
    """

    model: dict
    changes: list[str] = field(default_factory=list)

    @property
    def generation(self) -> str:
        """``separeg export --generation``: automatic (unchanged model output) or semiautomatic (edited by a person)."""
        return "semiautomatic" if self.changes else "automatic"

    @property
    def modelName(self) -> str:
        return str((self.model.get("model") or {}).get("name") or "?")


@dataclass
class TaskResult:
    task: str
    state: RunState
    message: str
    outputs: dict = field(default_factory=dict)


def matchSegments(segmentNames: Sequence[str], organs: Sequence[str]) -> dict[str, str]:
    """Segment name -> organ (TG-263) name, through the core's synonym table ("Parotid L" -> "Parotid_L")."""
    from separeg.rt.organs import to_tg263

    wanted = {organ: organ for organ in organs}
    wanted.update({to_tg263(organ) or organ: organ for organ in organs})
    matched = {}
    for name in segmentNames:
        organ = wanted.get(name) or wanted.get(to_tg263(name) or "")
        if organ is not None and organ not in matched.values():
            matched[name] = organ
    return matched


def labelNamesByValue(table) -> dict[int, str]:
    """Organ name (TG-263 when known) by label value, from a label table file (labels.json, CSV; the core's
    formats) or from a list of labels as in a model (``[{"value", "name", "tg263"}, ...]``)."""
    if isinstance(table, str | os.PathLike):
        from separeg.rt.labels import load_label_table

        table = [label.to_dict() for label in load_label_table(table)]
    return {int(lb["value"]): lb.get("tg263") or lb["name"] for lb in table}


def labelTableBeside(path: str | os.PathLike) -> Path | None:
    """The label table that travels with a label map file: ``labels.json`` in its folder, else the
    ``segmentation.json`` that ``separeg contour`` writes beside its result; ``None`` when there is neither."""
    for name in TABLES_BESIDE:
        candidate = Path(path).parent / name
        if candidate.is_file():
            return candidate
    return None


def unnamedSegmentsHint(names: Sequence[str]) -> str:
    """What to do when segments carry Slicer's ``Segment_<value>`` names ("" when they do not)."""
    unnamed = [n for n in names if SEGMENT_BY_VALUE.fullmatch(n)]
    if not unnamed:
        return ""
    return (f". Segments named {', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''} are the values of a "
            "label map Slicer loaded without a label table, so their organs are unknown: choose the table those "
            "values follow under 'Label values' in the Model section (a labels.json or CSV file, or a model's "
            "table), put a labels.json beside the file before loading it, or rename the segments in Segment Editor "
            "to organ names (TG-263, e.g. Parotid_L)")


def labelTable(organs: Sequence[str]) -> dict:
    """A label table (values 1..N in the given order) in the core's JSON format."""
    from separeg.rt.labels import LabelTable

    return LabelTable.from_names(organs).to_dict()


def maskFingerprint(mask) -> str:
    """SHA-256 of a boolean mask and its shape: equal for the same voxels on the same grid."""
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    digest = hashlib.sha256(repr(tuple(mask.shape)).encode())
    digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest()


def safeName(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "case"
