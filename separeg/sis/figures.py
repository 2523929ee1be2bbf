"""PNG figures a person can check by eye: superpixel regions over CT slices; box plots that say when n is small."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from separeg.runtime.atomic import atomic_path
from separeg.sis.regions import RegionMaps, window_hu

__all__ = ["region_overlay", "save_png", "pick_slices", "box_or_points", "MIN_BOX", "SMALL_N_NOTE"]

#: Fewer values than this are drawn as points: a box of one or two values shows nothing but looks like a result.
MIN_BOX = 3
SMALL_N_NOTE = f"points: fewer than {MIN_BOX} values, no box"

# Distinct colours for reference organ outlines (RGB 0-255), label value 1 first.
ORGAN_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)], np.uint8)
REGION_EDGE = np.array([255, 225, 25], np.uint8)


def pick_slices(maps: RegionMaps, count: int = 4) -> list[int]:
    """``count`` slices spread over those that hold regions (all of them if fewer)."""
    with_regions = np.flatnonzero(maps.regions_per_slice())
    if len(with_regions) == 0:
        return []
    picks = np.linspace(0, len(with_regions) - 1, num=min(count, len(with_regions)) + 2)[1:-1]
    return sorted({int(with_regions[int(round(p))]) for p in picks})


def _edges(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge


def _kept_box(maps: RegionMaps, slices: Sequence[int], margin: int = 6) -> tuple[slice, slice]:
    """In-plane box around the kept regions of ``slices`` (the whole slice if there are none)."""
    kept = (maps.labels[list(slices)] > 0).any(axis=0) if len(slices) else np.zeros(0)
    if not kept.any():
        return np.s_[:, :]
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    h, w = kept.shape
    return np.s_[max(rows[0] - margin, 0):min(rows[-1] + margin + 1, h),
                 max(cols[0] - margin, 0):min(cols[-1] + margin + 1, w)]


def region_overlay(hu: np.ndarray, maps: RegionMaps, slices: Sequence[int], *, reference: np.ndarray | None = None,
                   window: tuple[float, float] = (-1000.0, 1000.0), min_width: int = 384) -> np.ndarray:
    """A row of slices: kept regions outlined in yellow, dropped area darkened, reference organs outlined in colour.

    Args:
        hu: ``(Z, H, W)`` HU volume.
        maps: its region maps.
        slices: slice indices to draw.
        reference: optional ``(Z, H, W)`` organ label map.
        min_width: panels are cropped to the kept regions and enlarged (nearest neighbour) to about this size.

    Returns:
        ``(H', W' * len(slices), 3)`` uint8 RGB image.
    """
    box = _kept_box(maps, slices)
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    scale = max(1, int(np.ceil(min_width / max(height, width))))
    panels = []
    for k in slices:
        grey = (window_hu(hu[k][box], window) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        labels = maps.labels[k][box]
        rgb[labels == 0] = (rgb[labels == 0] * 0.35).astype(np.uint8)
        rgb = rgb.repeat(scale, 0).repeat(scale, 1)
        rgb[_edges(labels.repeat(scale, 0).repeat(scale, 1))] = REGION_EDGE
        if reference is not None:
            organs = reference[k][box].repeat(scale, 0).repeat(scale, 1)
            for value in np.unique(organs[organs > 0]):
                mask = organs == value
                outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, scale // 3))
                rgb[outline] = ORGAN_COLOURS[(int(value) - 1) % len(ORGAN_COLOURS)]
        panels.append(rgb)
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8) if panels else None
    row = [p for panel in panels for p in (panel, gap)][:-1]
    return np.concatenate(row, axis=1) if row else np.zeros((1, 1, 3), np.uint8)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 image as PNG, atomically."""
    import SimpleITK as sitk

    with atomic_path(path, suffix=".png") as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(tmp))
    return Path(path)


def box_or_points(ax, data: Sequence[Sequence[float]], positions: Sequence[float] | None = None) -> bool:
    """Draw each group of ``data`` as a box plot (mean marked) when it has at least :data:`MIN_BOX` values, else
    as its values (points). Empty groups are left blank.

    Returns:
        True when some group was drawn as points (say so in the title: :data:`SMALL_N_NOTE`).
    """
    positions = list(positions) if positions is not None else list(range(1, len(data) + 1))
    boxes = [(x, list(d)) for x, d in zip(positions, data, strict=True) if len(d) >= MIN_BOX]
    if boxes:
        ax.boxplot([d for _, d in boxes], positions=[x for x, _ in boxes], widths=0.6, showmeans=True)
    small = [(x, list(d)) for x, d in zip(positions, data, strict=True) if 0 < len(d) < MIN_BOX]
    for x, values in small:
        ax.plot([x] * len(values), values, "o", color="black", markersize=5)
    return bool(small)
