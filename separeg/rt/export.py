"""`separeg export`: a label map on a CT -> RTSTRUCT, DICOM SEG and/or NIfTI that reference that CT (DESIGN §2.11).

The CT is a DICOM series folder (the exports reference it and copy its patient and study) or a NIfTI/NRRD/MHA
file; then the CT is first written as a new DICOM series, ``OUT_DIR/ct_dicom/`` (:mod:`separeg.io.dicom_write`), and
the exports reference that series, so a planning system gets images and structures of one new study. The label
map must be on the CT's grid. Organ names come from the ``segmentation.json`` that ``separeg contour`` writes
beside the label map, or from a label table (``--labels``); the model identity (name, bundle hash) from
``segmentation.json``. Outputs, in OUT_DIR: ``rtstruct.dcm``, ``seg.dcm``, ``segmentation.nii.gz``, ``ct_dicom/``
when written, and ``export.json`` listing them with the referenced series, the algorithm, the generation type and
the RTSTRUCT's hole convention.

Generation type: a label map whose ``segmentation.json`` names a model is AUTOMATIC (model output, with the
"review before clinical use" notice); without a model (a clinical RTSTRUCT imported and exported again, a label map
drawn by hand) MANUAL, with no algorithm identification; ``generation`` overrides it (SEMIAUTOMATIC: a model's
contours corrected by a person). Holes (RTSTRUCT): separate even-odd contours or keyhole cuts
(:mod:`separeg.rt.keyhole`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from separeg import __version__
from separeg.io.volumes import Geometry, read_volume, write_volume
from separeg.rt.labels import LabelTable, load_label_table
from separeg.runtime.atomic import write_json
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.runtime.outdir import abandon_result, begin_result, check_output_folder, finish_result, output_folder

if TYPE_CHECKING:
    import SimpleITK as sitk

    from separeg.io.dicom_ct import Algorithm, CtSeries

__all__ = ["ExportJob", "ExportResult", "run_export", "export_labelmap", "algorithm_from_description", "FORMATS",
           "RTSTRUCT_FILE", "SEG_FILE", "NIFTI_FILE", "CT_DICOM_DIR", "MANIFEST_FILE"]

FORMATS = ("rtstruct", "seg", "nifti")
RTSTRUCT_FILE, SEG_FILE, NIFTI_FILE = "rtstruct.dcm", "seg.dcm", "segmentation.nii.gz"
CT_DICOM_DIR, MANIFEST_FILE = "ct_dicom", "export.json"
DESCRIPTION_FILE = "segmentation.json"  # written by `separeg contour` beside the label map
SERIES_DESCRIPTION = "SepaReg auto-contours"
SERIES_DESCRIPTIONS = {"AUTOMATIC": SERIES_DESCRIPTION, "SEMIAUTOMATIC": "SepaReg edited contours",
                       "MANUAL": "Contours exported by SepaReg"}


@dataclass(frozen=True)
class ExportJob:
    """What to export. No format chosen means all three.

    Attributes:
        labelmap: the label map file (NIfTI/NRRD/MHA) on the CT's grid.
        ct: the CT: a DICOM series folder, or a NIfTI/NRRD/MHA file (then written as DICOM for RTSTRUCT/SEG).
        out_dir: output folder.
        labels: a label table (``segmentation.json`` of ``separeg contour``, ``labels.json``, CSV); default: the
            ``segmentation.json`` beside the label map.
        formats: a subset of :data:`FORMATS`.
        patient_name, patient_id: for a CT that is not DICOM (default "Anonymous" and an ID from its content).
        series_uid: which series of a DICOM folder holding several.
        generation: "automatic", "semiautomatic" or "manual"; default: automatic when ``segmentation.json`` names
            the model that made the label map, else manual.
        holes: RTSTRUCT hole convention, "separate" (even-odd) or "keyhole".
    """

    labelmap: Path
    ct: Path
    out_dir: Path
    labels: Path | None = None
    formats: tuple[str, ...] = FORMATS
    patient_name: str | None = None
    patient_id: str | None = None
    series_uid: str | None = None
    generation: str | None = None
    holes: str = "separate"

    def __post_init__(self) -> None:
        from separeg.io.dicom_ct import GENERATIONS
        from separeg.rt.keyhole import HOLE_CONVENTIONS

        formats = tuple(dict.fromkeys(self.formats)) or FORMATS
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise InputError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        object.__setattr__(self, "formats", formats)
        if self.generation is not None and self.generation.upper() not in GENERATIONS:
            raise InputError(f"unknown --generation {self.generation!r}; choose from "
                             f"{', '.join(g.lower() for g in GENERATIONS)}")
        if self.holes not in HOLE_CONVENTIONS:
            raise InputError(f"unknown --holes {self.holes!r}; choose from {', '.join(HOLE_CONVENTIONS)}")


@dataclass
class ExportResult:
    """Paths written (by format, plus ``ct_dicom`` when the CT was written) and what they reference."""

    outputs: dict[str, Path]
    manifest: Path
    series_instance_uid: str | None
    algorithm: Algorithm | None
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def algorithm_from_description(description: dict | None) -> Algorithm | None:
    """The model identity recorded by ``separeg contour`` (``model`` in ``segmentation.json``); None without one."""
    from separeg.io.dicom_ct import Algorithm

    model = (description or {}).get("model") or {}
    if not model:
        return None
    name = str(model.get("name") or (Path(model["path"]).stem if model.get("path") else "") or "SepaReg")
    version = str((description or {}).get("separeg_version") or __version__)
    return Algorithm(name=name, version=version, bundle_hash=str(model.get("sha256") or ""))


def _read_description(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _labelmap_array(image: sitk.Image, source: Path | str) -> np.ndarray:
    """(z, y, x) uint8; refuses negative, fractional or > 255 values."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a label map "
                         "has one integer per voxel")
    if array.size and (array.min() < 0 or array.max() > 255 or
                       (np.issubdtype(array.dtype, np.floating) and np.any(np.mod(array, 1) != 0))):
        raise InputError(f"{source} is not a label map: values must be whole numbers 0-255 (found {array.min()} to "
                         f"{array.max()}, {array.dtype})")
    return array.astype(np.uint8)


def _mismatch(what: str, labelmap: Geometry, ct: Geometry) -> InputError:
    return InputError(f"the label map is not on the grid of {what}: label map {labelmap.describe()}; CT "
                      f"{ct.describe()}. Contour this CT, or resample the label map onto it first")


def export_labelmap(labelmap: sitk.Image, table: LabelTable, ct_source: Path, out_dir: Path, *,
                    formats: tuple[str, ...] = FORMATS, algorithm: Algorithm | None, series_uid: str | None = None,
                    patient_name: str | None = None, patient_id: str | None = None, source: str = "the label map",
                    events: Events | None = None, generation: str | None = None, holes: str = "separate",
                    replace: bool = True, keep: Iterable[str | Path] = ()) -> ExportResult:
    """Write ``labelmap`` (on ``ct_source``'s grid) in ``formats`` to ``out_dir``, and ``export.json``.

    ``out_dir`` then holds this result only: once the inputs are checked, the files an earlier run wrote there are
    removed, and the files written are removed again if writing fails (:func:`~separeg.runtime.outdir.begin_result`).

    Args:
        labelmap: the label map image (geometry checked against the CT).
        table: its organs.
        ct_source: DICOM series folder or CT volume file.
        out_dir: output folder.
        formats: subset of :data:`FORMATS`.
        algorithm: the model that made the label map, recorded in RTSTRUCT, SEG and the manifest; None: no model.
        series_uid: the series of a DICOM folder holding several.
        patient_name, patient_id: for a CT file (not allowed with a DICOM series, whose own are kept).
        source: how messages name the label map.
        events: progress and warnings.
        generation: contour generation type (default AUTOMATIC with a model, MANUAL without).
        holes: RTSTRUCT hole convention ("separate" or "keyhole").
        replace: False when the caller has begun the result already (``contour``, which writes the label map first).
        keep: further inputs that may lie in ``out_dir`` and must not be removed (the label map file, its table).

    Returns:
        the outputs; SEG is skipped (with a warning) for an empty label map.

    Raises:
        InputError: label map and CT on different grids, unknown label values, patient identifiers with a DICOM CT;
            VolumeReadError, SeriesError: unreadable CT.
    """
    from separeg.io.dicom_ct import generation_type, read_ct_series

    events = events or Events()
    kind = generation_type(algorithm, generation)
    algorithm = algorithm if kind != "MANUAL" else None  # manual contours name no algorithm
    ct_source, out_dir = Path(ct_source), Path(out_dir)
    if not ct_source.exists():
        raise InputError(f"the CT {ct_source} does not exist; give the CT the label map was made on (a DICOM series "
                         "folder or a NIfTI/NRRD/MHA file)")
    array = _labelmap_array(labelmap, source)
    present = table.present_in(array, str(source), " (--labels)")
    ct: CtSeries | None = None
    ct_image = None
    if ct_source.is_dir():
        if patient_name or patient_id:
            raise InputError("--patient-name/--patient-id are for a CT given as a NIfTI/NRRD/MHA file; the exports of "
                             "a DICOM CT keep its own patient and study")
        ct = read_ct_series(ct_source, series_uid=series_uid)
        if not Geometry.of(labelmap).matches(ct.geometry):
            raise _mismatch(f"the CT series {ct.series_instance_uid}", Geometry.of(labelmap), ct.geometry)
    else:
        ct_image = read_volume(ct_source)
        if not Geometry.of(labelmap).matches(Geometry.of(ct_image)):
            raise _mismatch(str(ct_source), Geometry.of(labelmap), Geometry.of(ct_image))
    source_ct = ct if ct is not None else ct_image
    if not replace:  # the caller began the result (contour, which wrote the label map first)
        return _write_exports(labelmap, array, present, table, source_ct, ct_source, out_dir, formats, algorithm,
                              kind, holes, patient_name, patient_id, events)
    begin_result(out_dir, keep=(ct_source, *keep))
    try:
        result = _write_exports(labelmap, array, present, table, source_ct, ct_source, out_dir, formats, algorithm,
                                kind, holes, patient_name, patient_id, events)
    except BaseException:
        abandon_result(out_dir)  # no half-written result
        raise
    finish_result(out_dir)
    return result


def _dicom_copy(labelmap: sitk.Image, ct_image: sitk.Image, ct_source: Path, out_dir: Path,
                patient_name: str | None, patient_id: str | None, events: Events) -> CtSeries:
    """Write a CT volume file as a new DICOM series in ``out_dir/ct_dicom`` for RTSTRUCT/SEG to reference."""
    from separeg.io.dicom_ct import read_ct_series
    from separeg.io.dicom_write import dicom_grid, write_ct_series

    events.log(f"{ct_source.name} is not DICOM: writing it as a new DICOM CT series in "
               f"{out_dir / CT_DICOM_DIR} for the RTSTRUCT/SEG to reference", stage="export")
    written = write_ct_series(ct_image, out_dir / CT_DICOM_DIR, patient_name=patient_name, patient_id=patient_id)
    ct = read_ct_series(written.folder)
    if not written.exact:
        events.warning("the CT's values are not whole HU in the int16 range; the DICOM copy is rounded",
                       stage="export")
    assert Geometry.of(dicom_grid(labelmap)).matches(ct.geometry), "the written CT series is off the label map's grid"
    return ct


def _write_exports(labelmap: sitk.Image, array: np.ndarray, present: list, table: LabelTable,
                   source_ct: CtSeries | sitk.Image, ct_source: Path, out_dir: Path, formats: tuple[str, ...],
                   algorithm: Algorithm | None, kind: str, holes: str, patient_name: str | None,
                   patient_id: str | None, events: Events) -> ExportResult:
    """The files of :func:`export_labelmap`, after its checks: the DICOM copy of a CT file (``source_ct`` is the
    DICOM series read, or the CT volume), each format, the manifest."""
    import SimpleITK as sitk

    from separeg.io.dicom_ct import CtSeries
    from separeg.io.dicom_write import dicom_grid
    from separeg.rt.rtstruct_write import HOLE_NOTES
    from separeg.rt.seg import segment_terminology

    description = SERIES_DESCRIPTIONS[kind]
    outputs: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    ct = source_ct if isinstance(source_ct, CtSeries) else None
    ct_written = ct is None and any(f != "nifti" for f in formats)
    if ct_written:
        start = time.perf_counter()
        ct = _dicom_copy(labelmap, source_ct, ct_source, out_dir, patient_name, patient_id, events)
        outputs["ct_dicom"], seconds["ct_dicom"] = ct.folder, time.perf_counter() - start
    dicom_array = sitk.GetArrayFromImage(dicom_grid(labelmap)).astype(np.uint8) if ct_written else array
    for label in present:
        if not segment_terminology(label).coded:
            events.warning(f"{label.name!r} has no standard code; its SEG segment is coded as generic tissue",
                           stage="export")
    steps = len(formats)
    for step, fmt in enumerate(formats, start=1):
        start = time.perf_counter()
        if fmt == "nifti":
            outputs[fmt] = write_volume(_uint8_image(labelmap, array), out_dir / NIFTI_FILE)
        elif fmt == "seg" and not present:
            skipped[fmt] = "the label map is empty"
            events.warning("no organ in the label map: DICOM SEG skipped (it cannot hold empty segments)",
                           stage="export")
        elif fmt == "seg":
            from separeg.rt.seg import write_seg

            outputs[fmt] = write_seg(out_dir / SEG_FILE, dicom_array, table, ct, algorithm=algorithm,
                                     series_description=description, generation=kind)
        else:
            from separeg.rt.rtstruct_write import write_rtstruct

            outputs[fmt] = write_rtstruct(out_dir / RTSTRUCT_FILE, dicom_array, table, ct, algorithm=algorithm,
                                          series_description=description, generation=kind, holes=holes)
        seconds[fmt] = time.perf_counter() - start
        events.progress("export", step, steps, msg=fmt)
    manifest = {
        **({"notice": "Automatic contours: review and correct every structure before clinical use."}
           if kind == "AUTOMATIC" else {}),
        "generation": kind,
        "outputs": {name: path.name for name, path in outputs.items()},
        "skipped": skipped,
        "ct": str(ct_source),
        "ct_dicom_written": ct_written,
        "referenced_series_instance_uid": ct.series_instance_uid if ct else None,
        "study_instance_uid": ct.study_instance_uid if ct else None,
        "frame_of_reference_uid": ct.frame_of_reference_uid if ct else None,
        "algorithm": ({"name": algorithm.name, "version": algorithm.version, "bundle_sha256": algorithm.bundle_hash}
                      if algorithm is not None else None),
        "rtstruct_holes": {"convention": holes, "note": HOLE_NOTES[holes]} if "rtstruct" in outputs else None,
        "ct_dicom_uids": ("deterministic: the same CT written again gives identical files under the same UIDs"
                          if ct_written else None),
        "labels": [{**label.to_dict(), "present": label in present} for label in table],
        "seconds": {name: round(s, 3) for name, s in seconds.items()},
    }
    path = write_json(manifest, out_dir / MANIFEST_FILE)
    return ExportResult(outputs, path, manifest["referenced_series_instance_uid"], algorithm, skipped, seconds)


def _uint8_image(like: sitk.Image, array: np.ndarray) -> sitk.Image:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def run_export(job: ExportJob, events: Events | None = None) -> ExportResult:
    """Export ``job.labelmap`` on ``job.ct``; see the module docstring.

    Raises:
        InputError: missing inputs, no label table, unknown label values, a label map on another grid; an output
            folder that is a file or cannot be written (checked before anything is read);
        RunLockedError: another run is writing into the output folder;
            VolumeReadError, SeriesError: unreadable label map or CT.
    """
    events = events or Events()
    labelmap_path = Path(job.labelmap)
    if not labelmap_path.is_file():
        raise InputError(f"the label map {labelmap_path} does not exist" +
                         (" (it is a folder; give the label map file)" if labelmap_path.is_dir() else ""))
    beside = labelmap_path.parent / DESCRIPTION_FILE
    labels_path = Path(job.labels) if job.labels else beside
    if not labels_path.is_file():
        raise InputError(f"no label table for {labelmap_path}: {beside} does not exist; give one with --labels "
                         "(segmentation.json of `separeg contour`, labels.json or a CSV value,name table)")
    table = load_label_table(labels_path)
    description = _read_description(labels_path) if labels_path.suffix.lower() == ".json" else None
    if not (description or {}).get("model") and beside.is_file():
        description = _read_description(beside)
    algorithm = algorithm_from_description(description)
    check_output_folder(job.out_dir)
    labelmap = read_volume(labelmap_path)
    with output_folder(job.out_dir):  # checked up front, locked while written, removed again if left empty
        result = export_labelmap(labelmap, table, Path(job.ct), Path(job.out_dir), formats=job.formats,
                                 algorithm=algorithm, series_uid=job.series_uid, patient_name=job.patient_name,
                                 patient_id=job.patient_id, source=str(labelmap_path), events=events,
                                 generation=job.generation, holes=job.holes, keep=(labelmap_path, labels_path, beside))
    written = ", ".join(path.name for path in result.outputs.values())
    events.done(f"wrote {written} in {job.out_dir}; manifest {result.manifest.name}")
    return result
