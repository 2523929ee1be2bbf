"""Registration for multi-atlas contouring: body masks, a coarse registration grid, then affine and B-spline (Mattes
mutual information, multi-resolution) of each atlas CT onto the CT to contour."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from separeg.runtime.errors import InputError

__all__ = ["RegistrationConfig", "RegistrationError", "register"]

log = logging.getLogger(__name__)


class RegistrationError(InputError):
    """The two CTs could not be registered (ITK: no overlap left after the initial alignment)."""


BODY_HU = -500.0
BONE_HU = 200.0


@dataclass(frozen=True)
class RegistrationConfig:
    """Atlas-to-target registration settings (see the module docstring for the reasons)."""

    hu_window: tuple[float, float] = (-1000.0, 1500.0)
    grid_mm: float = 4.0  # images finer than this are registered on a coarser copy
    search_mm: tuple[float, float, float] = (16.0, 32.0, 120.0)  # exhaustive translation search, +- per axis (x, y, z)
    search_step_mm: float = 8.0
    sampling: float = 0.2  # fraction of the body's voxels the MI metric samples
    linear_iterations: int = 100
    bspline_mesh: int = 3  # control-point cells per axis; 0: affine only
    bspline_iterations: int = 20
    bspline_full_resolution: bool = False  # also a level at the registration grid itself (else only at half)
    seed: int = 1  # metric sampling seed; SimpleITK takes 0 as "seed from the clock" (runs would differ)

    def __post_init__(self) -> None:
        lo, hi = self.hu_window
        if not lo < hi:
            raise InputError(f"hu_window {self.hu_window}: the lower bound must be below the upper")
        if not 0.0 < self.sampling <= 1.0:
            raise InputError(f"sampling {self.sampling} must be in (0, 1]")
        if self.seed < 1:
            raise InputError(f"seed {self.seed} must be at least 1 (SimpleITK seeds 0 from the clock)")
        if self.bspline_mesh < 0 or self.linear_iterations < 1 or self.bspline_iterations < 1:
            raise InputError("bspline_mesh must be >= 0 and the iteration counts >= 1")


def _body(image):
    """The body: the largest connected component above -500 HU, holes filled (drops couch and air)."""
    import SimpleITK as sitk

    components = sitk.ConnectedComponent(image > BODY_HU)
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    return sitk.BinaryFillhole(largest)


def _registration_grid(image, grid_mm: float):
    """``image`` as float32, smoothed and resampled to ``grid_mm`` along axes finer than it (else as it is)."""
    import SimpleITK as sitk

    image = sitk.Cast(image, sitk.sitkFloat32)
    spacing = np.array(image.GetSpacing())
    if np.all(spacing >= 0.8 * grid_mm):
        return image
    new_spacing = np.maximum(spacing, grid_mm)
    size = np.maximum(1, np.round(np.array(image.GetSize()) * spacing / new_spacing)).astype(int)
    sigma = np.sqrt(np.maximum(new_spacing ** 2 - spacing ** 2, 0.0)) / 2.0
    smooth = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    return sitk.Resample(smooth, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         new_spacing.tolist(), image.GetDirection(), float(BODY_HU * 2), sitk.sitkFloat32)


@dataclass
class _Prepared:
    hu: object  # sitk float32 image on the registration grid
    window: object  # HU clipped to the window, outside the body at the floor
    bone: object  # float32 0/1
    body: object  # uint8 mask
    centroid: np.ndarray


def _prepare(image, config: RegistrationConfig) -> _Prepared:
    import SimpleITK as sitk

    hu = _registration_grid(image, config.grid_mm)
    body = _body(hu)
    lo, hi = config.hu_window
    window = sitk.Mask(sitk.Clamp(hu, sitk.sitkFloat32, lo, hi), body, outsideValue=lo)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body)
    if not stats.HasLabel(1):
        raise InputError("no voxel above -500 HU: is this a CT in HU?")
    return _Prepared(hu, window, sitk.Cast(hu > BONE_HU, sitk.sitkFloat32), body, np.array(stats.GetCentroid(1)))


def _method(config: RegistrationConfig, mask, shrink: list[int], smooth: list[float], sampling: float | None = None):
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    fraction = config.sampling if sampling is None else sampling
    if fraction < 1.0:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(fraction, config.seed)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _gradient_descent(method, learning_rate: float, iterations: int) -> None:
    method.SetOptimizerAsRegularStepGradientDescent(learning_rate, 1e-3, iterations, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()


def register(fixed: _Prepared, moving: _Prepared, config: RegistrationConfig):
    """The transform mapping target (fixed) points to atlas (moving) points: translation search -> similarity ->
    affine -> B-spline (see the module docstring). Returns ``(transform, final MI)``."""
    import SimpleITK as sitk

    mask = sitk.BinaryDilate(fixed.body, [2, 2, 2])
    translation = sitk.TranslationTransform(3, (moving.centroid - fixed.centroid).tolist())
    search = _method(config, mask, [4], [1.0], sampling=1.0)
    steps = [int(round(r / config.search_step_mm)) for r in config.search_mm]
    search.SetOptimizerAsExhaustive(steps, stepLength=config.search_step_mm)
    search.SetOptimizerScales([1.0, 1.0, 1.0])
    search.SetInitialTransform(translation, inPlace=True)
    _execute(search, fixed.bone, moving.bone, "translation search")

    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(fixed.centroid.tolist())
    similarity.SetTranslation(translation.GetOffset())
    linear = _method(config, mask, [4, 2], [2.0, 1.0])
    _gradient_descent(linear, 2.0, config.linear_iterations)
    linear.SetInitialTransform(similarity, inPlace=True)
    _execute(linear, fixed.window, moving.window, "similarity")

    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    linear = _method(config, mask, [4, 2], [2.0, 1.0])
    _gradient_descent(linear, 1.0, config.linear_iterations)
    linear.SetInitialTransform(affine, inPlace=True)
    _execute(linear, fixed.window, moving.window, "affine")
    metric = linear.GetMetricValue()
    if not config.bspline_mesh:
        return affine, metric
    bspline = sitk.BSplineTransformInitializer(fixed.window, [config.bspline_mesh] * 3, order=3)
    levels = ([2, 1], [1.0, 0.0]) if config.bspline_full_resolution else ([2], [1.0])
    deformable = _method(config, mask, *levels)
    deformable.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=config.bspline_iterations,
                                    maximumNumberOfCorrections=5,
                                    maximumNumberOfFunctionEvaluations=2 * config.bspline_iterations)
    deformable.SetMovingInitialTransform(affine)
    deformable.SetInitialTransform(bspline, inPlace=True)
    try:
        _execute(deformable, fixed.window, moving.window, "B-spline")
    except RegistrationError as exc:  # the affine registration stands; the deformable one found no overlap
        log.warning("%s; keeping the affine registration", exc)
        return affine, metric
    return sitk.CompositeTransform([affine, bspline]), deformable.GetMetricValue()


def _execute(method, fixed, moving, stage: str) -> None:
    """Run one registration stage; ITK's "images do not sufficiently overlap" becomes a :class:`RegistrationError`."""
    try:
        method.Execute(fixed, moving)
    except RuntimeError as exc:
        if "overlap" not in str(exc) and "outside moving image" not in str(exc):
            raise
        raise RegistrationError(f"the {stage} registration found no overlap between the two CTs (ITK: all samples "
                                "map outside the moving image): they may show different body regions") from exc
