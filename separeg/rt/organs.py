"""The organ name registry: TG-263 names, their synonyms (every script, left/right forms, numbered targets) and
default colours; :func:`normalise_name` and :func:`to_tg263` map a clinic's ROI name onto it."""

from __future__ import annotations

import colorsys
import re
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["RGB", "ORGAN_COLORS", "SYNONYMS", "to_tg263", "default_color", "normalise_name"]

RGB = tuple[int, int, int]

# Colours: 3D Slicer's GenericAnatomyColors where it has the organ (Slicer uses the same colour for both sides of a
# paired organ; here the right side is that colour 25 % darker, so the two sides can be told apart), otherwise
# common treatment-planning conventions (targets: GTV red, CTV orange, ITV magenta, PTV blue), and a distinct colour
# where Slicer's colours of two organs seen in the same scan are nearly equal. Other names are matched ignoring
# case, spaces, "_" and "-" (see ``to_tg263``).
# TG-263 name, RGB, other names.
_SINGLE: tuple[tuple[str, RGB, tuple[str, ...]], ...] = (
    ("Brainstem", (145, 92, 109), ("brain stem",)),  # Slicer: midbrain
    ("SpinalCord", (244, 214, 49), ("spinal cord", "cord", "spinal_cord")),
    ("Esophagus", (211, 171, 143), ("oesophagus",)),
    ("Larynx", (150, 208, 243), ()),
    ("Bone_Mandible", (222, 198, 101), ("mandible", "mandible bone")),
    ("OpticChiasm", (99, 106, 24), ("chiasm", "optic chiasm", "chiasma")),
    ("Heart", (200, 60, 80), ()),  # Slicer's (206, 110, 84) is nearly the liver's
    ("Liver", (221, 130, 101), ()),
    ("Spleen", (157, 108, 162), ()),
    ("Stomach", (250, 170, 190), ()),  # Slicer's (216, 132, 105) is nearly the liver's
    ("Bladder", (222, 154, 132), ("urinary bladder",)),
    ("Rectum", (139, 69, 19), ()),
    ("GTV", (255, 0, 0), ()),
    ("CTV", (255, 140, 0), ()),
    ("ITV", (255, 0, 255), ()),
    ("PTV", (0, 128, 255), ()),
)
# TG-263 stem (the names are stem + "_L" and stem + "_R"), RGB of the left side, other names of the organ. Each
# other name is also recognised with a side word before or after it: L, Lt, Left / R, Rt, Right.
_PAIRED: tuple[tuple[str, RGB, tuple[str, ...]], ...] = (
    ("Parotid", (70, 163, 117), ("parotid gland",)),  # Slicer: salivary glands
    ("Glnd_Submand", (46, 194, 194), ("submandibular", "submandibular gland", "submand", "smg")),
    ("OpticNrv", (156, 171, 108), ("optic nerve", "opticnerve", "optic nrv")),  # Slicer: optic tract
    ("Eye", (194, 142, 0), ("eyeball", "globe")),
    ("Lens", (0, 206, 209), ()),
    ("Cochlea", (229, 147, 118), ()),  # Slicer: inner ear
    ("Lung", (100, 170, 230), ()),  # Slicer's (197, 165, 145) is nearly the esophagus's
    ("Kidney", (185, 102, 83), ()),
    ("Femur_Head", (255, 238, 170), ("femoral head", "femur head", "head of femur")),  # Slicer: lower limb bones
)
_SIDES = {"L": ("l", "lt", "left"), "R": ("r", "rt", "right")}
_RIGHT_SHADE = 0.75
# A bracketed part without Latin letters or digits: a translation or note in another script, "(腮腺)".
_TRANSLATION = re.compile(r"[(\[（【][^()\[\]（）【】A-Za-z0-9]*[)\]）】]")
# Numbered or dose-suffixed targets (GTV-1, PTV_5040, CTV2), normalised.
_NUMBERED_TARGET = re.compile(r"^(gtv|ctv|itv|ptv)\d+$")


def normalise_name(name: str) -> str:
    """A structure name as compared: NFKC, case-folded, letters, marks and digits of every script kept, spaces and
    punctuation dropped: "Parotid L" -> "parotidl", "Спинной мозг" -> "спинноймозг", "脊髓" -> "脊髓".

    "" only for a name of punctuation, symbols or spaces alone; such a name matches nothing.
    """
    folded = unicodedata.normalize("NFKC", str(name)).casefold()
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LMN")


_normalise = normalise_name


def _build_registry() -> tuple[dict[str, RGB], dict[str, str]]:
    colors: dict[str, RGB] = {}
    synonyms: dict[str, str] = {}

    def add(key: str, tg263: str) -> None:
        key = _normalise(key)
        # An invariant of the table above: one spelling never means two organs.
        assert synonyms.setdefault(key, tg263) == tg263, f"{key!r} means both {synonyms[key]} and {tg263}"

    for tg263, color, others in _SINGLE:
        colors[tg263] = color
        for name in (tg263, *others):
            add(name, tg263)
    for stem, color, others in _PAIRED:
        for side, words in _SIDES.items():
            tg263 = f"{stem}_{side}"
            colors[tg263] = color if side == "L" else tuple(round(c * _RIGHT_SHADE) for c in color)
            add(tg263, tg263)
            for name in (stem, *others):
                for word in words:
                    add(f"{name} {word}", tg263)
                    add(f"{word} {name}", tg263)
    return colors, synonyms


_COLORS, _SYNONYMS = _build_registry()
#: TG-263 name -> default RGB colour (0-255) of every organ and target in the registry.
ORGAN_COLORS: Mapping[str, RGB] = MappingProxyType(_COLORS)
#: Normalised name (lower case, no spaces, "_", "-" or other punctuation) -> TG-263 name.
SYNONYMS: Mapping[str, str] = MappingProxyType(_SYNONYMS)


def to_tg263(name: str, *, merge_numbered_targets: bool = False) -> str | None:
    """The TG-263 name of an organ or target name as written in a TPS, a data set or an RTSTRUCT.

    Matching ignores case, spaces, underscores, hyphens and other punctuation (:func:`normalise_name`; letters of
    every script count): "Parotid L", "L_Parotid", "parotid_lt", "LeftParotid" all give "Parotid_L", and so does
    "Parotid L (腮腺)" (a bracketed part without Latin letters or digits is a translation); "Mandible" gives
    "Bone_Mandible"; "Spinal-Cord" and "Cord" give "SpinalCord"; "Parotid L (PRV)" and "Спинной мозг" give None.

    Numbered targets ("GTV-1", "PTV_5040") are distinct structures of one patient (two GTVs, two dose levels), so
    by default they have no registry name and this returns None; the label keeps its own name. With
    ``merge_numbered_targets`` they map to their type ("GTV-1" -> "GTV"), for data sets where every case has
    one target of each type under varying numbers.

    Args:
        name: the structure name.
        merge_numbered_targets: map "GTV-1", "CTV2", "PTV_5040" ... to "GTV", "CTV", "PTV".

    Returns:
        The TG-263 name, or None when the name is not in the registry.
    """
    key = _normalise(name)
    if key not in _SYNONYMS:  # "Parotid L (腮腺)": a bracketed translation does not hide the registry name
        key = _normalise(_TRANSLATION.sub(" ", str(name))) or key
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    if merge_numbered_targets and (match := _NUMBERED_TARGET.match(key)):
        return match.group(1).upper()
    return None


def default_color(tg263: str, value: int) -> RGB:
    """The registry colour of ``tg263``; for a name not in the registry, a colour that depends only on ``value``.

    Unknown organs get hues spaced by the golden angle (value 1, 2, 3 ... look clearly different) at fixed
    saturation and brightness, so the same table always gets the same colours.
    """
    if tg263 in _COLORS:
        return _COLORS[tg263]
    hue = (value * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)
