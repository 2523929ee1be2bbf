"""Out-of-distribution check of a contour: are the organs found of the sizes the model was trained on? (issue 30)

``hn-oar-7`` on a thoracic CT (LUNG1) found a 12-voxel "Brainstem" in the lower thorax, a 0.8 cc parotid and a 4 cc
mandible on the top slices, and said nothing. Image statistics (field of view, HU range) do not tell a chest from a
neck; the contour itself does: on the body site a model was trained on, most of its organs are found with about their
training volumes.

Rule: a found organ is out of range when its volume is below a third of the smallest, or above three times the
largest, training volume; when at least half of the organs found (3 or more, each with training volumes) are out of
range, contour warns. Organs not found do not count: an organ may lie outside the scan or be resected, and
``hn-oar-7`` misses 3 of 7 on OpenKBP's pt_203 (which then does not warn; LUNG1 has 3 of 6 found out of range).
Checked on 15 OpenKBP head-and-neck CTs: none warns (at most 1 found organ out of range). A weak model warns on
its own body site too (the demo's two-case fine-tune finds a 0.9 cc brainstem and a 3.7 cc cord on pt_203), hence
the message names both causes.

Training volumes: ``data.organ_volume_cc`` of the bundle
(``{value: [min, median, max]}`` over the training cases annotating the organ, written by ``separeg finetune``); for
a bundle without it (the shipped ``hn-oar-7``, trained on OpenKBP), :data:`OPENKBP_VOLUMES_CC` by TG-263 name.
Organs with neither are not checked.

Second rule, which needs no organ: the CT's **body cross-section** (median over its slices of the area above -500 HU,
slices under 40 cm² left out) against the training scans' (5th-95th percentile of their medians): outside half the
5th to 1.75 x the 95th percentile, contour warns. A found "organ" can fall either way by chance (the v3 ensemble finds
no brainstem on LUNG1, so only 2 of 5 organs found are off), the body's size cannot: OpenKBP's 50 scans have
156-303 cm² (one, pt_38, 988), LUNG1's chest 619, TotalSegmentator's abdomen 720. Training areas:
``data.body_area_cm2`` of the bundle (``[p5, median, p95]``, written by ``separeg finetune``), else
:data:`OPENKBP_BODY_AREA_CM2` for a model of OpenKBP's organs. One warning at most: the organ rule's, else this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["OPENKBP_VOLUMES_CC", "OPENKBP_BODY_AREA_CM2", "RANGE_FACTOR", "organ_volume_statistics", "expected_volumes",
           "body_site_warning", "body_area_cm2", "body_area_statistics", "expected_body_area", "body_area_warning"]

# (min, max) cc over the 50 OpenKBP patients in the shared test data (OpenKBP's training split, 128^3 grids), each
# over the patients that contour the organ: the data the shipped hn-oar-7 was trained on.
OPENKBP_VOLUMES_CC: dict[str, tuple[float, float]] = {
    "Brainstem": (5.5, 45.3), "SpinalCord": (8.8, 45.6), "Parotid_R": (5.2, 50.3), "Parotid_L": (9.8, 56.0),
    "Esophagus": (5.7, 19.1), "Larynx": (2.0, 54.0), "Bone_Mandible": (30.1, 84.6)}
RANGE_FACTOR = 3.0  # a third of the smallest to three times the largest: truncated scans and few training cases pass
# 5th and 95th percentile of the median body cross-section (cm²) of the same 50 OpenKBP scans.
OPENKBP_BODY_AREA_CM2 = (170.4, 289.0)
AREA_FACTORS = (0.5, 1.75)  # below half the 5th or above 1.75 x the 95th percentile warns
BODY_HU, MIN_SLICE_CM2 = -500.0, 40.0  # OpenKBP's contour-only slices (< 40 cm²) say nothing of the body
MIN_CHECKED = 3  # fewer organs found with training volumes: no verdict


def organ_volume_statistics(cases: Iterable, values: Iterable[int]) -> dict[str, list[float]]:
    """``{str(value): [min, median, max] cc}`` over the cases annotating each organ (``LoadedCase``: ``image``,
    ``labels`` on its grid, ``annotated``); organs no case annotates are left out."""
    volumes: dict[int, list[float]] = {v: [] for v in values}
    for case in cases:
        voxel_cc = float(np.prod(case.image.GetSpacing())) / 1000.0
        counts = np.bincount(np.asarray(case.labels).ravel(), minlength=max(volumes, default=0) + 1)
        for value in volumes:
            if value in case.annotated and value < len(counts) and counts[value]:
                volumes[value].append(float(counts[value]) * voxel_cc)
    return {str(v): [round(min(cc), 2), round(float(np.median(cc)), 2), round(max(cc), 2)]
            for v, cc in volumes.items() if cc}


def expected_volumes(metadata: Mapping, table) -> tuple[dict[int, tuple[float, float]], str]:
    """``({value: (min, max) cc}, source)``: the bundle's training volumes (source ""), else OpenKBP's by TG-263
    name."""
    recorded = (metadata.get("data") or {}).get("organ_volume_cc")
    if recorded is not None:
        return ({lb.value: (float(recorded[str(lb.value)][0]), float(recorded[str(lb.value)][-1]))
                 for lb in table if str(lb.value) in recorded}, "")
    return ({lb.value: OPENKBP_VOLUMES_CC[lb.tg263] for lb in table if lb.tg263 in OPENKBP_VOLUMES_CC},
            "OpenKBP head and neck")


def body_site_warning(found_cc: Mapping[int, float], expected: Mapping[int, tuple[float, float]], table,
                      source: str = "") -> str | None:
    """The warning when at least half of the organs found are out of their training range (module rule), or None.

    Args:
        found_cc: ``{value: volume cc}`` of the organs output (0: not found).
        expected: ``{value: (min, max) cc}`` (:func:`expected_volumes`); organs without an entry are not checked.
        source: where ``expected`` comes from when not the bundle's own training data (:func:`expected_volumes`).
    """
    checked = [v for v in found_cc if v in expected and found_cc[v] > 0]
    if len(checked) < MIN_CHECKED:
        return None

    def name(value: int) -> str:
        label = table.by_value(value)
        return label.tg263 or label.name

    off = [v for v in checked if not expected[v][0] / RANGE_FACTOR <= found_cc[v] <= expected[v][1] * RANGE_FACTOR]
    if 2 * len(off) < len(checked):
        return None
    found = ", ".join(f"{name(v)} {found_cc[v]:.2f} cc" for v in off)
    ranges = ", ".join(f"{name(v)} {expected[v][0]:.3g}-{expected[v][1]:.3g} cc" for v in off)
    return (f"body site: {len(off)} of {len(checked)} organs found are far from their training volumes: {found} "
            f"(training data: {source + ', ' if source else ''}{ranges}); is this CT of the body region the model "
            "was trained on? If it is, the model does not fit this scan: its contours are unreliable here")


def body_area_cm2(array: np.ndarray, spacing: tuple[float, ...]) -> float | None:
    """Median over the ``(Z, Y, X)`` CT's slices of the area above -500 HU (cm²), slices under 40 cm² left out;
    None when no slice is left."""
    pixel_cm2 = float(spacing[0]) * float(spacing[1]) / 100.0
    areas = np.array([np.count_nonzero(z > BODY_HU) for z in array], float) * pixel_cm2
    areas = areas[areas >= MIN_SLICE_CM2]
    return float(np.median(areas)) if len(areas) else None


def body_area_statistics(cases: Iterable) -> list[float] | None:
    """``[p5, median, p95]`` of the training cases' :func:`body_area_cm2` (``LoadedCase``: ``image``)."""
    import SimpleITK as sitk

    areas = [a for a in (body_area_cm2(sitk.GetArrayViewFromImage(c.image), c.image.GetSpacing()) for c in cases)
             if a is not None]
    return [round(float(np.percentile(areas, q)), 1) for q in (5, 50, 95)] if areas else None


def expected_body_area(metadata: Mapping, table) -> tuple[tuple[float, float] | None, str]:
    """``((p5, p95) cm², source)``: the bundle's training scans (source ""), else OpenKBP's for a model of its
    organs, else ``(None, "")`` (not checked)."""
    recorded = (metadata.get("data") or {}).get("body_area_cm2")
    if recorded:
        return (float(recorded[0]), float(recorded[-1])), ""
    if any(lb.tg263 in OPENKBP_VOLUMES_CC for lb in table):
        return OPENKBP_BODY_AREA_CM2, "OpenKBP head and neck"
    return None, ""


def body_area_warning(area: float | None, expected: tuple[float, float] | None, source: str = "") -> str | None:
    """The warning when the CT's body cross-section is far from the training scans' (module docstring), or None."""
    if area is None or expected is None:
        return None
    low, high = expected[0] * AREA_FACTORS[0], expected[1] * AREA_FACTORS[1]
    if low <= area <= high:
        return None
    return (f"body site: the body's median cross-section on this CT is {area:.0f} cm² (training data: "
            f"{source + ', ' if source else ''}{expected[0]:.0f}-{expected[1]:.0f} cm² for 90 % of the scans); is "
            "this CT of the body region the model was trained on? Its contours are unreliable on another region")
