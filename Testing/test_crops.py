from __future__ import annotations

import numpy as np
import torch

from separeg.sis.crops import RegionCropper, naive_crops
from separeg.sis.regions import RegionMaps, SISConfig, compute_region_maps, window_hu


def test_crops_match_the_per_region_loop(pt1_hu: np.ndarray) -> None:
    pt1_maps = compute_region_maps(pt1_hu[40:80], SISConfig())
    image = window_hu(pt1_hu[40:80], (-1000, 1000))
    cropper = RegionCropper(image, pt1_maps, crop_size=64)
    index = np.random.default_rng(0).choice(len(pt1_maps), 48, replace=False)
    fast = cropper.crops(torch.as_tensor(index))
    slow = naive_crops(image, pt1_maps, index, crop_size=64)
    assert fast.shape == (48, 1, 64, 64) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_crops_at_the_slice_border_and_zero_outside_the_region() -> None:
    labels = np.zeros((2, 40, 50), np.uint16)
    labels[0, 0:10, 30:50] = 1  # touches the top and right border: its square leaves the slice
    labels[1, 5:35, 20:26] = 1  # tall and thin: padded left and right
    labels[1, 5:35, 26:40] = 2
    maps = RegionMaps(labels=labels, slice_index=np.array([0, 1, 1], np.int32), label=np.array([1, 1, 2], np.int32),
                      boxes=np.array([[0, 9, 30, 49], [5, 34, 20, 25], [5, 34, 26, 39]], np.int32),
                      n_pixels=np.array([200, 180, 420], np.int32), mean_hu=np.zeros(3, np.float32),
                      body_area=np.array([200, 600], np.int32))
    image = np.random.default_rng(1).random((2, 40, 50)).astype(np.float32) + 1.0
    crops = RegionCropper(image, maps, crop_size=40).crops(np.arange(3))
    torch.testing.assert_close(crops, naive_crops(image, maps, np.arange(3), crop_size=40), atol=1e-5, rtol=0)
    thin = crops[1, 0]
    assert thin[:, :12].abs().max() == 0 and thin[:, -12:].abs().max() == 0  # padding and the neighbour are zero
    assert (thin[2:-2, 18:22] > 0.9).all()  # the region itself keeps its intensities




def test_large_batches_are_cut_in_groups_and_keep_their_order(pt1_hu: np.ndarray) -> None:
    maps = compute_region_maps(pt1_hu[40:80], SISConfig())
    grey = np.round(window_hu(pt1_hu[40:80], (-1000, 1000)) * 255).astype(np.uint8)
    index = np.random.default_rng(3).integers(0, len(maps), 100)  # repeats allowed, several groups
    crops = RegionCropper(torch.from_numpy(grey), maps, crop_size=32).crops(index)
    expected = naive_crops(grey.astype(np.float32) / 255.0, maps, index, crop_size=32)
    torch.testing.assert_close(crops, expected, atol=1e-5, rtol=0)


def test_a_minimum_window_bounds_the_magnification(pt1_hu: np.ndarray) -> None:
    """max_magnification (issue 22): a small region sits in a zero square of at least ``min_window`` pixels, so it
    is enlarged at most crop_size / min_window times; the batched cropper still equals the per-region loop."""
    maps = compute_region_maps(pt1_hu[50:60], SISConfig())
    image = window_hu(pt1_hu[50:60], (-1000, 1000))
    index = np.random.default_rng(2).choice(len(maps), 24, replace=False)
    bounded = RegionCropper(image, maps, crop_size=64, min_window=32).crops(index)
    torch.testing.assert_close(bounded, naive_crops(image, maps, index, crop_size=64, min_window=32), atol=1e-5, rtol=0)
    sides = np.maximum(maps.boxes[index, 1] - maps.boxes[index, 0], maps.boxes[index, 3] - maps.boxes[index, 2]) + 1
    small = int(np.argmin(sides))
    assert sides[small] < 32
    filled = RegionCropper(image, maps, crop_size=64).crops(index)
    # The region covers less of the bounded crop (side / 32 of it), the same share of the unbounded one.
    assert (bounded[small] > 0).float().mean() < (filled[small] > 0).float().mean()
    assert (bounded[small, 0, :, :8] == 0).all() or (bounded[small, 0, :8] == 0).all()
