"""Input channels: which co-registered volumes a case stacks, and how each one's intensities are normalised.

A case is one volume (a CT) or several co-registered ones (MRI sequences T1, T2, STIR; CT + PET), stacked as the
network's input channels in a fixed order. The first channel defines the grid; the others are resampled onto it
(:func:`co_register`). Each channel is scaled to about [0, 1] before the network sees it (:func:`normalise`):

- ``window``: a fixed intensity window (CT in HU, default -1000..1000), the same for every scan;
- ``percentile``: per scan, the 0.5th..99.5th percentiles inside the body mask map to 0..1 (MRI, whose
  intensities have no absolute unit);
- ``zscore``: per scan, the z-score inside the body mask, -3..3 mapped to 0..1.

The body mask of an MR or PET scan is the voxels above its Otsu threshold; outside it intensities are kept
(clipped like the rest), so zero padding on the model grid stays darker than tissue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from separeg.runtime.errors import InputError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["CHANNELS_HELP", "NORMALISATIONS", "Channel", "CT_CHANNEL", "parse_channels", "channels_from_metadata",
           "normalise", "normalise_channels", "co_register", "check_channel_count"]

# The help of the --channels flag (pretrain, finetune).
CHANNELS_HELP = ("input channels, comma-separated NAME[:window|percentile|zscore] in input order, e.g. T1,T2,STIR or "
                 "CT,PET:zscore (CT: HU window; others: percentile by default)")

NORMALISATIONS = ("window", "percentile", "zscore")
_ZSCORE_RANGE = 3.0
# A mask this small is not a body: normalise over the whole scan instead.
_MIN_MASK_FRACTION = 0.01


@dataclass(frozen=True)
class Channel:
    """One input channel: its name (CT, T1, T2, PET, ...), normalisation and that normalisation's parameters."""

    name: str
    normalisation: str = "window"
    window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise InputError(f"channel {self.name}: unknown normalisation {self.normalisation!r}; choose one of "
                             f"{', '.join(NORMALISATIONS)}")
        lo, hi = self.window
        if not hi > lo:
            raise InputError(f"channel {self.name}: the window's upper bound must exceed its lower bound ({lo}, {hi})")
        plo, phi = self.percentiles
        if not 0 <= plo < phi <= 100:
            raise InputError(f"channel {self.name}: percentiles must satisfy 0 <= low < high <= 100 ({plo}, {phi})")

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "normalisation": self.normalisation}
        if self.normalisation == "window":
            out["window"] = list(self.window)
        elif self.normalisation == "percentile":
            out["percentiles"] = list(self.percentiles)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Channel:
        return cls(str(data["name"]), str(data.get("normalisation", "window")),
                   tuple(data.get("window", (-1000.0, 1000.0))), tuple(data.get("percentiles", (0.5, 99.5))))


CT_CHANNEL = Channel("CT")


def parse_channels(text: str | None, hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> tuple[Channel, ...]:
    """``--channels`` text: ``NAME[:NORMALISATION]`` items, comma-separated: ``T1,T2,STIR`` or ``CT,PET:zscore``.

    A channel named CT defaults to the HU ``window``; any other to ``percentile``. None or empty: one CT channel.

    Raises:
        InputError: an empty or repeated name, an unknown normalisation.
    """
    if not text or not text.strip():
        return (Channel("CT", window=tuple(hu_window)),)
    channels = []
    for item in text.split(","):
        name, _, norm = item.strip().partition(":")
        name, norm = name.strip(), norm.strip().lower()
        if not name:
            raise InputError(f"--channels {text!r}: an empty channel name; write names separated by commas, "
                             "e.g. T1,T2 or CT,PET:zscore")
        default = "window" if name.upper() == "CT" else "percentile"
        channels.append(Channel(name, norm or default, window=tuple(hu_window)))
    names = [c.name.lower() for c in channels]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"--channels {text!r} names {', '.join(repeated)} twice; each channel once, in input order")
    return tuple(channels)


def channels_from_metadata(inputs: dict) -> tuple[Channel, ...]:
    """A bundle's input channels; bundles written before multichannel support list names only (``["CT"]``)."""
    window = tuple(inputs.get("hu_window", (-1000.0, 1000.0)))
    found = inputs.get("channels") or ["CT"]
    return tuple(Channel(c, window=window) if isinstance(c, str) else Channel.from_dict(c) for c in found)


def _body_mask(array: np.ndarray) -> np.ndarray:
    """Voxels above the Otsu threshold (computed on a subsample: the threshold needs the histogram, not all voxels)."""
    from skimage.filters import threshold_otsu

    flat = array.ravel()
    sample = flat[:: max(1, flat.size // 1_000_000)]
    if sample.min() == sample.max():
        return np.ones(array.shape, bool)
    mask = array > threshold_otsu(sample)
    return mask if mask.mean() >= _MIN_MASK_FRACTION else np.ones(array.shape, bool)


def normalise(array: np.ndarray, channel: Channel) -> np.ndarray:
    """One scan's intensities scaled to about [0, 1] as ``channel`` says; float32, same shape."""
    x = np.asarray(array, dtype=np.float32)
    if channel.normalisation == "window":
        lo, hi = channel.window
        return (np.clip(x, lo, hi) - lo) / (hi - lo)
    mask = _body_mask(x)
    inside = x[mask]
    if channel.normalisation == "percentile":
        lo, hi = np.percentile(inside, channel.percentiles)
        scale = hi - lo if hi > lo else 1.0
        return ((np.clip(x, lo, hi) - lo) / scale).astype(np.float32)
    mean, std = float(inside.mean()), float(inside.std())
    z = (x - mean) / (std if std > 0 else 1.0)
    return ((np.clip(z, -_ZSCORE_RANGE, _ZSCORE_RANGE) + _ZSCORE_RANGE) / (2 * _ZSCORE_RANGE)).astype(np.float32)


def normalise_channels(arrays: Sequence[np.ndarray], channels: Sequence[Channel]) -> np.ndarray:
    """``(Z, H, W)`` arrays, one per channel, -> ``(Z, C, H, W)`` float32 normalised input.

    Raises:
        InputError: a different number of arrays and channels, or arrays of different shapes.
    """
    check_channel_count(len(arrays), channels, "the case")
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"the channels have different shapes {sorted(shapes)}; resample them onto one grid "
                         "(co_register) first")
    return np.stack([normalise(a, c) for a, c in zip(arrays, channels, strict=True)], axis=1)


def check_channel_count(count: int, channels: Sequence[Channel], what: str) -> None:
    """Refuse ``what`` when it has ``count`` volumes for the ``channels`` expected (names them in order)."""
    if count != len(channels):
        names = ", ".join(c.name for c in channels)
        raise InputError(f"{what} has {count} volume(s) but the model takes {len(channels)} channel(s) ({names}), "
                         "in that order; give one co-registered volume per channel")


def _extent(image: sitk.Image) -> np.ndarray:
    """The physical bounding box (2 x 3, mm) of an image's voxel centres."""
    size = np.array(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
               for corner in np.array(np.meshgrid(*[[0, s - 1] for s in size])).T.reshape(-1, 3)]
    corners = np.array(corners)
    return np.stack([corners.min(0), corners.max(0)])


def co_register(images: Sequence[sitk.Image], names: Sequence[str], *,
                tolerance_mm: float | None = None) -> tuple[list[sitk.Image], list[str]]:
    """Resample every channel onto the first one's grid (linear; voxels outside a channel get its minimum).

    The volumes must already be registered (same patient position, same frame of reference): this only
    changes the grid. A channel whose physical extent differs from the first one's by more than
    ``tolerance_mm`` (default: one voxel of the first channel) gets a warning, since its missing parts are padded.

    Returns:
        The images on the first one's grid (the first unchanged), and the warnings.
    """
    import SimpleITK as sitk

    from separeg.io.volumes import Geometry

    reference = images[0]
    tolerance = tolerance_mm if tolerance_mm is not None else float(max(reference.GetSpacing()))
    ref_extent = _extent(reference)
    out, warnings = [reference], []
    for image, name in zip(images[1:], names[1:], strict=True):
        if Geometry.of(image).matches(Geometry.of(reference)):
            out.append(image)
            continue
        gap = float(np.abs(_extent(image) - ref_extent).max())
        if gap > tolerance:
            warnings.append(f"channel {name} covers a different physical extent than {names[0]} (up to {gap:.1f} mm "
                            f"apart); it is resampled onto {names[0]}'s grid and padded where it has no data. "
                            "Check that the volumes are co-registered")
        minimum = float(sitk.GetArrayViewFromImage(image).min())
        out.append(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, minimum, sitk.sitkFloat32))
    return out, warnings
