"""Rasterising planar contours: the voxels whose centres lie inside a slice's polygons under the even-odd rule,
by scanline (the convention is described in :mod:`separeg.rt.rtstruct`, which maps RTSTRUCT contours to the
continuous voxel indices these functions take).

May import: numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INDEX_DECIMALS", "rasterise", "fill_slice"]

INDEX_DECIMALS = 6  # voxel indices are rounded to 1e-6 voxel, so the edge rule does not depend on floating-point noise


def rasterise(polygons: dict[int, list[np.ndarray]], shape: tuple[int, int, int]):
    """``(box, crop)`` of the voxels whose centres lie inside (even-odd) their slice's polygons, or (None, None)."""
    filled = {}
    for k, polys in polygons.items():
        got = fill_slice(polys, shape[1], shape[2])
        if got is not None:
            filled[k] = got
    if not filled:
        return None, None
    ks = sorted(filled)
    y0 = min(f[0] for f in filled.values())
    x0 = min(f[1] for f in filled.values())
    y1 = max(f[0] + f[2].shape[0] for f in filled.values())
    x1 = max(f[1] + f[2].shape[1] for f in filled.values())
    crop = np.zeros((ks[-1] - ks[0] + 1, y1 - y0, x1 - x0), bool)
    for k, (y, x, mask) in filled.items():
        crop[k - ks[0], y - y0:y - y0 + mask.shape[0], x - x0:x - x0 + mask.shape[1]] = mask
    return (slice(ks[0], ks[-1] + 1), slice(y0, y1), slice(x0, x1)), crop


def fill_slice(polys: list[np.ndarray], height: int, width: int):
    """Scanline even-odd fill of ``(N, 2)`` (x, y) index polygons on voxel centres: ``(y0, x0, mask)`` or None.

    Rows ``y`` cross an edge when ``min(y_a, y_b) <= y < max(y_a, y_b)``; on a row, a voxel is inside when an odd
    number of crossings lie at or left of its centre. Work is per crossing, within the polygons' bounding box.
    """
    points = np.concatenate(polys)
    xmin, xmax = max(0, int(np.ceil(points[:, 0].min()))), min(width - 1, int(np.floor(points[:, 0].max())))
    ymin, ymax = max(0, int(np.ceil(points[:, 1].min()))), min(height - 1, int(np.floor(points[:, 1].max())))
    if xmin > xmax or ymin > ymax:
        return None
    start = np.concatenate(polys)
    end = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    lo, hi = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    first = np.clip(np.ceil(lo), ymin, ymax + 1).astype(np.int64)
    stop = np.clip(np.ceil(hi), ymin, ymax + 1).astype(np.int64)
    counts = stop - first
    edge = np.repeat(np.arange(len(start)), counts)
    if edge.size == 0:
        return None
    row = first[edge] + np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts)
    xa, ya, xb, yb = start[edge, 0], start[edge, 1], end[edge, 0], end[edge, 1]
    crossing = np.round(xa + (row - ya) * (xb - xa) / (yb - ya), INDEX_DECIMALS)
    column = np.clip(np.ceil(crossing), xmin, xmax + 1).astype(np.int64) - xmin
    rows, cols = ymax - ymin + 1, xmax - xmin + 2
    toggles = np.bincount((row - ymin) * cols + column, minlength=rows * cols).reshape(rows, cols)
    mask = (np.cumsum(toggles[:, :-1], axis=1) & 1).astype(bool)
    if not mask.any():
        return None
    return ymin, xmin, mask
