"""Segmentation metrics in physical units: DSC, Hausdorff distances (HD95, HD100) and mean surface distance in mm,
volumes in ml; per-organ results under an explicit empty-mask policy.

Conventions
-----------
* Arrays are ``(Z, Y, X)``, as :func:`SimpleITK.GetArrayFromImage` returns them.
* ``spacing`` is ``(sx, sy, sz)`` in mm, **SimpleITK order** (``image.GetSpacing()``); it is reversed internally
  to match the array axes. Passing it in array order silently swaps the x and z voxel sizes, so keep it as
  SimpleITK gives it.
* Surface voxels: the mask minus its binary erosion with the 3D 6-connected (face) structuring element,
  with everything outside the array counted as background. A voxel is on the surface when at least one of its
  six face neighbours is outside the mask. This is MONAI's ``get_mask_edges`` (scipy's default structure).
* Surface distances: for each surface voxel of one mask, the Euclidean distance in mm between voxel centres to
  the nearest surface voxel of the other mask (``scipy.ndimage.distance_transform_edt`` with ``sampling`` set
  to the voxel size).
* HD95 (default ``pooling="max"``): the 95th percentile (linear interpolation) of each directed distance set,
  then the larger of the two. This is MONAI's ``compute_hausdorff_distance(..., percentile=95)`` and gives the
  same number. ``pooling="union"`` takes the 95th percentile of both sets pooled together instead (the MedPy
  convention); it is never larger than the ``"max"`` value. HD100 (the Hausdorff distance) is the same for both.
* Mean surface distance: the mean of both directed sets pooled together (MONAI's
  ``compute_average_surface_distance(..., symmetric=True)``).

Empty-mask policy
-----------------
The pure functions refuse what they cannot define: :func:`dice` of two empty masks is NaN (0/0), and the
surface-distance functions raise ``ValueError`` when either mask is empty. :func:`organ_metrics` decides, per
organ, before anything is averaged:

* organ absent in the reference: status ``"not_in_reference"``; no DSC, HD95 or volume difference; the organ is
  excluded from that case's averages and counted (a prediction of it, if any, shows in ``volume_pred_ml``);
* organ present in the reference but absent in the prediction: status ``"missed"``; DSC 0, HD95 and mean
  surface distance missing (``None``), volume difference -100 %;
* both present: status ``"ok"``; every metric defined.

A reported metric is never NaN: a missing value is ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "EMPTY_MASK_POLICY",
    "HD95_CONVENTION",
    "STATUS_OK",
    "STATUS_MISSED",
    "STATUS_NOT_IN_REFERENCE",
    "OrganResult",
    "dice",
    "surface_voxels",
    "surface_distances",
    "hausdorff",
    "hd95",
    "hd100",
    "mean_surface_distance",
    "volume_ml",
    "volume_difference_percent",
    "organ_metrics",
]

STATUS_OK = "ok"
STATUS_MISSED = "missed"
STATUS_NOT_IN_REFERENCE = "not_in_reference"

Spacing = Sequence[float]
Pooling = Literal["max", "union"]

EMPTY_MASK_POLICY = (
    "Organ absent in the reference: excluded from all averages and counted (not in reference). "
    "Organ present in the reference but absent in the prediction: DSC 0, HD95 and mean surface distance "
    "missing (not averaged), volume difference -100 % (missed). No NaN is ever averaged."
)
HD95_CONVENTION = (
    "HD95: surface voxels = mask minus its 6-connected erosion; Euclidean distances in mm between voxel centres; "
    "95th percentile of each directed distance set, the larger of the two (as MONAI compute_hausdorff_distance)."
)

# 6-connected (face) neighbourhood, scipy's default for binary_erosion and MONAI's edge definition.
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class OrganResult:
    """The metrics of one organ in one case. ``None`` marks a metric the empty-mask policy leaves undefined.

    Attributes:
        case: case name (file name without extension).
        organ: label value in the label maps.
        name: organ name (TG-263 when known).
        status: ``"ok"``, ``"missed"`` or ``"not_in_reference"`` (see the module docstring).
        dsc: Dice similarity coefficient, fraction 0..1.
        hd95_mm: 95th-percentile Hausdorff distance in mm.
        hd100_mm: Hausdorff distance (maximum) in mm.
        msd_mm: mean (symmetric) surface distance in mm.
        volume_ref_ml: reference volume in ml.
        volume_pred_ml: predicted volume in ml.
        volume_diff_percent: ``100 * (pred - ref) / ref``.
    """

    case: str
    organ: int
    name: str
    status: str
    dsc: float | None
    hd95_mm: float | None
    hd100_mm: float | None
    msd_mm: float | None
    volume_ref_ml: float
    volume_pred_ml: float
    volume_diff_percent: float | None


def _sampling(spacing: Spacing) -> tuple[float, float, float]:
    """SimpleITK ``(sx, sy, sz)`` -> array-axis ``(sz, sy, sx)``."""
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive voxel sizes (sx, sy, sz) in mm, got {tuple(spacing)}")
    sx, sy, sz = (float(s) for s in spacing)
    return sz, sy, sx


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred and ref must be 3D masks of the same shape, got {pred.shape} and {ref.shape}")
    return pred, ref


def _union_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the union of ``masks`` grown by ``margin`` voxels (clipped to the array); None if empty."""
    union = np.logical_or.reduce(masks)
    box = ndimage.find_objects(union.astype(np.uint8))
    if not box:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box[0], union.shape,
                                                                                             strict=True))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient ``2 |P ∩ R| / (|P| + |R|)``.

    Args:
        pred: ``(Z, Y, X)`` boolean mask (anything non-zero is foreground).
        ref: ``(Z, Y, X)`` boolean mask.

    Returns:
        A fraction in [0, 1]; 0 when exactly one mask is empty; NaN when both are empty (0/0, by rule:
        :func:`organ_metrics` never reports it, the organ is ``"not_in_reference"`` there).

    Raises:
        ValueError: the masks differ in shape or are not 3D.
    """
    pred, ref = _check_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The mask minus its 6-connected binary erosion (outside the array counts as background).

    Args:
        mask: ``(Z, Y, X)`` boolean mask.

    Returns:
        ``(Z, Y, X)`` boolean array of the surface voxels.
    """
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty masks.

    Args:
        pred: ``(Z, Y, X)`` boolean mask.
        ref: ``(Z, Y, X)`` boolean mask.
        spacing: voxel size ``(sx, sy, sz)`` in mm, SimpleITK order.

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: 1D float64 arrays, one distance per surface voxel of ``pred``
        (to the nearest surface voxel of ``ref``) and per surface voxel of ``ref`` (to ``pred``'s surface).

    Raises:
        ValueError: a mask is empty (the distance is undefined; see the module's empty-mask policy), the shapes
            differ, or the spacing is not three positive numbers.
    """
    pred, ref = _check_pair(pred, ref)
    sampling = _sampling(spacing)
    if not pred.any() or not ref.any():
        which = "both masks are" if not (pred.any() or ref.any()) else "pred is" if not pred.any() else "ref is"
        raise ValueError(f"surface distances are undefined: {which} empty (the caller decides the empty-mask policy)")
    box = _union_box(pred, ref)  # the margin keeps erosion at the crop edge identical to the full array
    pred, ref = pred[box], ref[box]
    surface_pred, surface_ref = surface_voxels(pred), surface_voxels(ref)
    to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=sampling)
    return to_ref[surface_pred].astype(np.float64), to_pred[surface_ref].astype(np.float64)


def _percentile_hausdorff(distances: tuple[np.ndarray, np.ndarray], percentile: float, pooling: Pooling) -> float:
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if pooling == "max":
        return float(max(np.percentile(d, percentile) for d in distances))
    if pooling == "union":
        return float(np.percentile(np.concatenate(distances), percentile))
    raise ValueError(f"pooling must be 'max' or 'union', got {pooling!r}")


def hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: Spacing, percentile: float = 100.0, *,
              pooling: Pooling = "max") -> float:
    """Symmetric percentile Hausdorff distance in mm (see the module docstring for the conventions).

    Args:
        pred: ``(Z, Y, X)`` boolean mask, not empty.
        ref: ``(Z, Y, X)`` boolean mask, not empty.
        spacing: voxel size ``(sx, sy, sz)`` in mm, SimpleITK order.
        percentile: 100 for the Hausdorff distance, 95 for HD95.
        pooling: ``"max"`` (MONAI: the larger of the two directed percentiles) or ``"union"`` (the percentile
            of both directed sets pooled).

    Returns:
        The distance in mm.

    Raises:
        ValueError: a mask is empty, bad percentile, pooling, shapes or spacing.
    """
    return _percentile_hausdorff(surface_distances(pred, ref, spacing), percentile, pooling)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing, *, pooling: Pooling = "max") -> float:
    """95th-percentile Hausdorff distance in mm; MONAI's value with the default ``pooling="max"``.

    Args/Raises: as :func:`hausdorff`.
    """
    return hausdorff(pred, ref, spacing, 95.0, pooling=pooling)


def hd100(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """Hausdorff distance (largest surface distance either way) in mm.

    Args/Raises: as :func:`hausdorff`.
    """
    return hausdorff(pred, ref, spacing, 100.0)


def mean_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """Mean of both directed surface-distance sets pooled together, in mm (MONAI's symmetric ASSD).

    Args/Raises: as :func:`surface_distances`.
    """
    return float(np.concatenate(surface_distances(pred, ref, spacing)).mean())


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """Volume of a mask in ml (cm³).

    Args:
        mask: ``(Z, Y, X)`` boolean mask.
        spacing: voxel size ``(sx, sy, sz)`` in mm.

    Returns:
        ``voxels * sx * sy * sz / 1000``.
    """
    return int(np.count_nonzero(mask)) * float(np.prod(_sampling(spacing))) / 1000.0


def volume_difference_percent(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """Signed volume difference ``100 * (V_pred - V_ref) / V_ref``: -100 for a missed organ, > 0 for too large.

    Args:
        pred: ``(Z, Y, X)`` boolean mask.
        ref: ``(Z, Y, X)`` boolean mask, not empty.
        spacing: voxel size ``(sx, sy, sz)`` in mm.

    Raises:
        ValueError: ``ref`` is empty (no reference volume to compare with).
    """
    pred, ref = _check_pair(pred, ref)
    v_ref = volume_ml(ref, spacing)
    if v_ref == 0:
        raise ValueError("volume difference is undefined: the reference mask is empty")
    return 100.0 * (volume_ml(pred, spacing) - v_ref) / v_ref


def organ_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Spacing, labels: Mapping[int, str], *,
                  case: str = "", pooling: Pooling = "max") -> list[OrganResult]:
    """Per-organ metrics of one case under the empty-mask policy (module docstring).

    Args:
        pred_labels: ``(Z, Y, X)`` integer label map of the prediction.
        ref_labels: ``(Z, Y, X)`` integer label map of the reference, same grid.
        spacing: voxel size ``(sx, sy, sz)`` in mm, SimpleITK order.
        labels: organ label value -> name; the organs to evaluate (0, the background, is skipped).
        case: the case name written into each result.
        pooling: HD95 convention, see :func:`hausdorff`.

    Returns:
        One :class:`OrganResult` per organ of ``labels`` (in increasing label value), NaN-free.

    Raises:
        ValueError: the label maps differ in shape or are not 3D, or the spacing is invalid.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape or pred_labels.ndim != 3:
        raise ValueError(f"label maps must be 3D and of the same shape, got {pred_labels.shape} and "
                         f"{ref_labels.shape}")
    if not (np.issubdtype(pred_labels.dtype, np.integer) and np.issubdtype(ref_labels.dtype, np.integer)):
        raise ValueError(f"label maps must hold integers, got {pred_labels.dtype} and {ref_labels.dtype}")
    _sampling(spacing)
    names = {int(v): str(name) for v, name in labels.items() if int(v) > 0}
    values = sorted(names)
    top = max(values, default=0)
    # One pass per map finds every organ's bounding box; each organ is then measured in the union of its two
    # boxes grown by one voxel (exact, since the erosion sees background all round, and much faster).
    boxes = [ndimage.find_objects(np.where((a > top) | (a < 0), 0, a), max_label=top)
             for a in (pred_labels, ref_labels)]
    results = []
    for value in values:
        name = names[value]
        found = [b[value - 1] for b in boxes if b[value - 1] is not None]
        if not found:
            results.append(OrganResult(case, value, name, STATUS_NOT_IN_REFERENCE, None, None, None, None, 0.0, 0.0,
                                       None))
            continue
        box = tuple(slice(max(min(b[i].start for b in found) - 1, 0), min(max(b[i].stop for b in found) + 1, n))
                    for i, n in enumerate(ref_labels.shape))
        pred, ref = pred_labels[box] == value, ref_labels[box] == value
        v_pred, v_ref = volume_ml(pred, spacing), volume_ml(ref, spacing)
        if not ref.any():
            results.append(OrganResult(case, value, name, STATUS_NOT_IN_REFERENCE, None, None, None, None, 0.0,
                                       v_pred, None))
        elif not pred.any():
            results.append(OrganResult(case, value, name, STATUS_MISSED, 0.0, None, None, None, v_ref, 0.0, -100.0))
        else:
            distances = surface_distances(pred, ref, spacing)
            results.append(OrganResult(
                case, value, name, STATUS_OK, dice(pred, ref),
                _percentile_hausdorff(distances, 95.0, pooling), _percentile_hausdorff(distances, 100.0, pooling),
                float(np.concatenate(distances).mean()), v_ref, v_pred, 100.0 * (v_pred - v_ref) / v_ref,
            ))
    return results
