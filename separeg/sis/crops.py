"""Region crops in batches (paper, SIS: box, zero outside the region, pad to a square, resize to 128 x 128).

:class:`RegionCropper` cuts a whole batch on the training device without a Python loop over regions;
:func:`naive_crops` is the one-region-at-a-time reference it must equal (tests, benchmarks).
"""

from __future__ import annotations

import numpy as np
import torch

from separeg.runtime.errors import InputError
from separeg.sis.regions import RegionMaps

__all__ = ["RegionCropper", "naive_crops", "region_square"]


class RegionCropper:
    """Batched region crops from slices and label maps kept on one device.

    A crop is the region's square window (box padded symmetrically to its longer side), pixels outside
    the region zeroed, resized bilinearly (``align_corners=False``, as ``F.interpolate``) to
    ``crop_size``. The resize is separable, so a batch is two batched matrix products with sparse
    interpolation matrices; windows are gathered through one strided view. No Python loop over regions.

    Args:
        image: ``(Z, H, W)`` or, with C input channels, ``(Z, C, H, W)`` normalised intensities: float in
            [0, 1], or uint8 grey levels (a quarter of the memory; scaled to [0, 1] after the gather).
        maps: the volume's region maps.
        crop_size: output side.
        device: where slices, labels and the table live (default: ``image``'s device).
        min_window: smallest square side (pixels) a region is cut from: a smaller region sits in the middle of a
            zero square of this side, so that it is magnified at most ``crop_size / min_window`` times (0: every
            region's square is its box, as the paper).
    """

    def __init__(self, image: torch.Tensor | np.ndarray, maps: RegionMaps, crop_size: int = 128,
                 device: torch.device | str | None = None, min_window: int = 0) -> None:
        image = torch.as_tensor(image)
        if image.dim() == 3:  # one channel
            image = image[:, None]
        if image.dim() != 4 or (image.shape[0], *image.shape[2:]) != maps.labels.shape:
            raise InputError(f"image shape {tuple(image.shape)} does not match label maps {maps.labels.shape}")
        device = torch.device(device) if device is not None else image.device
        self.crop_size = crop_size
        self.image = image.to(device=device) if image.dtype == torch.uint8 else image.to(device, torch.float32)
        self.labels = torch.from_numpy(maps.labels.astype(np.int16)).to(device)
        _, height, width = maps.labels.shape
        boxes = maps.boxes.astype(np.int64)
        h = boxes[:, 1] - boxes[:, 0] + 1
        w = boxes[:, 3] - boxes[:, 2] + 1
        side = np.maximum(np.maximum(h, w), min_window)
        # Host copies decide the window size per batch without a device sync.
        self._side = side
        self._square_y0 = boxes[:, 0] - (side - h) // 2
        self._square_x0 = boxes[:, 2] - (side - w) // 2
        as_tensor = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        self.slice_index = as_tensor(maps.slice_index.astype(np.int64))
        self.label = as_tensor(maps.label.astype(np.int16))
        self.side = as_tensor(side)
        self.square_y0 = as_tensor(self._square_y0)
        self.square_x0 = as_tensor(self._square_x0)
        self.height, self.width = height, width
        self.channels = int(image.shape[1])

    def __len__(self) -> int:
        return len(self._side)

    @property
    def device(self) -> torch.device:
        return self.image.device

    def crops(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Crops of the regions ``index`` (``(B,)`` ints): ``(B, C, crop_size, crop_size)`` float32.

        The cost of a group grows with its largest window squared, so batches with large windows (clinical
        512 x 512 slices) are sorted by size and cut in groups of similar windows; small windows, and GPUs,
        where a launch costs more than the arithmetic, take the batch in one group.
        """
        index_np = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        group = 256 if self.device.type == "cuda" else 8
        if len(index_np) <= group or self._side[index_np].max(initial=0) <= self.crop_size // 2:
            return self._crops(index_np)
        order = np.argsort(self._side[index_np], kind="stable")
        out = torch.empty(len(index_np), self.channels, self.crop_size, self.crop_size, device=self.device)
        for start in range(0, len(order), group):
            members = order[start:start + group]
            out[torch.as_tensor(members, device=self.device)] = self._crops(index_np[members])
        return out

    def _crops(self, index_np: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(index_np, device=self.device)
        # One window side for the group: its largest square, bounded by the slice.
        window = int(min(self._side[index_np].max(initial=1), self.height, self.width))
        win_y0 = (self.square_y0[idx]).clamp(0, self.height - window)
        win_x0 = (self.square_x0[idx]).clamp(0, self.width - window)
        k = self.slice_index[idx]
        # (B, C, window, window): unfold gives (Z, C, Y, X, window, window), indexed per region.
        image_windows = self.image.unfold(2, window, 1).unfold(3, window, 1)[k, :, win_y0, win_x0]
        label_windows = self.labels.unfold(1, window, 1).unfold(2, window, 1)[k, win_y0, win_x0]
        image_windows = image_windows.to(torch.float32)
        if self.image.dtype == torch.uint8:
            image_windows = image_windows / 255.0
        image_windows = image_windows * (label_windows == self.label[idx, None, None])[:, None]
        side = self.side[idx]
        rows = self._interpolation_matrix(side, self.square_y0[idx] - win_y0, window)
        cols = self._interpolation_matrix(side, self.square_x0[idx] - win_x0, window)
        if self.channels == 1:
            return torch.bmm(torch.bmm(rows, image_windows[:, 0]), cols.transpose(1, 2)).unsqueeze(1)
        return rows[:, None] @ image_windows @ cols.transpose(1, 2)[:, None]

    def _interpolation_matrix(self, side: torch.Tensor, offset: torch.Tensor, window: int) -> torch.Tensor:
        """``(B, crop_size, window)`` bilinear weights: output pixel j of a square of ``side`` pixels starting at
        ``offset`` in the window. Same source index rule as ``F.interpolate(..., align_corners=False)``."""
        size = self.crop_size
        j = torch.arange(size, device=self.device, dtype=torch.float32)
        scale = side.to(torch.float32)[:, None] / size
        src = ((j[None, :] + 0.5) * scale - 0.5).clamp(min=0.0)
        i0 = src.floor().to(torch.int64)
        lam = src - i0
        i1 = torch.minimum(i0 + 1, side[:, None] - 1)
        weights = torch.zeros(len(side), size, window + 2, device=self.device)
        # Square pixels outside the window lie outside the slice (zero padding): park them in two spare
        # columns that are cut off afterwards.
        for idx, w in ((i0, 1.0 - lam), (i1, lam)):
            pos = idx + offset[:, None]
            pos = torch.where((pos >= 0) & (pos < window), pos, torch.full_like(pos, window))
            weights.scatter_add_(2, pos[..., None], w[..., None])
        return weights[:, :, :window]


def region_square(image: np.ndarray, maps: RegionMaps, i: int, min_window: int = 0) -> np.ndarray:
    """Region ``i`` cut out the simple way: its box, zero outside the region, padded to a centred square of at
    least ``min_window`` pixels."""
    y0, y1, x0, x1 = maps.boxes[i]
    k = maps.slice_index[i]
    crop = image[k, y0:y1 + 1, x0:x1 + 1] * (maps.labels[k, y0:y1 + 1, x0:x1 + 1] == maps.label[i])
    h, w = crop.shape
    side = max(h, w, min_window)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(crop, ((top, side - h - top), (left, side - w - left)))


def naive_crops(image: np.ndarray, maps: RegionMaps, index: np.ndarray, crop_size: int = 128,
                min_window: int = 0) -> torch.Tensor:
    """Reference implementation, one region at a time: :func:`region_square`, then ``F.interpolate``.

    Used by tests (the batched cropper must agree with it) and as the benchmarks' naive baseline.
    """
    import torch.nn.functional as F

    out = []
    for i in np.asarray(index):
        square = region_square(image, maps, i, min_window)
        tensor = torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32))[None, None]
        out.append(F.interpolate(tensor, size=(crop_size, crop_size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)
