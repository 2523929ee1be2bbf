"""Metrics against hand-computed cases (offset cubes, anisotropic voxels), MONAI on spheres, the empty-mask policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from separeg.evaluate.metrics import (
    STATUS_MISSED,
    STATUS_NOT_IN_REFERENCE,
    STATUS_OK,
    dice,
    hausdorff,
    hd95,
    hd100,
    mean_surface_distance,
    organ_metrics,
    surface_distances,
    surface_voxels,
    volume_difference_percent,
    volume_ml,
)

SPACING = (0.5, 1.0, 3.0)  # (sx, sy, sz) mm, SimpleITK order; array axes are (z, y, x)
SIDE = 10
SHELL = SIDE**3 - (SIDE - 2) ** 3  # surface voxels of a 10-voxel cube (6-connected erosion): 488


def cube(shape=(24, 24, 32), corner=(4, 4, 4), side=SIDE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    z, y, x = corner
    mask[z:z + side, y:y + side, x:x + side] = True
    return mask


def sphere(shape, centre, radius_mm, sampling=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre`` (array index units); sampling in array order."""
    grid = np.indices(shape, dtype=float)
    return sum(((grid[i] - centre[i]) * sampling[i]) ** 2 for i in range(3)) <= radius_mm**2


# ------------------------------------------------------------------------------------------- hand-computed cubes


@pytest.mark.parametrize("axis, voxel_mm", [(2, 0.5), (1, 1.0), (0, 3.0)])  # x, y, z of SPACING
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_offset_cubes(axis: int, voxel_mm: float, k: int):
    """Two 10-voxel cubes, the prediction shifted by k voxels along one axis.

    DSC = 2 * 10*10*(10-k) / 2000 = 1 - k/10. The prediction's far face (100 voxels) lies k voxels beyond the
    reference's face on the same plane family, so its distance is exactly k * voxel_mm; every other surface voxel is
    a translate of a reference surface voxel, so no distance exceeds the shift: HD100 = k * voxel_mm. Those 100
    voxels are 20.5 % of the 488 surface voxels in each direction (ranks 388..487; the 95th percentile sits at rank
    0.95 * 487 = 462.65), so HD95 equals HD100 in both conventions.
    """
    ref = cube()
    corner = [4, 4, 4]
    corner[axis] += k
    pred = cube(corner=tuple(corner))
    assert dice(pred, ref) == pytest.approx(1 - k / 10, abs=1e-12)
    assert hd100(pred, ref, SPACING) == pytest.approx(k * voxel_mm, abs=1e-9)
    assert hd95(pred, ref, SPACING) == pytest.approx(k * voxel_mm, abs=1e-9)
    assert hd95(pred, ref, SPACING, pooling="union") == pytest.approx(k * voxel_mm, abs=1e-9)
    d_pred, d_ref = surface_distances(pred, ref, SPACING)
    assert len(d_pred) == len(d_ref) == SHELL
    assert np.allclose(np.sort(d_pred)[-100:], k * voxel_mm) and np.allclose(np.sort(d_ref)[-100:], k * voxel_mm)


def test_offset_cube_mean_surface_distance():
    """k = 1 along x (0.5 mm): per direction, the far face (100 voxels) and the 8x8 interior of the near face
    (ref voxels inside the other cube, 0.5 mm from its x face) are 0.5 mm off; the other 324 lie on both surfaces."""
    ref, pred = cube(), cube(corner=(4, 4, 5))
    d_pred, d_ref = surface_distances(pred, ref, SPACING)
    for d in (d_pred, d_ref):
        assert np.count_nonzero(d) == 164 and set(np.round(d, 9)) == {0.0, 0.5}
    assert mean_surface_distance(pred, ref, SPACING) == pytest.approx(0.5 * 164 / SHELL)


def test_identical_masks():
    mask = cube()
    assert dice(mask, mask) == 1.0
    assert hd95(mask, mask, SPACING) == 0.0 and hd100(mask, mask, SPACING) == 0.0
    assert mean_surface_distance(mask, mask, SPACING) == 0.0


def test_surface_voxels_six_connected_and_array_border():
    assert surface_voxels(cube()).sum() == SHELL
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert surface_voxels(single).sum() == 1
    full = np.ones((4, 5, 6), bool)  # outside the array is background: the whole outer layer is surface
    assert surface_voxels(full).sum() == full.size - 2 * 3 * 4
    # 6-connectivity: a voxel whose only outside neighbour is diagonal is interior
    notch = np.ones((5, 5, 5), bool)
    notch[0, 0, 0] = False
    assert not surface_voxels(notch)[1, 1, 1]


def test_spacing_is_simpleitk_order():
    """(sx, sy, sz): a 2-voxel shift along the array's last axis (x) is measured with sx."""
    ref, pred = cube(), cube(corner=(4, 4, 6))
    assert hd100(pred, ref, (0.7, 1.0, 5.0)) == pytest.approx(1.4)
    assert hd100(pred, ref, (5.0, 1.0, 0.7)) == pytest.approx(10.0)


def test_volumes_anisotropic():
    ref = cube()
    assert volume_ml(ref, SPACING) == pytest.approx(1000 * 0.5 * 1.0 * 3.0 / 1000)  # 1.5 ml
    longer = ref.copy()
    longer[4:16, 4:14, 4:14] = True  # 12 slices instead of 10
    assert volume_ml(longer, SPACING) == pytest.approx(1.8)
    assert volume_difference_percent(longer, ref, SPACING) == pytest.approx(20.0)
    assert volume_difference_percent(np.zeros_like(ref), ref, SPACING) == -100.0


# ------------------------------------------------------------------------------------------------- MONAI, spheres


def _monai_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[float, float, float]:
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    def tensor(a):
        return torch.from_numpy(a[None, None].astype(np.float32))

    sampling = tuple(spacing[::-1])  # MONAI takes the spacing in array-axis order
    kwargs = {"include_background": True, "spacing": sampling}
    h95 = compute_hausdorff_distance(tensor(pred), tensor(ref), percentile=95, **kwargs).item()
    h100 = compute_hausdorff_distance(tensor(pred), tensor(ref), **kwargs).item()
    assd = compute_average_surface_distance(tensor(pred), tensor(ref), symmetric=True, **kwargs).item()
    return h95, h100, assd


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI warns about its own internal argument
def test_concentric_spheres_match_monai():
    """Radius 10 and 12 voxels at 1 mm: the surfaces are about 2 mm apart."""
    shape, centre = (32, 32, 32), (15.5, 15.5, 15.5)
    ref, pred = sphere(shape, centre, 10), sphere(shape, centre, 12)
    ours = hd95(pred, ref, (1, 1, 1))
    h95, h100, assd = _monai_distances(pred, ref, (1, 1, 1))
    assert abs(ours - 2.0) <= 1.0  # within a voxel of the analytic value (2.236 with voxelised surfaces)
    assert ours == pytest.approx(h95, abs=1e-4)  # same convention as MONAI: the same number
    assert hd100(pred, ref, (1, 1, 1)) == pytest.approx(h100, abs=1e-4)
    assert mean_surface_distance(pred, ref, (1, 1, 1)) == pytest.approx(assd, abs=1e-4)
    assert abs(hd95(pred, ref, (1, 1, 1), pooling="union") - h95) <= 1.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_offset_spheres_anisotropic_match_monai():
    spacing = (0.8, 0.8, 2.5)  # (sx, sy, sz)
    sampling = spacing[::-1]
    shape = (24, 56, 64)
    ref = sphere(shape, (12, 28, 32), 8.0, sampling)
    pred = sphere(shape, (12.4, 29, 30), 10.0, sampling)
    h95, h100, assd = _monai_distances(pred, ref, spacing)
    ours = hd95(pred, ref, spacing)
    assert ours == pytest.approx(h95, abs=1e-4)
    assert hd100(pred, ref, spacing) == pytest.approx(h100, abs=1e-4)
    assert mean_surface_distance(pred, ref, spacing) == pytest.approx(assd, abs=1e-4)
    union = hd95(pred, ref, spacing, pooling="union")
    assert union <= ours + 1e-12 and abs(union - h95) <= max(spacing)


# ----------------------------------------------------------------------------------------------- empty masks


def test_pure_functions_on_empty_masks():
    empty, mask = np.zeros((8, 8, 8), bool), cube((8, 8, 8), (2, 2, 2), 3)
    assert math.isnan(dice(empty, empty))  # 0/0 by rule; organ_metrics never reports it
    assert dice(empty, mask) == 0.0 and dice(mask, empty) == 0.0
    for pred, ref in ((empty, mask), (mask, empty), (empty, empty)):
        with pytest.raises(ValueError, match="empty"):
            hd95(pred, ref, SPACING)
    with pytest.raises(ValueError, match="reference mask is empty"):
        volume_difference_percent(mask, empty, SPACING)


def test_bad_arguments():
    a = cube()
    with pytest.raises(ValueError, match="same shape"):
        dice(a, a[:-1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="pooling"):
        hausdorff(a, a, SPACING, 95, pooling="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integers"):
        organ_metrics(a.astype(float), a.astype(float), SPACING, {1: "a"})


def _no_nan(result) -> bool:
    values = [result.dsc, result.hd95_mm, result.hd100_mm, result.msd_mm, result.volume_ref_ml,
              result.volume_pred_ml, result.volume_diff_percent]
    return all(v is None or math.isfinite(v) for v in values)


def test_organ_metrics_empty_mask_policy():
    shape = (20, 24, 24)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[cube(shape, (2, 2, 2), 6)] = 1
    pred[cube(shape, (2, 2, 3), 6)] = 1  # 1: shifted one voxel along x
    ref[cube(shape, (10, 12, 12), 5)] = 2  # 2: missed by the prediction
    pred[cube(shape, (12, 2, 14), 4)] = 3  # 3: predicted, not in the reference
    labels = {0: "background", 1: "Brainstem", 2: "SpinalCord", 3: "Larynx", 4: "Esophagus"}  # 4: in neither
    results = organ_metrics(pred, ref, SPACING, labels, case="pt")
    by_organ = {r.organ: r for r in results}
    assert [r.organ for r in results] == [1, 2, 3, 4] and all(r.case == "pt" for r in results)
    assert all(_no_nan(r) for r in results)

    ok = by_organ[1]
    assert ok.status == STATUS_OK and ok.name == "Brainstem"
    assert ok.dsc == pytest.approx(1 - 1 / 6) and ok.hd95_mm == pytest.approx(0.5) and ok.hd100_mm == 0.5
    assert ok.volume_diff_percent == 0.0 and ok.volume_ref_ml == pytest.approx(216 * 1.5 / 1000)

    missed = by_organ[2]
    assert missed.status == STATUS_MISSED
    assert missed.dsc == 0.0 and missed.hd95_mm is None and missed.hd100_mm is None and missed.msd_mm is None
    assert missed.volume_diff_percent == -100.0 and missed.volume_pred_ml == 0.0
    assert missed.volume_ref_ml == pytest.approx(125 * 1.5 / 1000)

    extra = by_organ[3]
    assert extra.status == STATUS_NOT_IN_REFERENCE and extra.dsc is None and extra.hd95_mm is None
    assert extra.volume_pred_ml == pytest.approx(64 * 1.5 / 1000) and extra.volume_diff_percent is None

    neither = by_organ[4]  # both empty: not in the reference, never a NaN DSC
    assert neither.status == STATUS_NOT_IN_REFERENCE and neither.dsc is None
    assert neither.volume_ref_ml == neither.volume_pred_ml == 0.0


def test_organ_metrics_equal_whole_array_metrics():
    """The per-organ crop changes nothing, also for organs touching the array border; spacing is anisotropic."""
    rng = np.random.default_rng(0)
    shape = (16, 30, 34)
    ref = np.zeros(shape, np.int16)
    ref[0:7, 3:20, 0:15] = 1  # touches three array faces
    ref[sphere(shape, (9, 15, 24), 5.0)] = 2
    pred = ref.copy()
    pred[5:9, 10:25, 2:12] = 1
    noise = rng.random(shape) < 0.01
    pred[noise & (ref == 0)] = 2  # scattered false positives far from organ 2: a long tail
    results = {r.organ: r for r in organ_metrics(pred, ref, SPACING, {1: "a", 2: "b"})}
    for value in (1, 2):
        p, r = pred == value, ref == value
        assert results[value].dsc == pytest.approx(dice(p, r))
        assert results[value].hd95_mm == pytest.approx(hd95(p, r, SPACING))
        assert results[value].hd100_mm == pytest.approx(hd100(p, r, SPACING))
        assert results[value].msd_mm == pytest.approx(mean_surface_distance(p, r, SPACING))
        assert results[value].volume_diff_percent == pytest.approx(volume_difference_percent(p, r, SPACING))
    assert results[2].hd100_mm > results[2].hd95_mm > 0
