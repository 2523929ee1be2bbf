"""Structure-aware image separation (SIS): superpixel regions of axial CT slices and their crops.

Paper, section "Structure-aware Image Separation": each axial slice is split into SLIC superpixels
(32 segments); each region is cut out by its tight bounding box, pixels outside the region are set to
0, the box is zero-padded to a square and resized to 128 x 128. DESIGN §2.3 adds: window HU to
[-1000, 1000] first, drop regions outside the body (air, couch), compute label maps once per volume
and cache them, and cut crops in batches on the training device.

Two halves:
- :func:`compute_region_maps` (numpy/scikit-image, once per volume, cached by :func:`load_or_compute`):
  a label map per slice (0 = dropped) and a table of the kept regions.
- :class:`separeg.sis.crops.RegionCropper` (torch, any device): crops for a batch of region indices without a
  Python loop over regions.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from separeg.registry import SEPARATION_EXTENTS
from separeg.registry import SEPARATIONS as SEPARATION_MODES
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.runtime.flags import flag, positive_int

__all__ = [
    "SEPARATION_MODES",
    "SISConfig",
    "RegionMaps",
    "window_hu",
    "body_mask",
    "body_box",
    "to_uint8",
    "slic_slice",
    "compute_region_maps",
    "load_or_compute",
]

CACHE_FORMAT = 1


@dataclass(frozen=True)
class SISConfig:
    """Parameters of the separation. Defaults follow the paper and its reference code.

    Attributes:
        mode: ``sis`` (SLIC superpixels), ``regular`` (square grid; the paper's ablation, Table 4) or
            ``image`` (one region per body slice: the extent itself, for image-level baselines). ``dense``
            separates like ``image``; pretraining then pairs feature-map pixels (the "no separation" ablation).
        extent: ``body`` separates each slice's body bounding box (plus ``body_margin`` pixels), ``slice`` the
            whole slice as the reference code does. Where the patient fills a small part of the field of
            view (OpenKBP: 5-10 % of the pixels) ``slice`` leaves one or two regions per slice; ``body``
            spends the 32 segments on anatomy.
        hu_window: HU clipped to this window, then scaled to [0, 1] (paper: [-1000, 1000]).
        n_segments: superpixels per slice (paper: 32); for ``regular`` the grid has about as many cells.
        compactness, sigma: SLIC parameters on the 3-channel uint8 slice (reference code: 15, 0.8).
        body_threshold_hu: voxels above this belong to the body mask (air and lung below are filled in).
        min_body_fraction: a region is kept when at least this fraction of its pixels is inside the body.
        min_region_pixels: smaller regions are dropped (slivers at the body edge).
        crop_size: side of the square crops (paper: 128).
    """

    mode: str = field(default="sis", metadata=flag(
        "sis: SLIC superpixels (paper); regular: square grid; image: whole slices (image-level baselines); dense: "
        "pixel pairs on feature maps (the 'no separation' ablation); %(default)s", name="--separation",
        choices=SEPARATION_MODES))
    extent: str = field(default="body", metadata=flag(
        "separate the body's bounding box (the default) or the whole slice (reference code)",
        choices=SEPARATION_EXTENTS))
    body_margin: int = 4
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    n_segments: int = field(default=32, metadata=flag("superpixels per slice (%(default)s)", type=positive_int))
    compactness: float = field(default=15.0, metadata=flag("SLIC compactness (%(default)s)"))
    sigma: float = field(default=0.8, metadata=flag("SLIC Gaussian smoothing (%(default)s)"))
    body_threshold_hu: float = field(default=-500.0, metadata=flag(
        "HU above which a voxel belongs to the body mask (%(default)s)", name="--body-threshold"))
    min_body_fraction: float = 0.5
    min_region_pixels: int = 16
    crop_size: int = 128

    def __post_init__(self) -> None:
        if self.mode not in SEPARATION_MODES:
            raise InputError(f"unknown separation mode {self.mode!r}; choose one of {', '.join(SEPARATION_MODES)}")
        if self.extent not in SEPARATION_EXTENTS:
            raise InputError(f"unknown extent {self.extent!r}; choose one of {', '.join(SEPARATION_EXTENTS)}")
        lo, hi = self.hu_window
        if not lo < hi:
            raise InputError(f"HU window {self.hu_window} must have low < high")
        if self.n_segments < 2:
            raise InputError(f"n_segments must be at least 2, got {self.n_segments}")
        if not 0.0 <= self.min_body_fraction <= 1.0:
            raise InputError(f"min_body_fraction must be in [0, 1], got {self.min_body_fraction}")
        if self.crop_size < 8:
            raise InputError(f"crop_size must be at least 8, got {self.crop_size}")
        object.__setattr__(self, "hu_window", (float(lo), float(hi)))

    def key(self) -> str:
        """Hash of the fields that change the label maps (crop size does not)."""
        label_fields = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "crop_size"}
        return hashlib.sha256(json.dumps([CACHE_FORMAT, label_fields], sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RegionMaps:
    """Label maps of one volume and the table of its kept regions.

    Attributes:
        labels: ``(Z, H, W)`` uint16; 0 = not a training region, 1..n per slice = kept regions.
        slice_index, label: ``(N,)`` the slice and its label value of each kept region.
        boxes: ``(N, 4)`` int32 tight boxes ``y0, y1, x0, x1``, inclusive (slice with ``y1 + 1``).
        n_pixels, mean_hu: ``(N,)`` region size and mean HU (before windowing).
        body_area: ``(Z,)`` pixels of the body mask on each slice.
        volume_hash, config_key: what the maps were computed from.
    """

    labels: np.ndarray
    slice_index: np.ndarray
    label: np.ndarray
    boxes: np.ndarray
    n_pixels: np.ndarray
    mean_hu: np.ndarray
    body_area: np.ndarray
    volume_hash: str = ""
    config_key: str = ""

    def __len__(self) -> int:
        return len(self.label)

    def regions_per_slice(self) -> np.ndarray:
        """``(Z,)`` number of kept regions on each slice."""
        return np.bincount(self.slice_index, minlength=self.labels.shape[0])

    def body_slices(self, min_fraction: float = 0.1) -> np.ndarray:
        """``(Z,)`` bool: slices whose body area is at least ``min_fraction`` of the largest.

        Some archives store only a patch of tissue on the slices beyond the treated region (OpenKBP keeps
        the CT near the contours and sets the rest to air); such slices are not whole body sections.
        """
        return self.body_area >= max(min_fraction * float(self.body_area.max(initial=0)), 1.0)

    def save(self, path: str | Path) -> Path:
        """Atomic write (temporary file, then rename), so an interrupted run never leaves a broken cache."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, format=np.array(CACHE_FORMAT), **asdict(self))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RegionMaps:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT:
                raise ValueError(f"cache format {int(data['format'])}, expected {CACHE_FORMAT}")
            values = {f.name: data[f.name] for f in fields(cls)}
        values["volume_hash"], values["config_key"] = str(values["volume_hash"]), str(values["config_key"])
        return cls(**values)


def window_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and scale to [0, 1] (float32)."""
    lo, hi = window
    return ((np.clip(hu, lo, hi, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32, copy=False)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """``(Z, H, W)`` bool mask of the patient: the largest 3D component above ``threshold_hu``, holes filled per slice.

    An in-plane opening first cuts thin bridges to the couch or immobilisation mask; lungs and airways
    enclosed by the body are filled in, so lung regions count as inside.
    """
    above = hu > threshold_hu
    # Two 3 x 3 erosions are one 5 x 5 erosion: a separable min filter (likewise max for dilation) is
    # several times faster than iterated binary morphology and gives the same mask.
    in_plane = (1, 5, 5)
    opened = ndimage.maximum_filter(ndimage.minimum_filter(above.view(np.uint8), size=in_plane), size=in_plane)
    components, n = ndimage.label(opened)
    if n == 0:
        return np.zeros_like(above)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    body = ndimage.maximum_filter(body.view(np.uint8), size=in_plane).view(bool) & above
    for k in range(body.shape[0]):
        rows, cols = np.flatnonzero(body[k].any(axis=1)), np.flatnonzero(body[k].any(axis=0))
        if len(rows):
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            body[k][box] = ndimage.binary_fill_holes(body[k][box])
    return body


def _lab_lightness_table(vmin: int, vmax: int) -> np.ndarray:
    """CIELAB lightness of the grey levels 0..255 after skimage's per-image rescale to [0, 1].

    ``slic`` on a grey slice repeated to 3 channels rescales by the slice's min/max, converts to Lab
    (a* = b* = 0 for grey) and clusters; evaluating that conversion on the 256 possible grey levels
    gives the same lightness values at a fraction of the cost.
    """
    from skimage.color import rgb2lab
    from skimage.util import img_as_float

    levels = img_as_float(np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2))
    lo, hi = levels[vmin, 0, 0], levels[vmax, 0, 0]
    levels = levels - lo
    if hi != lo:
        levels = levels / (hi - lo)
    return rgb2lab(levels)[:, 0, 0]


def slic_slice(slice_u8: np.ndarray, config: SISConfig) -> np.ndarray:
    """SLIC superpixels of one uint8 slice, the same labels as ``skimage.segmentation.slic`` on its RGB copy.

    Args:
        slice_u8: ``(H, W)`` uint8, the windowed slice.

    Returns:
        ``(H, W)`` int labels starting at 1.
    """
    from skimage.segmentation import slic

    vmin, vmax = int(slice_u8.min()), int(slice_u8.max())
    lightness = _lab_lightness_table(vmin, vmax)[slice_u8]
    # slic rescales its single channel to [0, 1] again (L spans lightness[vmin]..lightness[vmax]); dividing
    # the compactness by that span keeps the colour distance the one computed in Lab units.
    span = float(lightness.max() - lightness.min()) or 1.0
    return slic(lightness, n_segments=config.n_segments, compactness=config.compactness / span, sigma=config.sigma,
                start_label=1, channel_axis=None)


def _grid_slice(shape: tuple[int, int], n_segments: int) -> np.ndarray:
    """Regular square grid with about ``n_segments`` cells over the slice, labels from 1."""
    h, w = shape
    side = max(int(round(np.sqrt(h * w / n_segments))), 1)
    rows = np.arange(h) // side
    cols = np.arange(w) // side
    return (rows[:, None] * (cols.max() + 1) + cols[None, :] + 1).astype(np.int32)


def body_box(body: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Bounding box of a slice's body mask grown by ``margin`` pixels, clipped to the slice."""
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    h, w = body.shape
    return np.s_[max(y0 - margin, 0):min(y1 + margin + 1, h), max(x0 - margin, 0):min(x1 + margin + 1, w)]


def to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """The windowed volume as uint8 grey levels (what SLIC sees)."""
    return np.round(window_hu(hu, window) * 255.0).astype(np.uint8)


def compute_region_maps(hu: np.ndarray, config: SISConfig = SISConfig(), *, events: Events | None = None,
                        workers: int | None = None, volume_hash: str = "") -> RegionMaps:
    """Separate every axial slice of a volume into regions and keep those inside the body.

    Args:
        hu: ``(Z, H, W)`` intensities in HU (``sitk.GetArrayFromImage`` order: ``hu[k]`` is axial slice k).
        config: separation parameters.
        events: progress (stage ``sis``, one step per slice).
        workers: threads for SLIC (it releases the GIL); default: all CPUs.
        volume_hash: recorded in the result for the cache.

    Returns:
        The label maps and region table.
    """
    if hu.ndim != 3:
        raise InputError(f"expected a (Z, H, W) volume, got shape {hu.shape}")
    if not np.isfinite(hu).all():
        raise InputError("the volume contains NaN or infinite voxels; fix or re-export the scan")
    events = events or Events()
    body = body_mask(hu, config.body_threshold_hu)
    grey = to_uint8(hu, config.hu_window)
    depth = hu.shape[0]

    def separate(k: int) -> np.ndarray:
        raw = np.zeros(hu.shape[1:], np.int32)
        if not body[k].any():
            return raw
        box = body_box(body[k], config.body_margin) if config.extent == "body" else np.s_[:, :]
        part = grey[k][box]
        if config.mode in ("image", "dense"):
            raw[box] = 1
        elif config.mode == "regular":
            raw[box] = _grid_slice(part.shape, config.n_segments)
        else:
            raw[box] = slic_slice(part, config)
        return raw

    labels = np.zeros(hu.shape, np.uint16)
    table: list[np.ndarray] = []
    events.progress("sis", 0, depth)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for k, raw in enumerate(pool.map(separate, range(depth))):
            kept = _keep_regions(raw, body[k], hu[k], config)
            if len(kept):
                lookup = np.zeros(int(raw.max()) + 1, np.uint16)
                lookup[kept[:, 0].astype(np.int64)] = np.arange(1, len(kept) + 1)
                labels[k] = lookup[raw]
                kept[:, 0] = np.arange(1, len(kept) + 1)
                table.append(np.column_stack([np.full(len(kept), k), kept]))
            events.progress("sis", k + 1, depth)
    rows = np.concatenate(table) if table else np.zeros((0, 8))
    return RegionMaps(
        labels=labels,
        slice_index=rows[:, 0].astype(np.int32),
        label=rows[:, 1].astype(np.int32),
        boxes=rows[:, 2:6].astype(np.int32),
        n_pixels=rows[:, 6].astype(np.int32),
        mean_hu=rows[:, 7].astype(np.float32),
        body_area=body.sum(axis=(1, 2)).astype(np.int32),
        volume_hash=volume_hash,
        config_key=config.key(),
    )


def _keep_regions(raw: np.ndarray, body: np.ndarray, hu: np.ndarray, config: SISConfig) -> np.ndarray:
    """Rows ``label, y0, y1, x0, x1, n_pixels, mean_hu`` of the regions of one slice that are kept.

    Labels are iterated from the label image itself (``find_objects``), never from ``range(1, n)``,
    so no region is lost whatever label SLIC starts from.
    """
    flat = raw.ravel()
    n_pixels = np.bincount(flat)
    inside = np.bincount(flat, weights=body.ravel().astype(np.float64), minlength=len(n_pixels))
    hu_sum = np.bincount(flat, weights=hu.ravel().astype(np.float64), minlength=len(n_pixels))
    rows = []
    for value, box in enumerate(ndimage.find_objects(raw), start=1):
        if box is None or value == 0:
            continue
        count = n_pixels[value]
        outside_body = config.mode not in ("image", "dense") and inside[value] < config.min_body_fraction * count
        if count < config.min_region_pixels or outside_body:
            continue
        ys, xs = box
        rows.append((value, ys.start, ys.stop - 1, xs.start, xs.stop - 1, count, hu_sum[value] / count))
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def load_or_compute(hu: np.ndarray, volume_hash: str, config: SISConfig, cache_dir: str | Path, *,
                    events: Events | None = None, workers: int | None = None) -> tuple[RegionMaps, bool]:
    """Region maps from the cache, or computed and cached. Returns ``(maps, from_cache)``.

    The cache file is named by the volume's content hash and the configuration key; an unreadable or
    stale cache file is recomputed (and reported), never trusted.
    """
    events = events or Events()
    path = Path(cache_dir) / f"{volume_hash[:24]}-{config.key()}.npz"
    if path.exists():
        try:
            maps = RegionMaps.load(path)
            if maps.volume_hash == volume_hash and maps.config_key == config.key() and maps.labels.shape == hu.shape:
                return maps, True
            events.warning(f"cache file {path.name} does not match this volume; recomputing", stage="sis")
        except (OSError, ValueError, KeyError) as exc:
            events.warning(f"cache file {path.name} is unreadable ({exc}); recomputing", stage="sis")
    maps = compute_region_maps(hu, config, events=events, workers=workers, volume_hash=volume_hash)
    maps.save(path)
    return maps, False
