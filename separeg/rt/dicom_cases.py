"""DICOM training cases: CT series paired with the RTSTRUCT that references them, found in a folder of DICOM files,
read into a label map with the user's ROI name -> TG-263 synonyms."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from separeg.io.dicom_ct import (
    read_ct_series,
)
from separeg.io.dicom_series import IMAGE_MODALITIES, _referenced_series, index_dicom_files
from separeg.rt.labels import LabelTable
from separeg.rt.organs import normalise_name, to_tg263
from separeg.rt.rtstruct import _normalise, read_rtstruct
from separeg.runtime.errors import InputError, read_text_table

__all__ = ["DicomCase", "load_synonyms", "find_dicom_cases", "load_dicom_case"]


def load_synonyms(path: str | Path) -> dict[str, str]:
    """Read a user synonym table: JSON ``{"their name": "TG263name", ...}`` or CSV with two columns (their name,
    TG-263 or label name; an optional header such as ``name,tg263``; ``#`` comment lines).

    Returns:
        their name -> target name (TG-263 spelling when the target is a registry name).

    Raises:
        InputError: missing or unreadable file, malformed content, a name mapped to two different targets.
    """
    path = Path(path)
    text = read_text_table(path, "synonym table")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"synonym table {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise InputError(f"synonym table {path} must be a JSON object {{\"their name\": \"TG263name\", ...}}")
        rows = list(data.items())
    else:
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        delimiter = max(",;\t", key=lines[0].count) if lines else ","
        rows = []
        for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
            if len(row) != 2:
                raise InputError(f"synonym table {path}: row {number} has {len(row)} fields; each row is "
                                 "'their name,TG263name'")
            if number == 1 and _normalise(row[1]) in {"tg263", "tg263name", "target", "label", "to", "organ"}:
                continue
            rows.append((row[0], row[1]))
    synonyms: dict[str, str] = {}
    for theirs, target in rows:
        theirs, target = theirs.strip(), target.strip()
        if not theirs or not target:
            raise InputError(f"synonym table {path}: an entry has an empty name ({theirs!r} -> {target!r})")
        target = to_tg263(target) or target
        if not normalise_name(theirs):
            raise InputError(f"synonym table {path}: the name {theirs!r} has no letter or digit; names are matched "
                             "ignoring case, spaces and punctuation, so it would match nothing")
        same = next((k for k in synonyms if _normalise(k) == _normalise(theirs)), theirs)
        if synonyms.setdefault(same, target) != target:
            also = f" ({same!r} and {theirs!r} are the same name ignoring case and punctuation)" if same != theirs \
                else ""
            raise InputError(f"synonym table {path} maps {theirs!r} to both {synonyms[same]!r} and {target!r}{also}")
    return synonyms


@dataclass(frozen=True)
class DicomCase:
    """A CT series and the RTSTRUCT drawn on it, found by :func:`find_dicom_cases`."""

    name: str
    ct_folder: Path
    series_uid: str
    rtstruct: Path
    files: tuple[Path, ...] = field(default=(), compare=False, repr=False)


def find_dicom_cases(files: Iterable[Path]) -> tuple[list[DicomCase], list[Path]]:
    """Pair image series with the RTSTRUCTs that reference them (by SeriesInstanceUID).

    Args:
        files: candidate files (non-DICOM files are ignored).

    Returns:
        ``(cases, unpaired)``: cases named by PatientID (with the series folder's name when a patient has several),
        sorted by name; unpaired: folders of image series without an RTSTRUCT and RTSTRUCTs whose series is absent.

    Raises:
        InputError: an image series referenced by two RTSTRUCT files (keep one).
    """
    import pydicom

    series, _ = index_dicom_files(files)
    images = {uid: s for uid, s in series.items() if s.modality in IMAGE_MODALITIES}
    structures: dict[str, list[Path]] = {}
    unpaired: list[Path] = []
    for entry in series.values():
        if entry.modality != "RTSTRUCT":
            continue
        for path in entry.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ReferencedFrameOfReferenceSequence"])
            targets = [uid for uid in _referenced_series(ds) if uid in images]
            if not targets:
                unpaired.append(path)
            for uid in targets:
                structures.setdefault(uid, []).append(path)
    found = []
    for uid, image in images.items():
        if uid not in structures:
            unpaired.append(image.folder)
            continue
        if len(structures[uid]) > 1:
            raise InputError(f"the image series {uid} in {image.folder} has {len(structures[uid])} RTSTRUCTs: "
                             f"{', '.join(str(p) for p in structures[uid])}; keep one (move the others out)")
        header = pydicom.dcmread(image.files[0], stop_before_pixels=True, specific_tags=["PatientID"])
        found.append((str(header.get("PatientID", "") or image.folder.name), image, structures[uid][0]))
    counts: dict[str, int] = {}
    for patient, _, _ in found:
        counts[patient] = counts.get(patient, 0) + 1
    cases = [DicomCase(patient if counts[patient] == 1 else f"{patient}_{image.folder.name}", image.folder,
                       image.series_uid, rtstruct, tuple(image.files)) for patient, image, rtstruct in found]
    return sorted(cases, key=lambda c: c.name), sorted(unpaired)


def load_dicom_case(ct_folder: str | Path, rtstruct: str | Path, table: LabelTable, *, series_uid: str | None = None,
                    synonyms: Mapping[str, str] | None = None):
    """Read a CT series and rasterise its RTSTRUCT into ``table``'s label map.

    Returns:
        ``(image, labelmap, annotated, unmatched, skipped)``: the SimpleITK image, the ``(z, y, x)`` label map on its
        grid, the label values an ROI was found for (the others were not contoured: not annotated), the ROI names
        that matched no label, and the ROIs left out because they hold no voxel on this CT (``"name: why"``).

    Raises:
        InputError, SeriesError: from :func:`~separeg.io.dicom_ct.read_ct_series` and :func:`read_rtstruct`.
    """
    ct = read_ct_series(ct_folder, series_uid=series_uid)
    rois = read_rtstruct(rtstruct, ct)
    match = rois.match(table, synonyms=synonyms)
    return ct.image(), match.labelmap, frozenset(match.matched), match.unmatched, list(rois.skipped)
