"""`separeg contour`: Auto-contour a CT with a segmentation bundle (DESIGN §2.10).

CT (NIfTI/NRRD/MHA or a DICOM series folder) -> canonical orientation -> model grid -> slice inference
(batches of 16 in bf16 on CUDA; one slice at a time on a CPU, in bf16 where the CPU has native bf16) ->
logits back on the input grid -> argmax -> per-organ largest connected component and hole filling ->
label map in the input's exact geometry. Outputs, in OUT_DIR:
``segmentation.nii.gz`` (uint8 label map) and ``segmentation.json`` (labels with names, TG-263 names,
colours, volumes in cc, display names and Slicer terminology entries, warnings, the model's identity, and the
reminder that this is an automatic contour that needs review). With ``rtstruct``/``seg``, also ``rtstruct.dcm``/
``seg.dcm`` referencing the input CT series (a NIfTI/NRRD/MHA input is first written as a new DICOM series
``ct_dicom/``, which they reference; see :mod:`separeg.export`) and ``export.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .atomic import write_json
from .channels import check_channel_count, co_register
from .errors import SepaRegError
from .events import Events
from .segmodel import GridSpec, build_unet, from_canonical, from_model_grid, model_input, to_canonical
from .training import Runtime, setup_runtime
from .volumes import read_volume, write_volume

__all__ = ["ContourJob", "ContourResult", "run_contour", "postprocess", "predict_labels", "ContourMemoryError",
           "SEGMENTATION_FILE", "LABELS_FILE", "REVIEW_NOTICE"]

SEGMENTATION_FILE = "segmentation.nii.gz"
LABELS_FILE = "segmentation.json"
REVIEW_NOTICE = "Automatic contour: review and correct every structure before clinical use."


@dataclass(frozen=True)
class ContourJob:
    volume: Path  # the CT (channel 1; its grid is the output's)
    model: str
    out_dir: Path
    channels: tuple[Path, ...] = ()  # further co-registered volumes, for a model with several input channels
    device: str = "auto"
    largest_component: bool = True
    fill_holes: bool = True
    batch_size: int | None = None  # default: 16 slices on a GPU, 1 on a CPU (bench_contour: batching is slower there)
    series_uid: str | None = None
    rtstruct: bool = False  # also write rtstruct.dcm referencing the CT (see separeg.export)
    seg: bool = False  # also write seg.dcm (DICOM SEG)
    patient_name: str | None = None  # for a NIfTI/NRRD/MHA input written as DICOM (default "Anonymous")
    patient_id: str | None = None


@dataclass
class ContourResult:
    segmentation: Path
    labels_json: Path
    volumes_cc: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)  # rtstruct, seg, ct_dicom: as written by export_labelmap


def postprocess(labels: np.ndarray, values: list[int], *, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per organ: keep the largest 3D connected component; fill holes slice by slice (into background only)."""
    out = labels.copy()
    for value in values:
        mask = out == value
        if not mask.any():
            continue
        if largest_component:
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                out[mask & (components != int(np.argmax(sizes)))] = 0
                mask = out == value
        if fill_holes:
            for k in np.flatnonzero(mask.any(axis=(1, 2))):
                filled = ndimage.binary_fill_holes(mask[k])
                out[k][filled & (out[k] == 0)] = value
    return out


class ContourMemoryError(SepaRegError):
    """The device ran out of memory even one slice at a time."""


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory exception (``torch.OutOfMemoryError`` from torch 2.5, ``torch.cuda.`` before)."""
    return (getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError,)


def predict_labels(model: torch.nn.Module, slices: torch.Tensor, out_shape: tuple[int, int],
                   to_input_grid: Callable[[torch.Tensor], torch.Tensor], runtime: Runtime, batch: int,
                   events: Events) -> np.ndarray:
    """Argmax labels of ``slices`` in batches; out of memory, the batch is halved (saying so) and the batch retried.

    Args:
        slices: ``(Z, C, h, w)`` on the model grid, on the model's device.
        out_shape: ``(H, W)`` of the input grid; ``to_input_grid`` maps ``(B, C, h, w)`` logits onto it.

    Returns:
        ``(Z, H, W)`` uint8 labels.

    Raises:
        ContourMemoryError: out of memory with a batch of one slice.
    """
    labels = np.zeros((len(slices), *out_shape), np.uint8)
    start = 0
    with torch.inference_mode():
        while start < len(slices):
            logits = None
            try:
                with runtime.inference_autocast:
                    logits = model(slices[start:start + batch])
                logits = to_input_grid(logits.float())
            except _out_of_memory_errors() as exc:
                if batch == 1:
                    raise ContourMemoryError(
                        f"out of memory on {runtime.device} even one slice at a time ({exc}); close other programs "
                        "that use it, or contour on the CPU (--device cpu)") from exc
                logits = None
            if logits is None:  # outside the except block, whose traceback still holds the failed batch's tensors
                batch = _smaller_batch(batch, runtime, events)
                continue
            labels[start:start + len(logits)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            start += len(logits)
            events.progress("contour", start, len(slices))
    return labels


def _smaller_batch(batch: int, runtime: Runtime, events: Events) -> int:
    smaller = max(1, batch // 2)
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # give the failed batch's blocks back before trying the smaller one
    events.warning(f"out of memory on {runtime.device} with {batch} slices per batch; continuing with {smaller}",
                   stage="contour")
    return smaller


def _warnings(image, data: dict) -> list[str]:
    """Input checks that matter for a model trained on ``data`` (the bundle's training-data summary); contouring
    goes on.

    One format, ``"<what>: <found> (training data: <range>); <why it matters>"``. Checked: the modality (the DICOM
    Modality tag that :func:`~separeg.volumes.read_dicom_series` keeps), the intensity range, the field of view,
    and in-plane voxels coarser than every training scan. Finer voxels (a 1 mm clinical CT) are resampled to the
    model's grid, so they are not reported.
    """
    import SimpleITK as sitk

    from .volumes import MODALITY_TAG

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
    from .dicom_seg import segment_terminology

    term = segment_terminology(label)
    return {"display_name": term.name, "terminology": term.slicer_entry(), "coded": term.coded}


def run_contour(job: ContourJob, events: Events | None = None) -> ContourResult:
    """Contour ``job.volume`` with ``job.model``; write the label map and its description to ``job.out_dir``.

    Raises:
        InputError, VolumeReadError: unreadable input; BundleError: a missing, damaged or non-segmentation model.
    """
    import SimpleITK as sitk

    from . import __version__
    from .bundle import load_bundle
    from .labels import LabelTable
    from .models import resolve_model

    events = events or Events()
    runtime = setup_runtime(job.device)
    bundle = load_bundle(resolve_model(job.model), expected_kind="segmentation")
    table = LabelTable.from_dict(bundle.metadata["labels"])
    spec = GridSpec.from_dict(bundle.metadata["inputs"])
    check_channel_count(1 + len(job.channels), spec.input_channels, "the input")
    image = read_volume(job.volume, series_uid=job.series_uid)
    images, warnings = co_register([image, *(read_volume(p) for p in job.channels)],
                                   [c.name for c in spec.input_channels])
    if spec.input_channels[0].normalisation == "window":  # a CT: its HU range can be checked
        warnings = _warnings(image, bundle.metadata.get("data", {})) + warnings
    for note in warnings:
        events.warning(note, stage="contour")
    canonical = to_canonical(image)
    hu = sitk.GetArrayFromImage(canonical)
    spacing = canonical.GetSpacing()[:2]
    arch = bundle.architecture
    model = build_unet(arch["backbone"], arch["out_channels"], arch.get("in_channels", 1))
    model.load_state_dict(bundle.state_dict)
    model = model.to(runtime.device).eval()
    arrays = [hu] + [sitk.GetArrayFromImage(to_canonical(other)) for other in images[1:]]
    slices = model_input(arrays, spacing, spec, device=runtime.device)
    batch = job.batch_size or (16 if runtime.device.type == "cuda" else 1)
    labels = predict_labels(model, slices, hu.shape[1:], lambda logits: from_model_grid(logits, hu.shape[1:], spacing,
                                                                                       spec), runtime, batch, events)
    labels = postprocess(labels, table.values, largest_component=job.largest_component, fill_holes=job.fill_holes)
    result_image = sitk.GetImageFromArray(labels)
    result_image.CopyInformation(canonical)
    result_image = from_canonical(result_image, image)
    out = Path(job.out_dir)
    segmentation = write_volume(result_image, out / SEGMENTATION_FILE)
    voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(table.values) + 1)
    volumes = {label.tg263 or label.name: round(float(counts[label.value]) * voxel_cc, 2) for label in table.labels}
    description = {
        "notice": REVIEW_NOTICE,
        "source": str(job.volume),
        "separeg_version": __version__,
        "model": {"path": str(bundle.path), "name": Path(bundle.path).stem, "sha256": bundle.weights_sha256},
        "labels": [{"value": lb.value, "name": lb.name, "tg263": lb.tg263, "color": list(lb.color),
                    "volume_cc": volumes[lb.tg263 or lb.name], **_terminology(lb)} for lb in table.labels],
        "warnings": warnings,
        "postprocessing": {"largest_component": job.largest_component, "fill_holes": job.fill_holes},
    }
    labels_json = write_json(description, out / LABELS_FILE)
    missing = [name for name, cc in volumes.items() if cc == 0]
    summary = ", ".join(f"{name} {cc:.1f} cc" for name, cc in volumes.items() if cc > 0)
    events.log(f"{summary or 'no organ found'}" + (f"; not found: {', '.join(missing)}" if missing else ""),
               stage="contour")
    exports: dict[str, Path] = {}
    formats = tuple(name for name, wanted in (("rtstruct", job.rtstruct), ("seg", job.seg)) if wanted)
    if formats:
        from .dicom_ct import Algorithm
        from .export import export_labelmap

        algorithm = Algorithm(name=Path(bundle.path).stem, version=__version__, bundle_hash=bundle.weights_sha256)
        exports = export_labelmap(result_image, table, Path(job.volume), out, formats=formats, algorithm=algorithm,
                                  series_uid=job.series_uid, patient_name=job.patient_name,
                                  patient_id=job.patient_id, events=events).outputs
    written = ", ".join(str(p) for p in (segmentation, *exports.values()))
    events.done(f"{written} written. {REVIEW_NOTICE}")
    return ContourResult(segmentation, labels_json, volumes, warnings, exports)
