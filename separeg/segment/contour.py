"""`separeg contour`: Auto-contour a CT with a segmentation bundle (DESIGN §2.10).

CT (NIfTI/NRRD/MHA or a DICOM series folder) -> canonical orientation -> model grid (streamed in chunks of slices;
2.5D context stacked there) -> slice inference in batches (bf16 on CUDA and on CPUs with native bf16; channels-last
on a CPU; averaged with the left-right mirrored slices, laterality swapped, where the model's fine-tuning chose
that on its validation cases) -> labels on the input grid: the argmax of the bilinearly resampled logits, computed
exactly without resampling them (:func:`upsampled_argmax`) -> organs the model never learned left out (unless
``include_unlearned``; :mod:`~separeg.segment.learned_organs`) and every label outside the body cleared
(:mod:`~separeg.segment.body_mask`) -> per-organ largest connected component and hole filling inside each organ's
bounding box -> organ volumes checked against the training volumes (:mod:`~separeg.segment.body_site`: a warning for
a CT of another body site) -> label map in the input's exact geometry. Outputs, in OUT_DIR:
``segmentation.nii.gz`` (uint8 label map) and ``segmentation.json`` (labels with names, TG-263 names,
colours, volumes in cc, display names and Slicer terminology entries, the organs not contoured and why, warnings,
the model's identity, and the reminder that this is an automatic contour that needs review). With
``rtstruct``/``seg``, also ``rtstruct.dcm``/``seg.dcm`` referencing the input CT series (a NIfTI/NRRD/MHA input is
first written as a new DICOM series ``ct_dicom/``, which they reference; see :mod:`separeg.rt.export`) and
``export.json``.

Speed (issue 24, ``Testing/benchmarks/results/contour_profile.md``): the path before it, kept as
:func:`_run_contour_legacy` for ``bench_contour.py`` and the agreement test, resampled 8-channel float logits to
every 512 x 512 slice, ran one slice at a time on a CPU and post-processed whole volumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from separeg.io.channels import check_channel_count, co_register
from separeg.io.volumes import read_volume, write_volume
from separeg.runtime.atomic import write_json
from separeg.runtime.events import Events
from separeg.runtime.outdir import begin_result, finish_result
from separeg.runtime.training import Runtime, setup_runtime
from separeg.segment.body_site import (
    body_area_cm2,
    body_area_warning,
    body_site_warning,
    expected_body_area,
    expected_volumes,
)
from separeg.segment.ensemble import ModelEnsemble, check_members
from separeg.segment.inference import predict_labels, upsampled_argmax
from separeg.segment.mirror import MirrorEnsemble, lateral_swap
from separeg.segment.network import (
    CANONICAL_ORIENTATION,
    GridSpec,
    _model_size,
    from_canonical,
    load_segmentation_model,
    model_input,
    to_canonical,
    with_context,
)
from separeg.segment.output_organs import select_output_organs

__all__ = ["ContourJob", "ContourResult", "run_contour", "postprocess", "SEGMENTATION_FILE", "LABELS_FILE",
           "REVIEW_NOTICE"]

logger = logging.getLogger(__name__)

SEGMENTATION_FILE = "segmentation.nii.gz"
LABELS_FILE = "segmentation.json"
REVIEW_NOTICE = "Automatic contour: review and correct every structure before clinical use."
CPU_BATCH = 16  # slices per batch on a CPU: 2-4x faster than one at a time for the starter models; 8 to 32 run
GPU_BATCH = 16  # about as fast, 32 holds ~90 MB more (contour_profile.md)
_CHUNK = 16  # input slices windowed and resampled to the model grid at a time: memory stays flat


@dataclass(frozen=True)
class ContourJob:
    volume: Path  # the CT (channel 1; its grid is the output's)
    model: str
    out_dir: Path
    channels: tuple[Path, ...] = ()  # further co-registered volumes, for a model with several input channels
    device: str = "auto"
    largest_component: bool = True
    fill_holes: bool = True
    # Test-time left-right mirroring with laterality swapped (separeg.segment.mirror); None: as the model's
    # fine-tuning chose on its validation cases (off for models that recorded no choice).
    mirror: bool | None = None
    batch_size: int | None = None  # default: CPU_BATCH slices on a CPU, GPU_BATCH on a GPU
    series_uid: str | None = None
    rtstruct: bool = False  # also write rtstruct.dcm referencing the CT (see separeg.rt.export)
    seg: bool = False  # also write seg.dcm (DICOM SEG)
    patient_name: str | None = None  # for a NIfTI/NRRD/MHA input written as DICOM (default "Anonymous")
    patient_id: str | None = None
    # Also write the organs the model did not learn (separeg.segment.learned_organs); off: they are left out, saying so
    include_unlearned: bool = False
    # Further models whose probabilities are averaged with the model's (separeg.segment.ensemble); the model's own
    # choices (post-processing, mirroring, learned organs) apply to the ensemble.
    ensemble: tuple[str, ...] = ()


@dataclass
class ContourResult:
    segmentation: Path
    labels_json: Path
    volumes_cc: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)  # rtstruct, seg, ct_dicom: as written by export_labelmap
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage (read, model, inference, ...)
    not_contoured: list[dict] = field(default_factory=list)  # organs left out: {"value", "name", "tg263", "reason"}


def postprocess(labels: np.ndarray, values: list[int], *, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per organ: keep the largest 3D connected component; fill holes slice by slice (into background only).

    Each organ is processed inside its bounding box, which gives the same result as the whole volume: every voxel
    of the organ is inside it, and background on its border is connected to the outside.
    """
    out = labels.copy()
    boxes = ndimage.find_objects(out, max_label=max(values, default=0))
    for value in values:
        box = boxes[value - 1] if value >= 1 else None
        if box is None:  # absent (or the background value)
            continue
        region = out[box]  # a view: edits go to ``out``
        mask = region == value
        if largest_component:
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                region[mask & (components != int(np.argmax(sizes)))] = 0
                mask = region == value
        if fill_holes:
            for k in np.flatnonzero(mask.any(axis=(1, 2))):
                filled = ndimage.binary_fill_holes(mask[k])
                region[k][filled & (region[k] == 0)] = value
    return out


def _warnings(image, data: dict) -> list[str]:
    """Input checks that matter for a model trained on ``data`` (the bundle's training-data summary); contouring
    goes on.

    One format, ``"<what>: <found> (training data: <range>); <why it matters>"``. Checked: the modality (the DICOM
    Modality tag that :func:`~separeg.io.dicom_series.read_dicom_series` keeps), the intensity range, the field of view,
    and in-plane voxels coarser than every training scan. Finer voxels (a 1 mm clinical CT) are resampled to the
    model's grid, so they are not reported.
    """
    import SimpleITK as sitk

    from separeg.io.dicom_series import MODALITY_TAG

    def number(value: float) -> str:  # -1000, 3000, 0.997: never "0 to 0" for a CT scaled 0-1
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"

    notes = []
    trained = str(data.get("modality") or "CT")
    modality = image.GetMetaData(MODALITY_TAG).strip() if image.HasMetaDataKey(MODALITY_TAG) else ""
    if modality and modality != trained:
        notes.append(f"modality: the series is {modality} (DICOM Modality tag) (training data: {trained}); this "
                     f"model's contours on {modality} images are not meaningful")
    hu = sitk.GetArrayViewFromImage(image)
    p01, p99 = (float(v) for v in np.percentile(hu, [1, 99]))
    if not notes and "hu_p01" in data and (abs(p01 - data["hu_p01"]) > 500 or abs(p99 - data["hu_p99"]) > 1000):
        notes.append(f"intensities: 1st-99th percentile {number(p01)} to {number(p99)} (training data: "
                     f"{number(data['hu_p01'])} to {number(data['hu_p99'])} HU); is this a CT in HU?")
    spacing = np.array(image.GetSpacing(), float)
    extent = np.array(image.GetSize()) * spacing
    if "extent_mm_min" in data and np.any(extent < 0.5 * np.array(data["extent_mm_min"])):
        notes.append(f"field of view: {' x '.join(number(e) for e in extent)} mm (training data: at least "
                     f"{' x '.join(number(e) for e in data['extent_mm_min'])} mm); organs outside it are missed")
    elif "extent_mm_max" in data and np.any(extent > 2.0 * np.array(data["extent_mm_max"])):
        notes.append(f"field of view: {' x '.join(number(e) for e in extent)} mm (training data: at most "
                     f"{' x '.join(number(e) for e in data['extent_mm_max'])} mm); contours far outside the "
                     "trained region are unreliable")
    if "spacing_max" in data and np.any(spacing[:2] > 2.0 * np.array(data["spacing_max"])[:2]):
        notes.append(f"voxel size: {' x '.join(number(v) for v in spacing[:2])} mm in-plane (training data: at most "
                     f"{' x '.join(number(v) for v in data['spacing_max'][:2])} mm); detail finer than these voxels "
                     "is lost and resampling cannot restore it")
    return notes


def _terminology(label) -> dict:
    """Display name and Slicer terminology entry of a label (coded organs; others get the generic "Tissue")."""
    from separeg.rt.seg import segment_terminology

    term = segment_terminology(label)
    return {"display_name": term.name, "terminology": term.slicer_entry(), "coded": term.coded}


Segmenter = Callable[[list, GridSpec, torch.nn.Module, Runtime, int, Events], tuple[np.ndarray, object]]


def run_contour(job: ContourJob, events: Events | None = None) -> ContourResult:
    """Contour ``job.volume`` with ``job.model``; write the label map and its description to ``job.out_dir``.

    Raises:
        InputError, VolumeReadError: unreadable input; BundleError: a missing, damaged or non-segmentation model.
    """
    return _contour(job, events or Events(), _segment)


def _canonical(image):
    """:func:`to_canonical`, without the copy when the image is already in the canonical orientation."""
    import SimpleITK as sitk

    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return image if orientation == CANONICAL_ORIENTATION else to_canonical(image)


def _model_grid_slices(images: list, spec: GridSpec, device: torch.device) -> torch.Tensor:
    """``(Z, C, h, w)`` network input (no context) of canonical images; one windowed CT is windowed and resampled
    :data:`_CHUNK` slices at a time (each slice on its own: the same values as one call), never as a whole float
    volume on the input grid."""
    import SimpleITK as sitk

    spacing = images[0].GetSpacing()[:2]
    channels = spec.input_channels
    if len(images) == 1 and len(channels) == 1 and channels[0].normalisation == "window":
        voxels = sitk.GetArrayViewFromImage(images[0])
        return torch.cat([model_input([np.array(voxels[z:z + _CHUNK])], spacing, spec, device=device, context=False)
                          for z in range(0, len(voxels), _CHUNK)])
    return model_input([sitk.GetArrayFromImage(image) for image in images], spacing, spec, device=device,
                       context=False)


def _segment(images: list, spec: GridSpec, model: torch.nn.Module, runtime: Runtime, batch: int,
             events: Events) -> tuple[np.ndarray, object]:
    """Raw ``(Z, H, W)`` labels of the canonical first image's grid, and that canonical image."""
    canonical = [_canonical(image) for image in images]
    shape = tuple(canonical[0].GetSize()[::-1])
    slices = with_context(_model_grid_slices(canonical, spec, runtime.device), spec.context_slices)
    height, width = _model_size(*shape[1:], canonical[0].GetSpacing()[:2], spec)  # the rest is padding
    if runtime.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    labels = predict_labels(model, slices, shape[1:],
                            lambda logits: upsampled_argmax(logits[..., :height, :width], shape[1:]),
                            runtime, batch, events)
    return labels, canonical[0]


def _contour(job: ContourJob, events: Events, segment: Segmenter, *, cpu_batch: int = CPU_BATCH,
             post: Callable[..., np.ndarray] = postprocess) -> ContourResult:
    import SimpleITK as sitk

    from separeg import __version__
    from separeg.rt.labels import LabelTable
    from separeg.runtime.bundle import load_bundle
    from separeg.runtime.model_store import resolve_model

    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    runtime = setup_runtime(job.device)
    bundle = load_bundle(resolve_model(job.model), expected_kind="segmentation")
    table = LabelTable.from_dict(bundle.metadata["labels"])
    spec = GridSpec.from_dict(bundle.metadata["inputs"])
    check_channel_count(1 + len(job.channels), spec.input_channels, "the input")
    lap("load model bundle")
    image = read_volume(job.volume, series_uid=job.series_uid)
    images, warnings = co_register([image, *(read_volume(p) for p in job.channels)],
                                   [c.name for c in spec.input_channels])
    lap("read volume")
    if spec.input_channels[0].normalisation == "window":  # a CT: its HU range can be checked
        warnings = _warnings(image, bundle.metadata.get("data", {})) + warnings
    for note in warnings:
        events.warning(note, stage="contour")
    lap("input checks")
    model = load_segmentation_model(bundle, runtime.device)
    members = [load_bundle(resolve_model(name), expected_kind="segmentation") for name in job.ensemble]
    if members:
        check_members(bundle, members)
        model = ModelEnsemble([model, *(load_segmentation_model(m, runtime.device) for m in members)])
    mirror = job.mirror
    if mirror is None:  # the model's choice
        mirror = bool((bundle.metadata.get("test_time_mirroring") or {}).get("chosen", False))
    if mirror:
        model = MirrorEnsemble(model, lateral_swap(table)).to(runtime.device)
    lap("build network")
    batch = job.batch_size or (GPU_BATCH if runtime.device.type == "cuda" else cpu_batch)
    labels, canonical = segment(images, spec, model, runtime, batch, events)
    lap("inference and labels")
    is_ct = spec.input_channels[0].normalisation == "window"
    organs = select_output_organs(labels, sitk.GetArrayViewFromImage(canonical) if is_ct else None, bundle.metadata,
                                  table, include_unlearned=job.include_unlearned)
    kept = organs.table
    lcc, fill = _postprocessing_organs(bundle.metadata.get("postprocessing"), kept.values, job)
    labels = post(labels, lcc, largest_component=True, fill_holes=False)
    labels = post(labels, fill, largest_component=False, fill_holes=True)
    lap("postprocess")
    result_image = sitk.GetImageFromArray(labels)
    if canonical is image:
        result_image.CopyInformation(image)
    else:
        result_image.CopyInformation(canonical)
        result_image = from_canonical(result_image, image)
    out = Path(job.out_dir)
    begin_result(out, keep=(job.volume, *job.channels))  # the folder holds this result only (runtime.outdir)
    segmentation = write_volume(result_image, out / SEGMENTATION_FILE)
    voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
    counts = sum(np.bincount(labels_slice.ravel(), minlength=max(table.values) + 1) for labels_slice in labels)
    volumes = {label.tg263 or label.name: round(float(counts[label.value]) * voxel_cc, 2) for label in kept.labels}
    expected, source = expected_volumes(bundle.metadata, kept)
    site = body_site_warning({lb.value: volumes[lb.tg263 or lb.name] for lb in kept}, expected, kept, source)
    if site is None and is_ct:  # the body's size, which no chance finding of an organ can hide
        area_range, area_source = expected_body_area(bundle.metadata, kept)
        site = body_area_warning(body_area_cm2(sitk.GetArrayViewFromImage(canonical), canonical.GetSpacing()),
                                 area_range, area_source)
    for note in [*organs.warnings, *([site] if site else [])]:
        events.warning(note, stage="contour")
        warnings.append(note)
    description = {
        "notice": REVIEW_NOTICE,
        "source": str(job.volume),
        "separeg_version": __version__,
        "model": {"path": str(bundle.path), "name": Path(bundle.path).stem, "sha256": bundle.weights_sha256,
                  **({"ensemble": [{"path": str(m.path), "sha256": m.weights_sha256} for m in members]}
                     if members else {})},
        "labels": [{"value": lb.value, "name": lb.name, "tg263": lb.tg263, "color": list(lb.color),
                    "volume_cc": volumes[lb.tg263 or lb.name], **_terminology(lb)} for lb in kept.labels],
        "not_contoured": organs.not_contoured,
        "warnings": warnings,
        "postprocessing": {"largest_component": [_organ(table, v) for v in lcc],
                           "fill_holes": [_organ(table, v) for v in fill],
                           "outside_body_voxels_removed": organs.outside_body},
        "test_time_mirroring": bool(mirror),
    }
    labels_json = write_json(description, out / LABELS_FILE)
    lap("write")
    missing = [name for name, cc in volumes.items() if cc == 0]
    summary = ", ".join(f"{name} {cc:.1f} cc" for name, cc in volumes.items() if cc > 0)
    events.log(f"{summary or 'no organ found'}" + (f"; not found: {', '.join(missing)}" if missing else ""),
               stage="contour")
    exports: dict[str, Path] = {}
    formats = tuple(name for name, wanted in (("rtstruct", job.rtstruct), ("seg", job.seg)) if wanted)
    if formats:
        from separeg.io.dicom_ct import Algorithm
        from separeg.rt.export import export_labelmap

        algorithm = Algorithm(name=Path(bundle.path).stem, version=__version__, bundle_hash=bundle.weights_sha256)
        exports = export_labelmap(result_image, kept, Path(job.volume), out, formats=formats, algorithm=algorithm,
                                  series_uid=job.series_uid, patient_name=job.patient_name,
                                  patient_id=job.patient_id, events=events, replace=False).outputs
        lap("export")
    logger.debug("contour seconds per stage: %s", {k: round(v, 2) for k, v in seconds.items()})
    written = ", ".join(str(p) for p in (segmentation, *exports.values()))
    finish_result(out)
    events.done(f"{written} written. {REVIEW_NOTICE}")
    return ContourResult(segmentation, labels_json, volumes, warnings, exports, seconds, organs.not_contoured)


# ---------------------------------------------------------------- the path before issue 24 (benchmark, agreement test)


def _organ(table, value: int) -> str:
    label = table.by_value(value)
    return label.tg263 or label.name


def _postprocessing_organs(chosen: dict | None, values: list[int], job: ContourJob) -> tuple[list[int], list[int]]:
    """The organs whose largest component is kept and whose holes are filled: those the model's fine-tuning chose
    on its validation cases (every organ for models that recorded no choice), unless the job switches a step off."""
    chosen = chosen or {}
    lcc = [v for v in values if v in chosen.get("largest_component", values)] if job.largest_component else []
    fill = [v for v in values if v in chosen.get("fill_holes", values)] if job.fill_holes else []
    return lcc, fill


