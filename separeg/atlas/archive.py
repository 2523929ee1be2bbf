"""Labelled cases carried onto an unlabelled archive of CTs, for ``separeg finetune --archive`` (the archive as
registration targets: Zhao et al., "Data augmentation using learned transformations for one-shot medical image
segmentation", CVPR 2019; Xu & Niethammer, DeepAtlas, MICCAI 2019).

Each (labelled case, archive CT) pair is registered with the atlas registration (:mod:`separeg.atlas.registration`,
the archive CT fixed) and each organ the case annotates is carried onto the archive CT's grid as a soft mask
(as :func:`separeg.atlas.contour._propagate` does), with the part of the grid the case's image covers (outside it
the case says nothing: OpenKBP's crops start and end at different levels).

- **Cache**: one file per pair, ``ROOT/pairs/<archive>__<case>.npz`` (written atomically), holding the key it was
  made with: a hash of the archive CT's and the case's content (CT, label map) and the registration settings. A
  changed input or setting is redone; a stopped run resumes and loses at most the pair in progress. The largest
  archive CTs (voxel count) go first, so a stop late in the run loses the least.
- **Cost**: :data:`ARCHIVE_REGISTRATION` is the atlas registration (translation search, similarity, affine, a
  B-spline of 3 cells per axis at half the 4 mm grid) with 10 B-spline iterations instead of 20. On OpenKBP CTs
  (128³, ~4.7 x 4.7 x 3 mm; 2 labelled cases x 4 archive CTs, ``threads=2`` on 2 CPU cores beside a low-priority
  training job) a pair took 5.5-7.3 s, registration and propagation of 4-5 organs (6.8 s per pair over the whole run,
  with reading, preparation and fusion); a pair file is ~11 kB. On 6 OpenKBP pairs, single-atlas mean DSC was 0.41
  with these settings, 0.44 with the atlas default (~1.5-3 s more per pair) and 0.38 affine only (~1.5 s less).
  ``threads`` sets SimpleITK's threads.
- **Poor pairs** are dropped, with a warning: Mattes MI (``register``'s final metric, negative: lower is better)
  above :data:`MIN_MI` (-0.1; the OpenKBP pairs gave -0.29 to -0.84), or, with 3 or more cases, weaker than
  :data:`POOR_MI_FRACTION` of the median over the same archive CT's pairs (MI depends on the fixed image, so
  pairs are compared per archive CT).
- **Fusion** per archive CT, by vote: per organ, the mean of the soft masks of the kept cases that annotate it and
  cover the voxel (an organ a case does not annotate is unknown for that case, as in ``separeg atlas``); a voxel takes
  the organ of the highest mean at or above 0.5, else background. Its **confidence** is the least, over the organs,
  of ``|2 mean - 1|`` (1: every case sure of every organ; 0: a 50/50 vote, or no case that annotates some organ
  covers the voxel). ``ROOT/fused/<archive>_labels.nii.gz`` and ``_confidence.nii.gz`` (percent) are written for
  review; ``ROOT/pairs.json`` records each pair's MI, seconds and whether it was kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from separeg.atlas.registration import RegistrationConfig, RegistrationError, _prepare, register
from separeg.runtime.atomic import atomic_path, write_json
from separeg.runtime.errors import CancelledError, InputError
from separeg.runtime.events import Events

__all__ = ["ARCHIVE_REGISTRATION", "MIN_MI", "POOR_MI_FRACTION", "PropagatedCT", "propagate_archive", "fuse_votes"]

log = logging.getLogger(__name__)

# Affine + a coarse B-spline (3 cells per axis, 10 iterations at half the 4 mm grid): many pairs on a CPU.
ARCHIVE_REGISTRATION = RegistrationConfig(bspline_iterations=10)  # the atlas's default: 20
MIN_MI = -0.1  # a pair whose final Mattes MI is above this matched no anatomy
POOR_MI_FRACTION = 0.5  # with 3+ cases: |MI| below this fraction of the archive CT's median |MI| is dropped
CACHE_VERSION = 1  # bump when what a pair file holds changes


@dataclass
class PropagatedCT:
    """One archive CT with the labelled cases' organs fused on its grid.

    Attributes:
        name: a file-safe name (the archive path and a content-hash prefix).
        image: the archive CT as read (its own geometry).
        labels: ``(Z, Y, X)`` uint8 label map on ``image``'s grid.
        confidence: ``(Z, Y, X)`` float32 in [0, 1] (module docstring).
        annotated: the organs some kept case annotates (others are unknown on this CT).
        cases: the labelled cases whose pairs were kept.
    """

    name: str
    image: object
    labels: np.ndarray
    confidence: np.ndarray
    annotated: frozenset[int]
    cases: list[str]


def propagate_archive(entries: list, root_folder: Path, cases: list, out: Path, *,
                      registration: RegistrationConfig = ARCHIVE_REGISTRATION, threads: int | None = None,
                      events: Events | None = None, stop=None) -> list[PropagatedCT]:
    """Register every labelled case to every archive CT (cached per pair) and fuse per archive CT.

    Args:
        entries: usable :class:`separeg.io.archive.ManifestEntry` items (with ``content_hash`` and ``size``).
        root_folder: the scanned archive folder (``entry.read(root_folder)``).
        cases: labelled :class:`separeg.segment.case_loading.LoadedCase` items.
        out: the cache folder (``OUT/archive`` of a fine-tune run).
        threads: SimpleITK's threads (default: SimpleITK's, all cores).
        stop: a :class:`separeg.runtime.stop.StopRequest`, asked before each pair to register.

    Returns:
        One :class:`PropagatedCT` per archive CT with at least one kept pair, largest first.

    Raises:
        CancelledError: a stop was requested; the pairs done so far are cached.
    """
    import SimpleITK as sitk

    events = events or Events()
    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out = Path(out)
    ordered = sorted(entries, key=lambda e: (-int(np.prod(e.size or [0])), e.path))
    case_keys = {case.name: _case_hash(case) for case in cases}
    moving: dict[str, object] = {}  # prepared labelled cases, made when first needed
    records, results = [], []
    total, done = len(ordered) * len(cases), 0
    events.progress("archive", 0, total, msg=f"{len(ordered)} archive CT(s) x {len(cases)} labelled case(s)")
    for index, entry in enumerate(ordered):
        name = archive_name(entry)
        image, fixed, pairs = None, None, []
        for case in cases:
            path = out / "pairs" / f"{name}__{_safe(case.name)}.npz"
            key = _pair_key(entry.content_hash, case_keys[case.name], registration)
            record = _cached_record(path, key)
            if record is None:
                if stop is not None and stop.requested:
                    raise CancelledError(f"stopped ({stop.requested}) while registering the archive: {done} of "
                                         f"{total} pairs are cached in {out / 'pairs'}; run again to resume")
                if image is None:
                    image = entry.read(root_folder)
                    fixed = _prepare_target(image, entry.path, registration, events)
                if fixed is None:
                    break  # not a usable registration target: every pair of this CT is skipped
                if case.name not in moving:
                    moving[case.name] = _prepare(case.image, registration)
                record = _register_pair(fixed, image, case, moving[case.name], registration, path, key)
            record.update(archive=entry.path, case=case.name)
            pairs.append((path, record))
            done += 1
            events.progress("archive", done, total, msg=f"{entry.path} <- {case.name}: MI {record['mi']:.2f}, "
                                                        f"{record['seconds']:.0f} s")
        done = (index + 1) * len(cases)  # also past the pairs of a CT skipped as a target
        kept = _keep_good_pairs(pairs, entry.path, events)
        records += [r for _, r in pairs]
        if not kept:
            continue
        image = image if image is not None else entry.read(root_folder)
        shape = tuple(reversed(image.GetSize()))
        labels, confidence, annotated = fuse_votes([p for p, _ in kept], shape)
        results.append(PropagatedCT(name, image, labels, confidence, annotated, [r["case"] for _, r in kept]))
        _write_fused(out / "fused", name, image, labels, confidence)
    write_json({"registration": asdict(registration), "pairs": records}, out / "pairs.json")
    return results


def archive_name(entry) -> str:
    """A file-safe name for an archive entry: its path, and a content-hash prefix (two paths may sanitise alike)."""
    stem = re.sub(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd)$", "", entry.path.split(" [", 1)[0], flags=re.I)
    return f"{_safe(stem)}-{(entry.content_hash or '')[:8]}"


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "ct"


def _case_hash(case) -> str:
    """A labelled case's content: CT voxels and geometry, label map, annotated organs."""
    from separeg.io.volumes import content_hash

    digest = hashlib.sha256(content_hash(case.image).encode())
    digest.update(np.ascontiguousarray(case.labels).tobytes())
    digest.update(repr(sorted(case.annotated)).encode())
    return digest.hexdigest()


def _pair_key(archive_hash: str | None, case_hash: str, registration: RegistrationConfig) -> str:
    return hashlib.sha256(repr((CACHE_VERSION, archive_hash, case_hash, asdict(registration))).encode()).hexdigest()


def _cached_record(path: Path, key: str) -> dict | None:
    """The pair's record when ``path`` holds it for ``key`` (same inputs and settings), else None (redo it)."""
    if not path.exists():
        return None
    with np.load(path) as saved:
        if str(saved["key"]) != key:
            return None
        return json.loads(str(saved["record"]))


def _prepare_target(image, where: str, registration: RegistrationConfig, events: Events):
    """The prepared archive CT, or None (with a warning) when it has no body to register to."""
    try:
        return _prepare(image, registration)
    except InputError as exc:  # one unusable CT must not stop a run over hundreds
        events.warning(f"archive CT {where} skipped: {exc}", stage="archive")
        return None


def _register_pair(fixed, image, case, moving, registration: RegistrationConfig, path: Path, key: str) -> dict:
    """Register, propagate each annotated organ and the case's coverage, and write the pair file atomically."""
    import SimpleITK as sitk

    from separeg.atlas.contour import _carry, _displacement

    start = time.perf_counter()
    try:
        transform, metric = register(fixed, moving, registration)
    except RegistrationError as exc:  # recorded as a pair that matched nothing: MIN_MI drops it, with a warning
        record = {"mi": 0.0, "seconds": round(time.perf_counter() - start, 1), "organs": [], "failed": str(exc)}
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, key=np.array(key), record=np.array(json.dumps(record)),
                                coverage=np.packbits(np.zeros(1, bool)))
        return record
    warp = _displacement(transform, image)
    labels = sitk.GetImageFromArray(case.labels)
    labels.CopyInformation(case.image)
    arrays = {}
    organs = sorted(case.annotated)
    for value in organs:
        mask = _carry(warp, image, labels == value)
        box = _box(mask > 0)  # stored cropped: an organ is a small part of the CT
        arrays[f"mask_{value}"] = np.round(_crop(mask, box) * 255).astype(np.uint8)
        arrays[f"box_{value}"] = np.array(box, np.int64)
    covered = _carry(warp, image, labels >= 0)  # where the case's image lies (1 on its whole grid)
    record = {"mi": round(float(metric), 4), "seconds": round(time.perf_counter() - start, 1), "organs": organs}
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, key=np.array(key), record=np.array(json.dumps(record)),
                            coverage=np.packbits(covered >= 0.5), **arrays)
    return record


def _box(mask: np.ndarray) -> tuple[int, ...]:
    """``(z0, z1, y0, y1, x0, x1)`` of the nonzero voxels (empty: a zero-size box)."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        spans += [int(hit[0]), int(hit[-1]) + 1] if len(hit) else [0, 0]
    return tuple(spans)


def _crop(array: np.ndarray, box: tuple[int, ...]) -> np.ndarray:
    return array[box[0]:box[1], box[2]:box[3], box[4]:box[5]]


def _keep_good_pairs(pairs: list[tuple[Path, dict]], where: str, events: Events) -> list[tuple[Path, dict]]:
    """The pairs whose MI is not clearly poor (module docstring); each drop is said in a warning."""
    mis = np.array([r["mi"] for _, r in pairs])
    median = float(np.median(mis)) if len(mis) >= 3 else None
    kept = []
    for path, record in pairs:
        poor = record["mi"] > MIN_MI or (median is not None and record["mi"] > POOR_MI_FRACTION * median)
        record["kept"] = not poor
        if poor:
            events.warning(f"{where} <- {record['case']}: registration dropped (Mattes MI {record['mi']:.3f}"
                           + (f", median of this CT's pairs {median:.3f}" if median is not None else
                              f", above {MIN_MI}") + "): the images do not match well enough", stage="archive")
        else:
            kept.append((path, record))
    return kept


def fuse_votes(paths: list[Path], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, frozenset[int]]:
    """Vote over pair files on one archive CT, one organ at a time (memory: a few arrays of the CT's size).

    Returns:
        ``(labels, confidence, annotated)``: ``(Z, Y, X)`` uint8 labels (uint16 past 255), float32 confidence in
        [0, 1] (module docstring), and the organs some pair annotates.
    """
    files = [np.load(p) for p in paths]
    try:
        size = int(np.prod(shape))
        coverage = [f["coverage"] for f in files]  # packed bits: small enough to keep
        organs = sorted({int(k[5:]) for f in files for k in f.files if k.startswith("mask_")})
        labels = np.zeros(shape, np.uint8 if max(organs, default=0) < 256 else np.uint16)
        best = np.full(shape, np.nextafter(np.float32(0.5), np.float32(0)), np.float32)  # a vote must reach 0.5
        confidence = np.ones(shape, np.float32) if organs else np.zeros(shape, np.float32)
        for value in organs:
            total = np.zeros(shape, np.float32)
            count = np.zeros(shape, np.uint16)
            for f, packed in zip(files, coverage, strict=True):
                if f"mask_{value}" not in f.files:
                    continue  # this case does not annotate the organ: it has no vote
                covered = np.unpackbits(packed, count=size).reshape(shape).astype(bool)
                box = tuple(int(b) for b in f[f"box_{value}"])
                _crop(total, box)[...] += _crop(covered, box) * (f[f"mask_{value}"].astype(np.float32) / 255.0)
                count += covered
            score = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
            wins = (count > 0) & (score > best)  # strictly: on a tie the lower value keeps the voxel
            labels[wins] = value
            best[wins] = score[wins]
            np.minimum(confidence, np.where(count > 0, np.abs(2.0 * score - 1.0), 0.0), out=confidence)
    finally:
        for f in files:
            f.close()
    return labels, confidence, frozenset(organs)


def _write_fused(folder: Path, name: str, image, labels: np.ndarray, confidence: np.ndarray) -> None:
    """The fused label map and confidence (percent) on the archive CT's grid, for review in Slicer."""
    import SimpleITK as sitk

    from separeg.io.volumes import write_volume

    for suffix, array in (("labels", labels), ("confidence", np.round(confidence * 100).astype(np.uint8))):
        volume = sitk.GetImageFromArray(array)
        volume.CopyInformation(image)
        write_volume(volume, folder / f"{name}_{suffix}.nii.gz")
