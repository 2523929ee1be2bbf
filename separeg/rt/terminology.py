"""Coded terminology of the organ registry: display names and SNOMED CT / DICOM codes for DICOM SEG and Slicer.

Each organ and target of :mod:`separeg.rt.labels` (keyed by its TG-263 name) has a display name and, where a code
could be confirmed, a segmented property category, a property type and, for paired organs, a laterality modifier.
Every code below is in pydicom's bundled DICOM code dictionary (``pydicom.sr._concepts_dict``) with this meaning
(``Testing/test_labels.py`` checks them); the organ codes are also those of 3D Slicer's terminology contexts
(``SegmentationCategoryTypeModifier-DICOM-Master.json``, Slicer 5.13 ``583e9b3``) where Slicer has the organ.

Choices and corrections:

- Targets use DICOM's RT categories (CID 9580 "RT Target", DCM 130041) and radiotherapy target types
  (CID 9534: SNOMED GTV/CTV/PTV, DCM 130056 ITV) rather than "Morphologically Altered Structure", which is for
  lesions, not for planning volumes with margins.
- Brainstem is SCT 119238007 "Brain stem" (CID 7153 and Slicer), Lens 78076003, Femoral head 2812003
  (68367000 is "Thigh").
- Cochlea has no code in these dictionaries: it keeps its display name and no coded type; exports fall back to
  :data:`GENERIC_CATEGORY` / :data:`GENERIC_TYPE` and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CodedConcept",
    "Terminology",
    "ANATOMICAL_STRUCTURE",
    "RT_TARGET",
    "GENERIC_CATEGORY",
    "GENERIC_TYPE",
    "LEFT",
    "RIGHT",
    "SLICER_CONTEXT",
    "SLICER_REGION_CONTEXT",
    "terminology",
    "generic_terminology",
    "display_name",
    "registry_terminologies",
]


class CodedConcept(NamedTuple):
    """A code: ``(value, scheme, meaning)``, e.g. ``("45289007", "SCT", "Parotid gland")``."""

    value: str
    scheme: str
    meaning: str

    def slicer(self) -> str:
        """Slicer's ``scheme^value^meaning`` form."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")
RT_TARGET = CodedConcept("130041", "DCM", "RT Target")
GENERIC_CATEGORY = _sct("85756007", "Tissue")
GENERIC_TYPE = _sct("85756007", "Tissue")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")
# Slicer terminology entry: context~category~type~modifier~region context~region~region modifier.
SLICER_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"
_SLICER_EMPTY = "^^"

# TG-263 name -> display name, category, type (None: no confirmed code).
_SINGLE: dict[str, tuple[str, CodedConcept, CodedConcept | None]] = {
    "Brainstem": ("Brainstem", ANATOMICAL_STRUCTURE, _sct("119238007", "Brain stem")),
    "SpinalCord": ("Spinal cord", ANATOMICAL_STRUCTURE, _sct("2748008", "Spinal cord")),
    "Esophagus": ("Esophagus", ANATOMICAL_STRUCTURE, _sct("32849002", "Esophagus")),
    "Larynx": ("Larynx", ANATOMICAL_STRUCTURE, _sct("4596009", "Larynx")),
    "Bone_Mandible": ("Mandible", ANATOMICAL_STRUCTURE, _sct("91609006", "Mandible")),
    "OpticChiasm": ("Optic chiasm", ANATOMICAL_STRUCTURE, _sct("244453006", "Optic chiasm")),
    "Heart": ("Heart", ANATOMICAL_STRUCTURE, _sct("80891009", "Heart")),
    "Liver": ("Liver", ANATOMICAL_STRUCTURE, _sct("10200004", "Liver")),
    "Spleen": ("Spleen", ANATOMICAL_STRUCTURE, _sct("78961009", "Spleen")),
    "Stomach": ("Stomach", ANATOMICAL_STRUCTURE, _sct("69695003", "Stomach")),
    "Bladder": ("Urinary bladder", ANATOMICAL_STRUCTURE, _sct("89837001", "Bladder")),
    "Rectum": ("Rectum", ANATOMICAL_STRUCTURE, _sct("34402009", "Rectum")),
    "GTV": ("Gross tumor volume", RT_TARGET, _sct("228791009", "GTV")),
    "CTV": ("Clinical target volume", RT_TARGET, _sct("228792002", "CTV")),
    "ITV": ("Internal target volume", RT_TARGET, CodedConcept("130056", "DCM", "ITV")),
    "PTV": ("Planning target volume", RT_TARGET, _sct("228793007", "PTV")),
}
# TG-263 stem (names stem_L, stem_R) -> display name (lower case; "Left ..."), category, type.
_PAIRED: dict[str, tuple[str, CodedConcept, CodedConcept | None]] = {
    "Parotid": ("parotid gland", ANATOMICAL_STRUCTURE, _sct("45289007", "Parotid gland")),
    "Glnd_Submand": ("submandibular gland", ANATOMICAL_STRUCTURE, _sct("54019009", "Submandibular gland")),
    "OpticNrv": ("optic nerve", ANATOMICAL_STRUCTURE, _sct("18234004", "Optic nerve")),
    "Eye": ("eye", ANATOMICAL_STRUCTURE, _sct("81745001", "Eye")),
    "Lens": ("lens", ANATOMICAL_STRUCTURE, _sct("78076003", "Lens")),
    "Cochlea": ("cochlea", ANATOMICAL_STRUCTURE, None),
    "Lung": ("lung", ANATOMICAL_STRUCTURE, _sct("39607008", "Lung")),
    "Kidney": ("kidney", ANATOMICAL_STRUCTURE, _sct("64033007", "Kidney")),
    "Femur_Head": ("femoral head", ANATOMICAL_STRUCTURE, _sct("2812003", "Femoral head")),
}
_SIDE_MODIFIERS = {"L": ("Left", LEFT), "R": ("Right", RIGHT)}


@dataclass(frozen=True)
class Terminology:
    """What a segment contains, in codes: DICOM SEG's category/type/modifier and Slicer's terminology entry.

    Attributes:
        name: the display name ("Left parotid gland"); for a generic entry, the label's own name.
        category: segmented property category, e.g. Anatomical Structure.
        type: segmented property type, e.g. Parotid gland.
        modifier: laterality of paired organs (Left/Right), else None.
        coded: False for :func:`generic_terminology` (no code says what the segment is).
    """

    name: str
    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None = None
    coded: bool = True

    def slicer_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` string (7 ``~``-separated parts, codes as ``scheme^value^meaning``)."""
        modifier = self.modifier.slicer() if self.modifier else _SLICER_EMPTY
        return "~".join((SLICER_CONTEXT, self.category.slicer(), self.type.slicer(), modifier,
                         SLICER_REGION_CONTEXT, _SLICER_EMPTY, _SLICER_EMPTY))


def _lookup(tg263: str) -> tuple[str, CodedConcept, CodedConcept | None, CodedConcept | None] | None:
    if tg263 in _SINGLE:
        return (*_SINGLE[tg263], None)
    stem, _, side = tg263.rpartition("_")
    if stem in _PAIRED and side in _SIDE_MODIFIERS:
        name, category, type_code = _PAIRED[stem]
        word, modifier = _SIDE_MODIFIERS[side]
        return f"{word} {name}", category, type_code, modifier
    return None


def display_name(tg263: str) -> str | None:
    """The display name of a registry organ ("Parotid_L" -> "Left parotid gland"); None for other names."""
    entry = _lookup(tg263)
    return entry[0] if entry else None


def terminology(tg263: str) -> Terminology | None:
    """The coded terminology of a registry organ or target by its TG-263 name.

    Returns:
        None when the name is not in the registry or the organ has no confirmed code (Cochlea); use
        :func:`generic_terminology` then.
    """
    entry = _lookup(tg263)
    if entry is None or entry[2] is None:
        return None
    name, category, type_code, modifier = entry
    return Terminology(name, category, type_code, modifier)


def generic_terminology(name: str) -> Terminology:
    """The fallback for a structure without a code: category and type "Tissue", the structure's own name."""
    return Terminology(display_name(name) or name, GENERIC_CATEGORY, GENERIC_TYPE, None, coded=False)


def registry_terminologies() -> dict[str, Terminology | None]:
    """TG-263 name -> :func:`terminology` for every name this table knows (for tests and listings)."""
    names = list(_SINGLE) + [f"{stem}_{side}" for stem in _PAIRED for side in _SIDE_MODIFIERS]
    return {name: terminology(name) for name in names}
