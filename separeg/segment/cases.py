"""Labelled training cases: a CT and its organ label map on the same grid.

Cases are found by naming convention or as DICOM CT series with the RTSTRUCT drawn on them (:func:`find_cases`), or
listed in a JSON/CSV file (:func:`read_case_list`), and read with :func:`load_case`, which checks the grid and the
label values against a :class:`LabelTable` (an RTSTRUCT's ROIs are matched to the table by name, see
:mod:`separeg.rt.rtstruct`).

Partial labels: a case's label map is trusted only for the organs it contains. An organ of the table that has no
voxel in a case was *not annotated* there; its voxels are 0 like the background, but they are unknown, not
background (OpenKBP contours 7 organs, and only 7 of its 50 patients have all 7; DESIGN §7). Fine-tuning must
leave the organs outside :attr:`LoadedCase.annotated` out of the loss for that case.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from separeg.io.dicom_series import _looks_like_dicom
from separeg.io.volumes import VOLUME_SUFFIXES
from separeg.runtime.errors import InputError, read_text_table

__all__ = ["IMAGE_SUFFIX", "LABEL_SUFFIXES", "FOLDER_PAIRS", "Case", "find_cases", "read_case_list"]

# <case>_ct.<ext> beside <case>_oar.<ext> (OpenKBP), <case>_seg, <case>_label or <case>_labels; any volume ext.
IMAGE_SUFFIX = "_ct"
LABEL_SUFFIXES = ("_oar", "_seg", "_label", "_labels")
# images/<case>.<ext> + labels/<case>.<ext>, and nnU-Net's imagesTr/<case>_0000.<ext> + labelsTr/<case>.<ext>.
FOLDER_PAIRS = (("images", "labels"), ("imagestr", "labelstr"))
NNUNET_CHANNEL = "_0000"
_NNUNET_CHANNEL_RE = re.compile(r"_(\d{4})$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """A labelled case: its name (unique in a data set), the image volume and the label map.

    A DICOM case has the folder of its CT series as ``image``, the RTSTRUCT file as ``labels`` and the series'
    SeriesInstanceUID as ``series_uid`` (None: the folder's only image series). A multichannel case (co-registered
    MRI sequences, CT + PET) lists its further volumes in ``channels``; the label map lies on ``image``'s grid.
    """

    name: str
    image: Path
    labels: Path
    series_uid: str | None = None
    channels: tuple[Path, ...] = ()  # further co-registered volumes (input channels 2, 3, ...); image is channel 1

    @property
    def images(self) -> tuple[Path, ...]:
        """Every input volume, in channel order."""
        return (self.image, *self.channels)

    @property
    def is_dicom(self) -> bool:
        """True when the labels are an RTSTRUCT (a DICOM file) rather than a label map volume."""
        return self.series_uid is not None or (_split_name(self.labels.name) is None and _looks_like_dicom(self.labels))


def _split_name(name: str) -> tuple[str, str] | None:
    """``(stem, ext)`` of a volume file name, or None when it is not one."""
    lower = name.lower()
    for ext in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return None


def _files(folder: Path) -> list[Path]:
    """Files under ``folder``, recursively, sorted; hidden files and folders skipped."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def find_cases(folder: str | Path) -> tuple[list[Case], list[Path]]:
    """Pair images with label maps by naming convention, in ``folder`` and its subfolders.

    Conventions (suffixes and extensions matched ignoring case; extensions: NIfTI, NRRD, MHA; the image and its
    label map may have different extensions):

    - ``<case>_ct.<ext>`` beside ``<case>_oar.<ext>``, ``<case>_seg``, ``<case>_label`` or ``<case>_labels``;
    - ``images/<case>.<ext>`` with ``labels/<case>.<ext>`` (the two folders side by side), and nnU-Net's
      ``imagesTr/<case>_0000.<ext>`` with ``labelsTr/<case>.<ext>``;
    - DICOM: an image series (CT, MR, PET) with the one RTSTRUCT that references it (by SeriesInstanceUID), anywhere
      in the tree; the case is named by PatientID (plus the series folder's name when a patient has several).

    Other files are ignored. Volumes and DICOM series that pair with nothing (a CT without labels, labels without a
    CT) are returned, so that the caller can report them; they are not an error as long as at least one case is
    found.

    Args:
        folder: the data folder.

    Returns:
        ``(cases, unpaired)``: cases sorted by name, and the unpaired volume files, sorted.

    Raises:
        InputError: ``folder`` is not a folder; no case found (the message says what was found and the
            conventions); a CT with two label maps or two RTSTRUCTs; two cases with the same name.
    """
    from separeg.rt.dicom_cases import find_dicom_cases

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder that holds the labelled cases")
    every = _files(folder)
    files = [p for p in every if _split_name(p.name)]
    stems_by_dir: dict[tuple[Path, str], list[Path]] = {}
    for p in files:
        stem, _ = _split_name(p.name)  # type: ignore[misc]
        stems_by_dir.setdefault((p.parent, stem.lower()), []).append(p)
    cases: list[Case] = []
    used: set[Path] = set()
    pair_dirs: dict[Path, Path | None] = {}

    for p in files:
        stem, _ = _split_name(p.name)  # type: ignore[misc]
        lower = stem.lower()
        labels: list[Path] = []
        name = None
        if p.parent not in pair_dirs:
            pair_dirs[p.parent] = _folder_pair(p.parent)
        pair_dir = pair_dirs[p.parent]
        channels: list[Path] = []
        if pair_dir is not None:
            channel = _NNUNET_CHANNEL_RE.search(stem)
            if channel and channel.group(1) != NNUNET_CHANNEL[1:]:
                continue  # a further channel: collected with its case's _0000
            name = stem[: channel.start()] if channel else stem
            labels = stems_by_dir.get((pair_dir, name.lower()), [])
            channels = _further_channels(stems_by_dir, p.parent, name) if channel else []
        elif lower.endswith(IMAGE_SUFFIX) and len(stem) > len(IMAGE_SUFFIX):
            name = stem[: -len(IMAGE_SUFFIX)]
            for suffix in LABEL_SUFFIXES:
                labels += stems_by_dir.get((p.parent, (name + suffix).lower()), [])
        if name is None or not labels:
            continue
        if len(labels) > 1:
            raise InputError(f"{p} has {len(labels)} label maps: {', '.join(str(q) for q in labels)}; keep one "
                             "(or list the cases in a case list file)")
        cases.append(Case(name, p, labels[0], channels=tuple(channels)))
        used.update((p, labels[0], *channels))

    dicom_cases, dicom_unpaired = find_dicom_cases(p for p in every if not _split_name(p.name))
    cases += [Case(c.name, c.ct_folder, c.rtstruct, c.series_uid) for c in dicom_cases]
    _refuse_duplicate_names(cases, str(folder))
    unpaired = sorted([p for p in files if p not in used] + dicom_unpaired)
    if not cases:
        found = f"{len(files)} volume file(s), none paired (e.g. {files[0].name})" if files else "no volume files"
        if dicom_unpaired:
            found += f", {len(dicom_unpaired)} DICOM series or RTSTRUCT(s) without a partner"
            found += _unpaired_rtstruct_detail(dicom_unpaired)
        raise InputError(
            f"{folder} holds no labelled case ({found}). Name each CT <case>_ct.nii.gz and its label map "
            f"<case>_oar.nii.gz (or {', '.join(LABEL_SUFFIXES[1:])}), put them in images/ and labels/ folders under "
            "the same names, put each DICOM CT series with the RTSTRUCT drawn on it, or list the cases in a JSON or "
            "CSV file"
        )
    return sorted(cases, key=lambda c: c.name), unpaired


def _further_channels(stems_by_dir: dict[tuple[Path, str], list[Path]], folder: Path, name: str) -> list[Path]:
    """nnU-Net's ``<case>_0001``, ``<case>_0002``, ... beside ``<case>_0000``, in order, up to the first gap."""
    found = []
    for index in range(1, 10_000):
        paths = stems_by_dir.get((folder, f"{name}_{index:04d}".lower()), [])
        if len(paths) != 1:
            if len(paths) > 1:
                raise InputError(f"case {name}: channel {index:04d} has {len(paths)} files: "
                                 f"{', '.join(str(q) for q in paths)}; keep one")
            return found
        found.append(paths[0])
    return found


def _unpaired_rtstruct_detail(unpaired: list[Path]) -> str:
    """Which series the first unpaired RTSTRUCT was drawn on: the usual reason a DICOM case is not found."""
    import pydicom

    from separeg.io.dicom_series import _referenced_series

    rtstruct = next((p for p in unpaired if p.is_file()), None)
    if rtstruct is None:
        return ""
    ds = pydicom.dcmread(rtstruct, stop_before_pixels=True, specific_tags=["ReferencedFrameOfReferenceSequence"])
    series = ", ".join(sorted(_referenced_series(ds))) or "no series"
    return (f"; e.g. the RTSTRUCT {rtstruct.name} references the series {series}, not in this folder: put each "
            "RTSTRUCT beside the CT series it was drawn on")


def _folder_pair(images_dir: Path) -> Path | None:
    """The labels folder beside ``images_dir`` when ``images_dir`` is an images folder of :data:`FOLDER_PAIRS`."""
    for images, labels in FOLDER_PAIRS:
        if images_dir.name.lower() == images:
            for sibling in sorted(images_dir.parent.iterdir()):
                if sibling.is_dir() and sibling.name.lower() == labels:
                    return sibling
    return None


def _refuse_duplicate_names(cases: list[Case], source: str) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.name, case)
        if other is not case:
            raise InputError(f"{source}: two cases are named {case.name!r} ({other.image} and {case.image}); "
                             "rename one so that every case name is unique")


def read_case_list(path: str | Path) -> list[Case]:
    """Read cases listed in a JSON or CSV file.

    JSON: a list of ``{"name": ..., "image": ..., "labels": ...}`` objects (or ``{"cases": [...]}``); CSV: a header
    with the columns ``name,image,labels``. A multichannel case gives its co-registered volumes in channel order as
    ``"image": [...]`` (JSON) or separated by ``;`` (CSV); the label map lies on the first one's grid.
    Relative paths are taken from the list file's folder. ``name`` may be
    left out: the image's file name without extension and ``_ct`` is used.

    Args:
        path: the list file (``.json`` or ``.csv``).

    Returns:
        The cases, in the file's order.

    Raises:
        InputError: the file is unreadable or malformed; an entry lacks ``image`` or ``labels``; a listed file
            does not exist (all missing files are named); two cases have the same name.
    """
    path = Path(path)
    text = read_text_table(path, "case list")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"case list {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") \
                from exc
        rows = data.get("cases") if isinstance(data, Mapping) else data
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise InputError(f"case list {path} must be a JSON list of {{\"name\", \"image\", \"labels\"}} objects")
    elif suffix == ".csv":
        reader = csv.DictReader([line for line in text.splitlines() if line.strip()])
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "image" not in fields or "labels" not in fields:
            raise InputError(f"case list {path}: the header must name the columns name,image,labels "
                             f"(found {', '.join(fields) or 'nothing'})")
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    else:
        raise InputError(f"case list {path} has an unknown format; use .json or .csv with name,image,labels")

    base = path.parent
    cases: list[Case] = []
    missing: list[str] = []
    for i, row in enumerate(rows, start=1):
        image, labels = row.get("image"), row.get("labels")
        if not image or not labels:
            raise InputError(f"case list {path}: entry {i} has no {'image' if not image else 'labels'}; every case "
                             "needs an image and a label map")
        # Several co-registered input volumes: a JSON list, or ';'-separated in CSV.
        images = image if isinstance(image, list) else [part for part in str(image).split(";") if part.strip()]
        image_paths = [base / Path(str(part).strip()).expanduser() for part in images]
        labels_path = base / Path(str(labels)).expanduser()
        name = str(row.get("name") or "").strip() or _case_name(image_paths[0])
        missing += [f"{name}: {p}" for p in (*image_paths, labels_path) if not p.exists()]
        cases.append(Case(name, image_paths[0], labels_path, channels=tuple(image_paths[1:])))
    if missing:
        shown = "; ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"case list {path} names files that do not exist: {shown}. Paths are taken from the "
                         "list's folder; fix them or move the files")
    if not cases:
        raise InputError(f"case list {path} lists no case")
    _refuse_duplicate_names(cases, f"case list {path}")
    return cases


def _case_name(image: Path) -> str:
    split = _split_name(image.name)
    stem = split[0] if split else image.name
    return stem[: -len(IMAGE_SUFFIX)] if stem.lower().endswith(IMAGE_SUFFIX) and len(stem) > 3 else stem


