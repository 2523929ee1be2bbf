"""The region set of an archive: every kept region of every volume, cut in batches on one device.

Volumes with the same slice size share one :class:`RegionCropper` (slices stacked), so a batch costs
one gather per slice size, not one per volume. Intensities are stored as uint8 grey levels (a quarter
of float32's memory) and only slices that hold regions are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from separeg.sis.crops import RegionCropper
from separeg.sis.regions import RegionMaps, to_uint8

__all__ = ["VolumeRegions", "RegionSet", "compact", "concat_maps"]


@dataclass
class VolumeRegions:
    """One volume's intensities and its region maps, with a name for reports.

    ``hu`` is the ``(Z, H, W)`` CT in HU, or ``(Z, C, H, W)`` normalised channels in [0, 1] for a multichannel case.
    """

    name: str
    hu: np.ndarray
    maps: RegionMaps


def compact(hu: np.ndarray, maps: RegionMaps) -> tuple[np.ndarray, RegionMaps]:
    """Drop the slices without regions. Returns the kept HU slices and maps renumbered to them."""
    keep = np.flatnonzero(maps.regions_per_slice())
    new_index = np.full(maps.labels.shape[0], -1, np.int64)
    new_index[keep] = np.arange(len(keep))
    return hu[keep], RegionMaps(labels=maps.labels[keep], slice_index=new_index[maps.slice_index].astype(np.int32),
                                label=maps.label, boxes=maps.boxes, n_pixels=maps.n_pixels, mean_hu=maps.mean_hu,
                                body_area=maps.body_area[keep], volume_hash=maps.volume_hash,
                                config_key=maps.config_key)


def concat_maps(parts: Sequence[RegionMaps]) -> RegionMaps:
    """Stack region maps of volumes with the same slice size along the slice axis."""
    offsets = np.cumsum([0] + [p.labels.shape[0] for p in parts[:-1]])
    return RegionMaps(
        labels=np.concatenate([p.labels for p in parts]),
        slice_index=np.concatenate([p.slice_index + o for p, o in zip(parts, offsets, strict=True)]).astype(np.int32),
        label=np.concatenate([p.label for p in parts]),
        boxes=np.concatenate([p.boxes for p in parts]),
        n_pixels=np.concatenate([p.n_pixels for p in parts]),
        mean_hu=np.concatenate([p.mean_hu for p in parts]),
        body_area=np.concatenate([p.body_area for p in parts]),
    )


class RegionSet:
    """All regions of a list of volumes; region ``i`` is addressed globally in volume order.

    Args:
        volumes: the volumes and their maps.
        window: HU window of the intensities.
        crop_size: side of the crops.
        device: where slices, label maps and crops live.
        min_window: smallest square a region is cut from (:class:`RegionCropper`; 0: its box).
    """

    def __init__(self, volumes: Sequence[VolumeRegions], window: tuple[float, float], crop_size: int,
                 device: torch.device | str = "cpu", min_window: int = 0) -> None:
        self.crop_size = crop_size
        self.device = torch.device(device)
        self.names = [v.name for v in volumes]
        self.volume_of_region = np.concatenate([np.full(len(v.maps), i) for i, v in enumerate(volumes)]
                                               ) if volumes else np.zeros(0, np.int64)
        self.mean_hu = np.concatenate([v.maps.mean_hu for v in volumes]) if volumes else np.zeros(0, np.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, v in enumerate(volumes):
            groups.setdefault(v.hu.shape[1:], []).append(i)
        self._croppers: list[RegionCropper] = []
        # Global region index -> (cropper, local index), built in volume order.
        owner = np.zeros(len(self.volume_of_region), np.int64)
        local = np.zeros(len(self.volume_of_region), np.int64)
        starts = np.cumsum([0] + [len(v.maps) for v in volumes])
        for group, members in enumerate(groups.values()):
            parts = [compact(volumes[i].hu, volumes[i].maps) for i in members]
            maps = concat_maps([m for _, m in parts])
            # Multichannel intensities are already normalised to [0, 1]: their window is the unit interval.
            grey = np.concatenate([to_uint8(h, window if h.ndim == 3 else (0.0, 1.0)) for h, _ in parts])
            self._croppers.append(RegionCropper(torch.from_numpy(grey), maps, crop_size, device=self.device,
                                                min_window=min_window))
            position = 0
            for i in members:
                n = len(volumes[i].maps)
                owner[starts[i]:starts[i] + n] = group
                local[starts[i]:starts[i] + n] = np.arange(position, position + n)
                position += n
        self._owner, self._local = owner, local

    def __len__(self) -> int:
        return len(self._owner)

    def crops(self, index: np.ndarray) -> torch.Tensor:
        """``(B, C, S, S)`` float32 crops of the regions ``index`` (global indices), in that order."""
        index = np.asarray(index, dtype=np.int64)
        owners = self._owner[index]
        if len(self._croppers) == 1:
            return self._croppers[0].crops(self._local[index])
        channels = self._croppers[0].channels
        out = torch.empty(len(index), channels, self.crop_size, self.crop_size, device=self.device)
        for group in np.unique(owners):
            where = np.flatnonzero(owners == group)
            out[torch.as_tensor(where, device=self.device)] = self._croppers[group].crops(self._local[index[where]])
        return out
