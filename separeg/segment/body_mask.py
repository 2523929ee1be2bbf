"""Every organ inside the body: contour labels in air outside the patient are removed (issue 30).

A model asked for an organ it cannot find may label air (a fine-tuned "Esophagus" of 4-31 litres: every voxel below
-500 HU in front of the patient). The body here is, per slice, the voxels above :data:`BODY_THRESHOLD_HU` and
everything they enclose (airways, lungs, the laryngeal lumen). Not the largest 3D component (the SIS body mask,
:func:`separeg.sis.regions.body_mask`): OpenKBP's CTs keep only a narrow strip of tissue around the contours on
their lowest slices, disconnected from the rest, and that mask drops 20 % of pt_203's reference voxels there; this
one drops 0.16 % of the spinal cord's and 0.4 % of the larynx's reference voxels over 50 OpenKBP patients, 0 of the
other organs'.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["BODY_THRESHOLD_HU", "inside_body", "constrain_to_body"]

BODY_THRESHOLD_HU = -500.0  # fat is about -100 HU, lung -700 to -900, air -1000: the SIS body threshold too


def inside_body(hu_slice: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """``(H, W)`` bool: the slice's voxels above ``threshold_hu`` and the holes they enclose."""
    return ndimage.binary_fill_holes(hu_slice > threshold_hu)


def constrain_to_body(labels: np.ndarray, hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> int:
    """Set labels outside the body (:func:`inside_body`, slice by slice) to background, in place.

    Args:
        labels: ``(Z, H, W)`` label map, edited in place.
        hu: ``(Z, H, W)`` CT in HU on the same grid (a view is enough: only slices holding labels are read).

    Returns:
        The number of voxels set to background.
    """
    assert labels.shape == hu.shape, (labels.shape, hu.shape)
    removed = 0
    for k in np.flatnonzero(labels.any(axis=(1, 2))):
        outside = (labels[k] != 0) & ~inside_body(np.asarray(hu[k]), threshold_hu)
        removed += int(outside.sum())
        labels[k][outside] = 0
    return removed
