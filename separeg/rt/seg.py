"""DICOM SEG export and import of label maps on a CT series (highdicom).

:func:`write_seg` writes one BINARY Segmentation with a segment per organ present in the label map, each with
its coded category/type/laterality from :mod:`separeg.rt.terminology`, named like the RTSTRUCT's ROIs (TG-263 name,
else the label's own name; the own name also as SegmentDescription), the organ's colour (as CIELab), the segment
algorithm (AUTOMATIC, family Artificial Intelligence, name, version and model bundle hash; MANUAL and no algorithm
when no model made the contours, :func:`~separeg.io.dicom_ct.generation_type`) and frames only for the slices that
hold the organ. Patient and study attributes are copied from the CT by highdicom; series and
instance UIDs are new. :func:`read_seg` reads one back onto the CT it references.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg import __version__
from separeg.io.dicom_ct import copy_patient_study, ensure_character_set, generation_type
from separeg.rt.labels import Label, LabelTable
from separeg.rt.organs import to_tg263
from separeg.rt.terminology import CodedConcept, Terminology, generic_terminology, terminology
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import InputError

if TYPE_CHECKING:
    from separeg.io.dicom_ct import Algorithm, CtSeries

__all__ = ["SegImport", "write_seg", "read_seg", "segment_terminology", "SEG_SERIES_NUMBER"]

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 301
MANUFACTURER = "SepaReg"


def segment_terminology(label: Label) -> Terminology:
    """The codes of a label's segment: the registry's for its TG-263 name, else "Tissue" with the label's name.

    A numbered target ("GTV-1", "PTV_5040") keeps its own name and is coded as its type (GTV, PTV).
    """
    tg263 = label.tg263 or to_tg263(label.name, merge_numbered_targets=True) or ""
    return (terminology(tg263) if tg263 else None) or generic_terminology(label.name)


def _check_labelmap(labelmap: np.ndarray, table: LabelTable, ct: CtSeries) -> list[Label]:
    """The labels present in ``labelmap``; refuses a shape other than the CT's or values not in ``table``."""
    expected = ct.shape
    if labelmap.shape != expected:
        raise InputError(f"the label map is {'x'.join(map(str, labelmap.shape))} (z, y, x) voxels, the CT series "
                         f"{ct.series_instance_uid} {'x'.join(map(str, expected))}; give a label map on the CT's grid")
    return table.present_in(labelmap)


def _coded(concept: CodedConcept):
    import highdicom as hd

    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def write_seg(path: str | Path, labelmap: np.ndarray, table: LabelTable, ct: CtSeries, *,
              algorithm: Algorithm | None, series_description: str = "SepaReg auto-contours",
              generation: str | None = None) -> Path:
    """Write ``labelmap`` as a DICOM SEG referencing the CT series ``ct``.

    Args:
        path: the ``.dcm`` file to write (atomically).
        labelmap: (z, y, x) integer label map whose axis 0 follows ``ct.files``.
        table: the organs of the label map; values not in the map are left out (no empty segments).
        ct: the referenced CT series (:func:`separeg.io.dicom_ct.read_ct_series`).
        algorithm: name, version and bundle hash recorded in each segment; None: no model made the contours.
        series_description: the SEG series' description.
        generation: Segment Algorithm Type (default AUTOMATIC with a model, MANUAL without).

    Returns:
        ``path``.

    Raises:
        InputError: the label map is not on the CT's grid, has values the table lacks, or is empty; a generation
            type that needs a model without one.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    labelmap = np.asarray(labelmap)
    labels = _check_labelmap(labelmap, table, ct)
    if not labels:
        raise InputError("the label map is empty (no organ voxels): there is nothing to write as DICOM SEG")
    kind = generation_type(algorithm, generation)
    identification = None
    if algorithm is not None and kind != "MANUAL":
        parameters = {"bundle_sha256": algorithm.bundle_hash} if algorithm.bundle_hash else None
        identification = hd.AlgorithmIdentificationSequence(name=algorithm.name, version=algorithm.version,
                                                            family=codes.cid7162.ArtificialIntelligence,
                                                            source=MANUFACTURER, parameters=parameters)
    descriptions = []
    for number, label in enumerate(labels, start=1):
        term = segment_terminology(label)
        if not term.coded:
            log.warning("no code for %r: its SEG segment is coded as generic tissue and named by its label", label.name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.tg263 or label.name,
            segmented_property_category=_coded(term.category),
            segmented_property_type=_coded(term.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues[kind],
            algorithm_identification=identification, display_color=hd.color.CIELabColor.from_rgb(*label.color))
        if term.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(term.modifier)]
        if label.tg263 and label.tg263 != label.name:
            description.SegmentDescription = label.name  # the name in the source data ("RightParotid")
        descriptions.append(description)
    # Segment numbers 1..N in place of label values; only slices with an organ become frames (fast on large CTs).
    lut = np.zeros(max(int(labelmap.max()), max(table.values)) + 1, np.uint8)
    for number, label in enumerate(labels, start=1):
        lut[label.value] = number
    slices = np.flatnonzero(labelmap.reshape(labelmap.shape[0], -1).any(axis=1))
    datasets = [pydicom.dcmread(ct.files[k]) for k in slices]  # the slices with an organ (ct.datasets(): all)
    with warnings.catch_warnings():
        # highdicom warns about single-component patient names of the source CT ("Anonymous", "LUNG1-001").
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=lut[labelmap[slices]],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="separeg",
            software_versions=__version__, device_serial_number="none", content_label="SEPAREG",
            content_description=("Automatic contours: review before clinical use" if kind == "AUTOMATIC" else
                                 f"{kind.capitalize()} contours"), omit_empty_frames=True)
    seg.SeriesDescription = series_description
    copy_patient_study(ct.header(), seg)  # also what highdicom leaves out (de-identification, study description)
    ensure_character_set(seg)  # organ names may need more than the CT's character set
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


@dataclass
class SegImport:
    """The segments of a DICOM SEG on its CT's grid.

    Attributes:
        names: SegmentLabel of each segment, in segment-number order (TG-263 names in SEGs of :func:`write_seg`).
        masks: (segments, z, y, x) bool, axis 1 following the CT's files.
        descriptions: each segment's SegmentDescription ("" when absent): the label's own name in our SEGs.
        types: each segment's property type code ``(value, scheme, meaning)``.
        colors: each segment's recommended RGB colour, None where the SEG has none.
    """

    names: list[str]
    masks: np.ndarray
    descriptions: list[str] = field(default_factory=list)
    types: list[CodedConcept] = field(default_factory=list)
    colors: list[tuple[int, int, int] | None] = field(default_factory=list)

    def to_labelmap(self, table: LabelTable) -> tuple[np.ndarray, list[str]]:
        """A (z, y, x) uint8 label map with ``table``'s values, matching segments by label or description (names,
        TG-263 names and their synonyms, see :meth:`LabelTable.by_name`).

        Returns:
            ``(labelmap, names of segments no label matched)``; where segments overlap, the later one wins.
        """
        labelmap = np.zeros(self.masks.shape[1:], np.uint8)
        unmatched = []
        for i, name in enumerate(self.names):
            description = self.descriptions[i] if i < len(self.descriptions) else ""
            label = table.by_name(name) or (table.by_name(description) if description else None)
            if label is None:
                unmatched.append(name)
            else:
                labelmap[self.masks[i]] = label.value
        return labelmap, unmatched


def _referenced_instances(seg) -> tuple[set[str], set[str]]:
    series, instances = set(), set()
    for item in seg.get("ReferencedSeriesSequence", []):
        series.add(str(item.SeriesInstanceUID))
        instances |= {str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedInstanceSequence", [])}
    return series, instances


def read_seg(path: str | Path, ct: CtSeries) -> SegImport:
    """Read a DICOM SEG that references ``ct``'s series into per-segment masks on the CT's grid.

    Raises:
        InputError: not a readable DICOM SEG, or it references another series or frame of reference.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many types for files that are not a valid SEG
        raise InputError(f"{path} is not a readable DICOM SEG ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from exc
    series, instances = _referenced_instances(seg)
    for_uid = str(seg.get("FrameOfReferenceUID", ""))
    if ct.series_instance_uid not in series or (for_uid and for_uid != ct.frame_of_reference_uid):
        raise InputError(f"{path} segments series {', '.join(sorted(series)) or '(none listed)'} (frame of reference "
                         f"{for_uid or '?'}), not the CT series {ct.series_instance_uid} (frame of reference "
                         f"{ct.frame_of_reference_uid}); give the CT series the SEG was made on")
    missing = instances - set(ct.sop_instance_uids)
    if missing:
        raise InputError(f"{path} references {len(missing)} image(s) that are not in the CT series "
                         f"{ct.series_instance_uid} (e.g. {sorted(missing)[0]}); is the series complete?")
    numbers = list(seg.segment_numbers)
    masks = np.zeros((len(numbers), *ct.shape), bool)
    rows = [k for k, uid in enumerate(ct.sop_instance_uids) if uid in instances]
    if rows and numbers:
        pixels = seg.get_pixels_by_source_instance([ct.sop_instance_uids[k] for k in rows], segment_numbers=numbers,
                                                   assert_missing_frames_are_empty=True)
        masks[:, rows] = np.moveaxis(pixels > 0, -1, 0)
    names, descriptions, types, colors = [], [], [], []
    for number in numbers:
        item = seg.get_segment_description(number)
        names.append(str(item.segment_label))
        descriptions.append(str(item.get("SegmentDescription", "")))
        code = item.segmented_property_type
        types.append(CodedConcept(str(code.value), str(code.scheme_designator), str(code.meaning)))
        color = item.get("RecommendedDisplayCIELabValue")
        colors.append(tuple(int(c) for c in hd.color.CIELabColor.from_dicom_value(color).to_rgb()) if color else None)
    return SegImport(names, masks, descriptions, types, colors)
