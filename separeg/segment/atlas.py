"""`separeg atlas`: multi-atlas contouring, the classical baseline a clinic would try instead of a trained model.

Each labelled atlas case (CT + label map, the same data folders ``separeg finetune`` reads) is registered to the
target CT with SimpleITK, its organs are carried onto the target's grid, and the atlases' organs are fused:

1. **Images**: HU clipped to ``hu_window``, everything outside the body (the largest connected component above
   -500 HU, holes filled: couch and air) set to the window's floor; images finer than ``grid_mm`` are smoothed and
   resampled to it for the registration only (OpenKBP's 128³ grid is ~4 mm already).
2. **Initialisation**: body centroids aligned, then an exhaustive translation search on the bones (HU > 200) with
   Mattes MI: the OpenKBP crops start and end at different levels (some with shoulders, some without the skull),
   so the centroid alone is often 5-10 cm off and the gradient stages cannot recover.
3. **Similarity → affine → B-spline** (``bspline_mesh`` control-point cells per axis), Mattes MI sampled in the
   dilated target body, two resolution levels each (the B-spline's finest level is skipped on a coarse budget).
4. **Propagation**: one displacement field on the target's own grid per atlas; each annotated organ's mask is
   resampled with linear interpolation (a soft mask in [0, 1]).
5. **Fusion**: per organ, over the atlases that annotate it only (an organ an atlas did not contour is unknown
   there, not background): ``vote``, the mean of their soft masks; ``staple``, STAPLE's posterior
   (:func:`SimpleITK.STAPLE` per organ; the multi-label filter has no notion of an organ an atlas leaves out).
   A voxel takes the organ with the highest value at or above 0.5, else background. Then the same post-processing
   as ``separeg contour`` (largest component, hole filling).

Outputs, in OUT_DIR, as ``separeg contour``: ``segmentation.nii.gz`` in the target's exact geometry and
``segmentation.json`` (labels, names, colours, volumes, terminology; ``model`` names the atlas set), plus the seconds
the case took and per atlas.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from separeg.registry import FUSIONS
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events

__all__ = ["AtlasJob", "FUSIONS", "RegistrationConfig", "register", "run_atlas", "select_atlases"]

log = logging.getLogger(__name__)

BODY_HU = -500.0
BONE_HU = 200.0
STAPLE_ITERATIONS = 30


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


@dataclass(frozen=True)
class AtlasJob:
    volume: Path  # the target CT (NIfTI/NRRD/MHA or a DICOM series folder); the output lies on its grid
    atlases: Path  # labelled cases, as `separeg finetune` reads them (<case>_ct/<case>_oar, DICOM CT + RTSTRUCT...)
    out_dir: Path
    cases: tuple[str, ...] = ()  # which atlas cases (default: all in the folder)
    labels: Path | None = None  # label table; default: labels.json in the atlas folder
    fusion: str = "vote"
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    largest_component: bool = True
    fill_holes: bool = True
    threads: int | None = None  # SimpleITK threads (default: SimpleITK's, all cores)
    series_uid: str | None = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise InputError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")


# ------------------------------------------------------------------------------------------------- registration


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
    search.Execute(fixed.bone, moving.bone)

    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(fixed.centroid.tolist())
    similarity.SetTranslation(translation.GetOffset())
    linear = _method(config, mask, [4, 2], [2.0, 1.0])
    _gradient_descent(linear, 2.0, config.linear_iterations)
    linear.SetInitialTransform(similarity, inPlace=True)
    linear.Execute(fixed.window, moving.window)

    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    linear = _method(config, mask, [4, 2], [2.0, 1.0])
    _gradient_descent(linear, 1.0, config.linear_iterations)
    linear.SetInitialTransform(affine, inPlace=True)
    linear.Execute(fixed.window, moving.window)
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
    deformable.Execute(fixed.window, moving.window)
    return sitk.CompositeTransform([affine, bspline]), deformable.GetMetricValue()


# -------------------------------------------------------------------------------------------------------- fusion


FIELD_MM = 2.0  # the displacement field is sampled no finer than this (the transform is smooth at that scale)


def _field_grid(target):
    """A grid over the target's extent, one voxel larger on every side, no finer than :data:`FIELD_MM`: the
    displacement field interpolated on it covers every target voxel (outside its grid a field moves nothing) and
    stays small for a fine clinical CT."""
    import SimpleITK as sitk

    spacing = np.maximum(np.array(target.GetSpacing()), FIELD_MM)
    extent = (np.array(target.GetSize()) - 1) * np.array(target.GetSpacing())
    size = np.ceil(extent / spacing).astype(int) + 3
    origin = np.array(target.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, 0.0])) \
        - np.array(target.GetDirection()).reshape(3, 3) @ spacing
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(target.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def _propagate(transform, target, labels, values: list[int]):
    """Soft masks ``(value, (Z, Y, X) float32 in [0, 1])`` of the atlas organs ``values`` on the target's grid, one at
    a time (linear interpolation through one displacement field)."""
    import SimpleITK as sitk

    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(_field_grid(target))
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    warp = sitk.DisplacementFieldTransform(to_field.Execute(transform))
    for value in values:
        mask = sitk.Cast(labels == value, sitk.sitkFloat32)
        yield value, sitk.GetArrayFromImage(sitk.Resample(mask, target, warp, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


class _Fusion:
    """Per-organ scores from the atlases that annotate each organ (an atlas that leaves an organ out is not asked).

    ``vote``: the mean of their soft masks (a running sum: memory does not grow with the atlases); ``staple``:
    STAPLE's posterior of their binarised masks (the mask itself with one atlas).
    """

    def __init__(self, fusion: str) -> None:
        self.fusion = fusion
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.binary: dict[int, list[np.ndarray]] = {}

    def add(self, value: int, mask: np.ndarray) -> None:
        self.counts[value] = self.counts.get(value, 0) + 1
        if self.fusion == "staple":
            self.binary.setdefault(value, []).append((mask >= 0.5).astype(np.uint8))
        elif value in self.sums:
            self.sums[value] += mask
        else:
            self.sums[value] = mask.astype(np.float32, copy=True)

    @property
    def organs(self) -> list[int]:
        return sorted(self.counts)

    def score(self, value: int) -> np.ndarray:
        import SimpleITK as sitk

        if self.fusion != "staple":
            return self.sums[value] / np.float32(self.counts[value])
        masks = self.binary[value]
        if len(masks) == 1:
            return masks[0].astype(np.float32)
        staple = sitk.STAPLEImageFilter()
        staple.SetForegroundValue(1.0)
        staple.SetMaximumIterations(STAPLE_ITERATIONS)  # unbounded by default: minutes on an organ that oscillates
        return sitk.GetArrayFromImage(staple.Execute([sitk.GetImageFromArray(m) for m in masks])).astype(np.float32)


def _fuse(fusion: _Fusion, shape: tuple[int, ...]) -> np.ndarray:
    """The label map: a voxel takes the organ of the highest score >= 0.5 (ties: the lower value), else 0."""
    labels = np.zeros(shape, np.uint8 if max(fusion.organs, default=0) < 256 else np.uint16)
    best = np.full(shape, np.nextafter(np.float32(0.5), np.float32(0)), np.float32)  # a score must reach 0.5
    for value in fusion.organs:
        score = fusion.score(value)
        wins = score > best  # strictly: on a tie the lower value keeps the voxel
        labels[wins] = value
        best[wins] = score[wins]
    return labels


def select_atlases(folder: Path, names: tuple[str, ...]):
    """The labelled cases of ``folder`` (all, or those named, in that order).

    Raises:
        InputError: a named case is not in the folder (the message lists the cases found).
    """
    from separeg.segment.cases import find_cases

    found, _ = find_cases(folder)
    if not names:
        return found
    by_name = {c.name: c for c in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"atlas case(s) {', '.join(missing)} not in {folder} (it holds "
                         f"{', '.join(sorted(by_name)[:20])}{' ...' if len(by_name) > 20 else ''}); check --cases")
    return [by_name[n] for n in names]


# ------------------------------------------------------------------------------------------------------ the job


def run_atlas(job: AtlasJob, events: Events | None = None):
    """Contour ``job.volume`` by registering and fusing the atlas cases; write the outputs of ``separeg contour``.

    Returns:
        A :class:`separeg.segment.contour.ContourResult`.

    Raises:
        InputError: no label table, an unknown case, a target without body; VolumeReadError: unreadable input.
    """
    import SimpleITK as sitk

    from separeg import __version__
    from separeg.io.volumes import read_volume, to_canonical, write_volume
    from separeg.rt.labels import load_label_table
    from separeg.runtime.atomic import write_json
    from separeg.segment.cases import load_case
    from separeg.segment.contour import (
        LABELS_FILE,
        REVIEW_NOTICE,
        SEGMENTATION_FILE,
        ContourResult,
        _terminology,
        postprocess,
    )
    from separeg.segment.network import from_canonical

    events = events or Events()
    start = time.perf_counter()
    if job.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job.threads)
    labels_path = Path(job.labels) if job.labels else Path(job.atlases) / "labels.json"
    if not labels_path.exists():
        raise InputError(f"no label table: give --labels (a labels.json or CSV); {labels_path} does not exist")
    table = load_label_table(labels_path)
    atlases = select_atlases(Path(job.atlases), tuple(job.cases))
    image = read_volume(job.volume, series_uid=job.series_uid)
    fixed = _prepare(image, job.registration)
    fusion = _Fusion(job.fusion)
    per_atlas = []
    for i, case in enumerate(atlases):
        t0 = time.perf_counter()
        loaded = load_case(case, table)
        label_image = sitk.GetImageFromArray(loaded.labels)
        label_image.CopyInformation(loaded.image)
        transform, metric = register(fixed, _prepare(loaded.image, job.registration), job.registration)
        annotated = sorted(loaded.annotated)
        for value, mask in _propagate(transform, image, label_image, annotated):
            fusion.add(value, mask)
        seconds = time.perf_counter() - t0
        per_atlas.append({"case": case.name, "annotated": annotated, "mutual_information": round(float(metric), 4),
                          "seconds": round(seconds, 1)})
        events.progress("atlas", i + 1, len(atlases), msg=f"{case.name}: {seconds:.0f} s")
    shape = sitk.GetArrayViewFromImage(image).shape
    fused = sitk.GetImageFromArray(_fuse(fusion, shape))
    fused.CopyInformation(image)
    canonical = to_canonical(fused)
    array = postprocess(sitk.GetArrayFromImage(canonical), list(table.values),
                        largest_component=job.largest_component, fill_holes=job.fill_holes)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(canonical)
    result = from_canonical(result, image)
    out = Path(job.out_dir)
    segmentation = write_volume(result, out / SEGMENTATION_FILE)
    voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
    counts = np.bincount(array.ravel(), minlength=max(table.values) + 1)
    volumes = {lb.tg263 or lb.name: round(float(counts[lb.value]) * voxel_cc, 2) for lb in table.labels}
    unannotated = [lb.tg263 or lb.name for lb in table.labels if lb.value not in fusion.counts]
    warnings = [f"no atlas annotates {', '.join(unannotated)}: not contoured"] if unannotated else []
    identity = hashlib.sha256(repr((sorted(a.name for a in atlases), job.fusion, asdict(job.registration)))
                              .encode()).hexdigest()
    seconds = round(time.perf_counter() - start, 1)
    description = {
        "notice": REVIEW_NOTICE,
        "source": str(job.volume),
        "separeg_version": __version__,
        "model": {"path": str(job.atlases), "name": f"atlas-{job.fusion}-{len(atlases)}", "sha256": identity},
        "atlas": {"fusion": job.fusion, "cases": per_atlas, "registration": asdict(job.registration)},
        "seconds": seconds,
        "labels": [{"value": lb.value, "name": lb.name, "tg263": lb.tg263, "color": list(lb.color),
                    "volume_cc": volumes[lb.tg263 or lb.name], **_terminology(lb)} for lb in table.labels],
        "warnings": warnings,
        "postprocessing": {"largest_component": job.largest_component, "fill_holes": job.fill_holes},
    }
    labels_json = write_json(description, out / LABELS_FILE)
    for note in warnings:
        events.warning(note, stage="atlas")
    events.done(f"{segmentation} written ({len(atlases)} atlas(es), {job.fusion}, {seconds:.0f} s). {REVIEW_NOTICE}")
    return ContourResult(segmentation, labels_json, volumes, warnings)
