"""Archive scan: find every usable volume under a folder and say why the rest was skipped.

The scan never stops on one bad item: each file or series becomes a :class:`ManifestEntry` with a
status (``ok``, ``skipped`` or ``error``) and a reason. Symbolic links are listed too: a link to a file is scanned
like the file, a broken link or a link loop is an error, a link to a folder is listed and not followed (it could
lead back into the archive). The same volume reached twice (a copy, a symlinked file) is used once: the others are
skipped as duplicates of it (same content hash), so it is not pretrained twice. The manifest is saved as JSON and
printed as a table; its hash (over the usable volumes' content hashes) identifies the data a model was trained on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from separeg.io.dicom_series import DicomSeries, index_dicom_files, read_dicom_series
from separeg.io.volumes import check_volume, content_hash, is_volume_file, read_volume
from separeg.registry import MODALITIES
from separeg.runtime.atomic import write_json
from separeg.runtime.errors import ArchiveError, SepaRegError
from separeg.runtime.events import Events

__all__ = ["ManifestEntry", "Manifest", "scan_archive", "format_table", "MODALITIES"]

# A CT holds air; a volume whose lowest value is above this is not in Hounsfield units.
CT_AIR_HU = -500.0
# Integer volumes with values in 0..MAX_LABEL and few distinct values are label maps, not images.
MAX_LABEL = 255
MAX_LABEL_VALUES = 128
IMAGE_KINDS = ("volume", "dicom-series")


@dataclass
class ManifestEntry:
    """One item found by the scan. ``path`` is relative to the scanned root; sizes are x, y, z."""

    path: str
    kind: str  # volume | dicom-series | rtstruct | seg | labelmap | link | other
    status: str  # ok | skipped | error
    reason: str = ""
    modality: str | None = None
    size: list[int] | None = None
    spacing: list[float] | None = None
    intensity_range: list[float] | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None
    n_files: int = 1
    content_hash: str | None = None
    annotations: list[str] = field(default_factory=list)  # images: RTSTRUCT/SEG entries that annotate them
    references: list[str] = field(default_factory=list)  # RTSTRUCT/SEG: the image entries they annotate

    @property
    def usable(self) -> bool:
        return self.status == "ok" and self.kind in IMAGE_KINDS

    def read(self, root: str | Path):
        """Read this image entry of the archive at ``root`` (a folder holding several series: by its UID)."""
        # The scan labels such a series "folder [CT 1234...]"; the file system knows only the folder.
        return read_volume(Path(root) / self.path.split(" [", 1)[0], series_uid=self.series_uid)


@dataclass
class Manifest:
    root: str
    modality: str
    entries: list[ManifestEntry]

    def usable(self) -> list[ManifestEntry]:
        return [e for e in self.entries if e.usable]

    @property
    def hash(self) -> str:
        """Identifies the set of usable volumes (order and file names do not matter)."""
        digest = hashlib.sha256()
        for h in sorted(e.content_hash or "" for e in self.usable()):
            digest.update(h.encode())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {"root": self.root, "modality": self.modality, "hash": self.hash,
                "counts": self.counts(), "entries": [asdict(e) for e in self.entries]}

    def counts(self) -> dict[str, int]:
        counts = {"usable": len(self.usable())}
        for e in self.entries:
            counts[e.status] = counts.get(e.status, 0) + 1
        return counts

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["root"], data["modality"], [ManifestEntry(**e) for e in data["entries"]])

    def require_usable(self) -> list[ManifestEntry]:
        """The usable entries, or an :class:`ArchiveError` that says what was found instead."""
        usable = self.usable()
        if usable:
            return usable
        found = ", ".join(f"{n} {s}" for s, n in self.counts().items() if s != "usable")
        wanted = "image volumes" if self.modality == "any" else f"{self.modality} volumes"
        raise ArchiveError(f"no usable {wanted} in {self.root} ({found}); see the reasons in the table above")


def _describe(image, entry: ManifestEntry) -> None:
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(image)
    entry.size = list(image.GetSize())
    entry.spacing = [round(s, 5) for s in image.GetSpacing()]
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ArchiveError("the volume contains NaN or infinite voxels")
    entry.intensity_range = [lo, hi]
    entry.content_hash = content_hash(image)


def _looks_like_labelmap(image) -> int | None:
    """Number of distinct values if the volume looks like a label map, else None."""
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > MAX_LABEL:
        return None
    n = int(np.count_nonzero(np.bincount(arr.ravel().astype(np.int64), minlength=1)))
    return n if n <= MAX_LABEL_VALUES else None


def _classify_intensity(entry: ManifestEntry, modality: str) -> None:
    """Files carry no modality tag: tell CT from other images by the presence of air (HU)."""
    lo, hi = entry.intensity_range
    ct_like = lo <= CT_AIR_HU
    entry.modality = "CT" if ct_like else None
    if modality == "CT" and not ct_like:
        entry.status, entry.reason = "skipped", (
            f"intensities {lo:g}..{hi:g} do not look like CT in HU (no air below {CT_AIR_HU:g}); "
            "for another modality, scan with --modality MR, PT or any")
    elif modality in ("MR", "PT") and ct_like:
        entry.status, entry.reason = "skipped", f"intensities {lo:g}..{hi:g} look like CT in HU, not {modality}"
    elif modality != "CT" and not ct_like:
        entry.modality = modality if modality != "any" else None


def _scan_file(path: Path, rel: str, modality: str) -> ManifestEntry:
    entry = ManifestEntry(path=rel, kind="volume", status="ok")
    try:
        image = read_volume(path)
        labels = _looks_like_labelmap(image)
        _describe(image, entry)
        if labels is not None:
            entry.kind, entry.status = "labelmap", "skipped"
            entry.reason = f"label map ({labels} distinct values), not an image"
        else:
            _classify_intensity(entry, modality)
    except SepaRegError as exc:
        entry.status, entry.reason = "error", str(exc)
    return entry


def _scan_series(series: DicomSeries, rel: str, modality: str) -> ManifestEntry:
    kind = {"RTSTRUCT": "rtstruct", "SEG": "seg"}.get(series.modality, "dicom-series")
    entry = ManifestEntry(path=rel, kind=kind, status="ok", modality=series.modality or None,
                          series_uid=series.series_uid, frame_of_reference_uid=series.frame_of_reference_uid,
                          n_files=len(series.files))
    if kind != "dicom-series":
        return entry
    if modality != "any" and series.modality != modality:
        entry.status, entry.reason = "skipped", f"{series.modality or 'unknown'} series; this scan is for {modality}"
        return entry
    try:
        image = read_dicom_series(series)
        check_volume(image, rel)
        _describe(image, entry)
    except SepaRegError as exc:
        entry.status, entry.reason = "error", str(exc)
    return entry


def _pair_annotations(entries: list[ManifestEntry]) -> None:
    """Link each RTSTRUCT/SEG to the image series it references (by series UID, else frame of reference)."""
    images = [e for e in entries if e.kind == "dicom-series"]
    for ann in (e for e in entries if e.kind in ("rtstruct", "seg")):
        targets = [e for e in images if e.series_uid in set(ann.references)]
        if not targets and ann.frame_of_reference_uid:
            targets = [e for e in images if e.frame_of_reference_uid == ann.frame_of_reference_uid]
        ann.references = [t.path for t in targets]
        for t in targets:
            t.annotations.append(ann.path)
        if not targets:
            ann.status, ann.reason = "skipped", "references no image series found in this folder"
        else:
            ann.status, ann.reason = "skipped", f"annotation of {', '.join(ann.references)}"


def _link_entries(links: list[Path], root: Path) -> list[ManifestEntry]:
    """Entries for symbolic links that are not files: broken, looping, or to a folder (not followed)."""
    entries = []
    for link in links:
        rel = link.relative_to(root).as_posix()
        target = os.readlink(link)
        try:
            resolved = link.resolve(strict=True)
        except RuntimeError:  # Python 3.11 reports a loop this way
            resolved = None
            reason = f"symbolic link loop ({rel} -> {target} leads back to itself)"
        except OSError as exc:
            resolved = None
            reason = (f"symbolic link loop ({rel} -> {target} leads back to itself)" if exc.errno == errno.ELOOP
                      else f"broken symbolic link: {rel} -> {target} does not exist")
        if resolved is None:
            entries.append(ManifestEntry(path=rel, kind="link", status="error", reason=reason))
        elif resolved.is_dir():
            inside = resolved == root.resolve() or root.resolve() in resolved.parents
            reason = (f"symbolic link to {target}, a folder of this archive (scanned already): not followed" if inside
                      else f"symbolic link to the folder {resolved}: not followed (scan that folder itself)")
            entries.append(ManifestEntry(path=rel, kind="link", status="skipped", reason=reason))
        else:
            entries.append(ManifestEntry(path=rel, kind="link", status="skipped",
                                         reason=f"symbolic link to {target}, not a regular file"))
    return entries


def _skip_duplicates(entries: list[ManifestEntry], root: Path) -> None:
    """Keep one usable entry per content hash (a real file before a symlink, then the first path); skip the rest."""
    first: dict[str, ManifestEntry] = {}

    def order(entry: ManifestEntry) -> tuple[bool, str]:
        return (root / entry.path.split(" [", 1)[0]).is_symlink(), entry.path

    for entry in sorted((e for e in entries if e.usable and e.content_hash), key=order):
        kept = first.setdefault(entry.content_hash, entry)
        if kept is not entry:
            entry.status, entry.reason = "skipped", f"duplicate of {kept.path} (the same volume, by content hash)"


def scan_archive(root: str | Path, *, modality: str = "CT", events: Events | None = None,
                 workers: int | None = None) -> Manifest:
    """Scan ``root`` recursively for volume files and DICOM series.

    Args:
        root: the archive folder.
        modality: ``CT`` (default), ``MR``, ``PT`` or ``any``: which images count as usable.
        events: progress sink (stage ``scan``).
        workers: threads reading volumes (SimpleITK and pydicom release the GIL for I/O); default: CPU count.

    Raises:
        ArchiveError: ``root`` is missing, not a folder, or holds no files.
    """
    if modality not in MODALITIES:
        raise ArchiveError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    root = Path(root)
    if not root.exists():
        raise ArchiveError(f"{root} does not exist")
    if not root.is_dir():
        raise ArchiveError(f"{root} is not a folder; give the folder that holds the scans")
    events = events or Events()
    found = sorted(p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    files = [p for p in found if p.is_file()]
    links = _link_entries([p for p in found if p.is_symlink() and not p.is_file()], root)
    if not files and not links:
        raise ArchiveError(f"{root} is empty: put NIfTI/NRRD/MHA volumes or DICOM series in it")

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix() or "."

    volume_files = [p for p in files if is_volume_file(p)]
    series, problems = index_dicom_files(p for p in files if not is_volume_file(p))
    dicom_files = {f for s in series.values() for f in s.files} | {p for p, _ in problems}
    others = [p for p in files if not is_volume_file(p) and p not in dicom_files]

    jobs = [(_scan_file, p, rel(p)) for p in volume_files]
    for s in series.values():
        label = rel(s.folder)
        if sum(1 for t in series.values() if t.folder == s.folder) > 1:
            label = f"{label} [{s.modality} {s.series_uid[-12:]}]"
        jobs.append((_scan_series, s, label))
    entries: list[ManifestEntry] = []
    total = len(jobs)
    events.progress("scan", 0, total, msg=f"{len(volume_files)} volume files, {len(series)} DICOM series")
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(fn, item, label, modality) for fn, item, label in jobs]
        for i, fut in enumerate(futures, 1):
            entries.append(fut.result())
            events.progress("scan", i, total)
    by_uid = {e.series_uid: e for e in entries if e.series_uid}
    for s in series.values():  # references are UIDs until paired
        if s.modality in ("RTSTRUCT", "SEG"):
            by_uid[s.series_uid].references = sorted(s.referenced_series_uids)
    _pair_annotations(entries)
    _skip_duplicates(entries, root)
    entries += links
    entries += [ManifestEntry(path=rel(p), kind="other", status="error", reason=reason) for p, reason in problems]
    entries += [ManifestEntry(path=rel(p), kind="other", status="skipped",
                              reason="not an image (unsupported file type)") for p in others]
    return Manifest(str(root), modality, entries)


def format_table(manifest: Manifest, *, max_other: int = 5) -> str:
    """A readable table: one row per image, series or annotation; other files summarised."""
    rows = [("STATUS", "KIND", "MOD", "SIZE (x,y,z)", "SPACING mm", "PATH / REASON")]
    other = [e for e in manifest.entries if e.kind == "other" and e.status == "skipped"]
    for e in manifest.entries:
        if e in other:
            continue
        size = "x".join(map(str, e.size)) if e.size else "-"
        spacing = "x".join(f"{s:.3g}" for s in e.spacing) if e.spacing else "-"
        text = e.path + (f"  ({e.reason})" if e.reason else "")
        if e.annotations:
            text += f"  [annotated by {', '.join(e.annotations)}]"
        rows.append((e.status, e.kind, e.modality or "-", size, spacing, text))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    if other:
        names = ", ".join(e.path for e in other[:max_other]) + (", ..." if len(other) > max_other else "")
        lines.append(f"{len(other)} other file(s) skipped, not images: {names}")
    counts = manifest.counts()
    lines.append(f"{counts['usable']} usable {manifest.modality if manifest.modality != 'any' else 'image'} volume(s); "
                 + ", ".join(f"{n} {s}" for s, n in counts.items() if s != "usable"))
    return "\n".join(lines)
