"""How RTSTRUCT export writes the holes of a structure on a slice: the two conventions and the keyhole joining.

- ``separate`` (default): every boundary is its own CLOSED_PLANAR contour, holes included; a reader must combine a
  slice's contours with the even-odd rule (a contour inside another is a hole, one inside a hole an island), as
  :func:`separeg.rt.rtstruct.read_rtstruct`, SlicerRT and highdicom-based readers do. Readers that fill each contour
  and OR them (plastimatch's default rasteriser, several planning systems) fill the holes.
- ``keyhole``: each hole is joined to the boundary around it by a zero-width cut (the path runs to the hole, around
  it and back along the same segment), so outer boundary and holes form one contour that every reader fills the
  same way: even-odd, non-zero winding and OR of contours all leave the hole out. Islands inside holes stay
  separate contours (filled by every convention). This is what planning systems that cannot store holes write.

The cut for a hole starts at its rightmost vertex and runs in +x to the nearest edge of the (growing) outer contour;
holes are joined from the rightmost one leftwards, so a cut crosses no edge (the hole-elimination step of
ear-clipping triangulation).
"""

from __future__ import annotations

import numpy as np

from separeg.registry import HOLE_CONVENTIONS

__all__ = ["HOLE_CONVENTIONS", "nesting", "keyhole"]



def nesting(contours: list[np.ndarray]) -> list[int]:
    """For each ``(N, 2)`` closed, non-touching contour, the index of the contour it lies in directly, or -1.

    Depth (how many contours enclose one) is even for outer boundaries and islands, odd for holes.
    """
    from skimage.measure import points_in_poly

    if not contours:
        return []
    firsts = np.array([c[0] for c in contours])
    inside = np.zeros((len(contours), len(contours)), bool)  # inside[i, j]: contour i lies in contour j
    for j, contour in enumerate(contours):
        inside[:, j] = points_in_poly(firsts, contour)
        inside[j, j] = False
    depth = inside.sum(axis=1)
    return [int(max(np.flatnonzero(row), key=lambda j: depth[j])) if row.any() else -1 for row in inside]


def keyhole(contours: list[np.ndarray]) -> list[np.ndarray]:
    """Join every hole to the contour around it (see the module doc).

    Args:
        contours: the closed boundaries of one slice, ``(N, 2)`` (x, y), none touching another.

    Returns:
        one contour per outer boundary or island, holes included in it by zero-width cuts.
    """
    parent = nesting(contours)
    depth = [0] * len(contours)
    for i in range(len(contours)):
        j = parent[i]
        while j >= 0:
            depth[i] += 1
            j = parent[j]
    out = []
    for i, contour in enumerate(contours):
        if depth[i] % 2:
            continue
        holes = [contours[h] for h in range(len(contours)) if parent[h] == i]
        polygon = contour
        for hole in sorted(holes, key=lambda h: -float(h[:, 0].max())):
            polygon = _join(polygon, hole)
        out.append(polygon)
    return out


def _join(polygon: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``polygon`` with ``hole`` spliced in by a cut from the hole's rightmost vertex in +x to the nearest edge."""
    m = int(np.argmax(hole[:, 0]))
    mx, my = hole[m]
    start, end = polygon, np.roll(polygon, -1, axis=0)
    lo, hi = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    spans = (lo <= my) & (my <= hi) & (start[:, 1] != end[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        x = start[:, 0] + (my - start[:, 1]) * (end[:, 0] - start[:, 0]) / (end[:, 1] - start[:, 1])
    x = np.where(spans & (x > mx), x, np.inf)
    e = int(np.argmin(x))
    assert np.isfinite(x[e]), "a hole outside the contour that encloses it"
    point = np.array([x[e], my])
    loop = np.vstack([np.roll(hole, -m, axis=0), hole[m:m + 1]])  # from the rightmost vertex around and back
    for v in (e, (e + 1) % len(polygon)):
        if np.allclose(point, polygon[v], rtol=0, atol=1e-9):  # the cut meets a vertex: there and back, no new one
            return np.vstack([polygon[:v + 1], loop, polygon[v:]])
    return np.vstack([polygon[:e + 1], point[None], loop, point[None], polygon[e + 1:]])
