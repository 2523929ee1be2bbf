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

from separeg.atlas.registration import RegistrationConfig, RegistrationError, _prepare, register
from separeg.registry import FUSIONS
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events

__all__ = ["AtlasJob", "FUSIONS", "run_atlas", "select_atlases"]

log = logging.getLogger(__name__)

STAPLE_ITERATIONS = 30


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
    warp = _displacement(transform, target)
    for value in values:
        yield value, _carry(warp, target, labels == value)


def _displacement(transform, target):
    """``transform`` as one displacement field over the target (:func:`_field_grid`): cheaper to apply per organ."""
    import SimpleITK as sitk

    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(_field_grid(target))
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(to_field.Execute(transform))


def _carry(warp, target, mask):
    """A 0/1 ``mask`` image on the atlas grid, resampled through ``warp`` onto the target's grid: ``(Z, Y, X)``
    float32 in [0, 1] (0 outside the atlas image)."""
    import SimpleITK as sitk

    mask = sitk.Cast(mask, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(mask, target, warp, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


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
    from separeg.segment.case_loading import load_case
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
        try:
            transform, metric = register(fixed, _prepare(loaded.image, job.registration), job.registration)
        except RegistrationError as exc:  # one atlas that cannot be aligned must not stop the others
            events.warning(f"atlas {case.name} left out: {exc}", stage="atlas")
            per_atlas.append({"case": case.name, "failed": str(exc)})
            continue
        annotated = sorted(loaded.annotated)
        for value, mask in _propagate(transform, image, label_image, annotated):
            fusion.add(value, mask)
        seconds = time.perf_counter() - t0
        per_atlas.append({"case": case.name, "annotated": annotated, "mutual_information": round(float(metric), 4),
                          "seconds": round(seconds, 1)})
        events.progress("atlas", i + 1, len(atlases), msg=f"{case.name}: {seconds:.0f} s")
    if not fusion.counts:
        raise InputError(f"no atlas could be registered to {job.volume} ({len(atlases)} tried; the warnings say why)")
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
