from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.segmentation import slic

from separeg.runtime.errors import InputError
from separeg.runtime.events import Events, EventType, ListSink
from separeg.sis.job import organ_coverage
from separeg.sis.regions import (
    RegionMaps,
    SISConfig,
    body_mask,
    compute_region_maps,
    load_or_compute,
    slic_slice,
    to_uint8,
)


@pytest.fixture(scope="module")
def pt1_maps(pt1_hu: np.ndarray) -> RegionMaps:
    return compute_region_maps(pt1_hu, SISConfig())


def test_slic_matches_scikit_image_on_rgb_slices(pt1_hu: np.ndarray, lung1: Path) -> None:
    lung = sitk.ReadImage(sorted(str(p) for p in (lung1 / "ct").glob("*.dcm"))[60:63])
    slices = [to_uint8(pt1_hu, (-1000, 1000))[k] for k in (40, 60, 80)]
    slices += list(to_uint8(sitk.GetArrayFromImage(lung), (-1000, 1000)))
    slices.append(slices[1][30:90, 40:100])  # a body box, not a whole slice
    config = SISConfig()
    for grey in slices:
        reference = slic(np.repeat(grey[..., None], 3, axis=2), n_segments=32, compactness=15, sigma=0.8, start_label=1)
        np.testing.assert_array_equal(slic_slice(grey, config), reference)


def test_body_mask_fills_airways_and_drops_air(pt1_hu: np.ndarray) -> None:
    body = body_mask(pt1_hu)
    assert not body[:, 0, :].any() and not body[:, :, 0].any()  # the field-of-view border is air
    inside_air = (pt1_hu < -500) & body
    assert inside_air.sum() > 0  # airway and sinuses are enclosed, so filled in
    assert (pt1_hu[body] > -500).mean() > 0.9


def test_region_table_is_consistent(pt1_hu: np.ndarray, pt1_maps: RegionMaps) -> None:
    maps = pt1_maps
    per_slice = maps.regions_per_slice()
    for k in np.flatnonzero(per_slice):
        values = np.unique(maps.labels[k])
        np.testing.assert_array_equal(values[1:], np.arange(1, per_slice[k] + 1))  # no region lost or doubled
    for i in range(0, len(maps), 7):
        k, value = maps.slice_index[i], maps.label[i]
        y0, y1, x0, x1 = maps.boxes[i]
        mask = maps.labels[k] == value
        assert mask.sum() == maps.n_pixels[i]
        inside = mask[y0:y1 + 1, x0:x1 + 1]
        assert inside.sum() == mask.sum()  # the inclusive box holds the whole region ...
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # ... tightly
        assert maps.mean_hu[i] == pytest.approx(pt1_hu[k][mask].mean(), abs=0.01)


def test_regions_per_slice_and_organ_coverage_on_openkbp(openkbp: Path, pt1_maps: RegionMaps) -> None:
    body_slices = pt1_maps.body_slices()
    counts = pt1_maps.regions_per_slice()[body_slices]
    assert 6 <= counts.mean() <= 32 and counts.min() >= 1
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp / "pt_1_oar.nii.gz")))
    coverage = organ_coverage(pt1_maps, reference)
    assert set(coverage) == {1, 2, 3, 4, 7}  # Brainstem, SpinalCord, Parotids, Mandible
    assert min(coverage.values()) > 0.95


def test_whole_slice_extent_wastes_segments_on_air(pt1_hu: np.ndarray, pt1_maps: RegionMaps) -> None:
    whole = compute_region_maps(pt1_hu[50:70], SISConfig(extent="slice"))
    body_box = pt1_maps.regions_per_slice()[50:70]
    assert whole.regions_per_slice().mean() < body_box.mean() / 2


def test_regular_grid_mode(pt1_hu: np.ndarray) -> None:
    maps = compute_region_maps(pt1_hu[55:58], SISConfig(mode="regular", n_segments=16))
    y0, y1, x0, x1 = maps.boxes.T
    sides = np.maximum(y1 - y0 + 1, x1 - x0 + 1)
    assert np.median(sides) == pytest.approx(np.median(sides[sides == sides.max()]), abs=1)  # squares of one size
    assert len(maps) >= 3


def test_cache_round_trip_and_recovery(pt1_hu: np.ndarray, tmp_path: Path) -> None:
    hu = pt1_hu[50:60]
    sink = ListSink()
    maps, cached = load_or_compute(hu, "abc123", SISConfig(), tmp_path, events=Events(sink))
    assert not cached
    again, cached = load_or_compute(hu, "abc123", SISConfig(), tmp_path)
    assert cached and np.array_equal(again.labels, maps.labels) and np.array_equal(again.boxes, maps.boxes)
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    recovered, cached = load_or_compute(hu, "abc123", SISConfig(), tmp_path, events=Events(sink))
    assert not cached and np.array_equal(recovered.labels, maps.labels)
    assert any("unreadable" in (e.msg or "") for e in sink.of_type(EventType.LOG))
    _, cached = load_or_compute(hu, "abc123", SISConfig(n_segments=16), tmp_path)
    assert not cached and len(list(tmp_path.glob("*.npz"))) == 2  # another configuration, another file
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_bad_inputs_and_configs() -> None:
    with pytest.raises(InputError, match="NaN"):
        compute_region_maps(np.full((3, 8, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="expected a \\(Z, H, W\\)"):
        compute_region_maps(np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match="unknown separation mode"):
        SISConfig(mode="voronoi")
    with pytest.raises(InputError, match="low < high"):
        SISConfig(hu_window=(1000, -1000))


def test_all_air_volume_has_no_regions() -> None:
    maps = compute_region_maps(np.full((4, 32, 32), -1000, np.int16))
    assert len(maps) == 0 and maps.labels.max() == 0


def test_a_volume_stored_sagittally_is_separated_on_its_axial_slices(openkbp: Path, tmp_path: Path) -> None:
    from separeg.sis.job import separate_image

    image = sitk.ReadImage(str(openkbp / "pt_1_ct.nii.gz"))[:, :, 40:56]  # 16 axial slices keep it quick
    sagittal = sitk.DICOMOrient(image, "ASL")  # the same scan, another axis order in the file
    assert sitk.GetArrayViewFromImage(sagittal).shape != sitk.GetArrayViewFromImage(image).shape
    hu, maps, _ = separate_image(image, SISConfig(), tmp_path / "a")
    hu_sagittal, maps_sagittal, cached = separate_image(sagittal, SISConfig(), tmp_path / "b")
    np.testing.assert_array_equal(hu_sagittal, hu)
    np.testing.assert_array_equal(maps_sagittal.labels, maps.labels)
    assert maps_sagittal.volume_hash == maps.volume_hash and not cached  # the same cache key for the same scan
