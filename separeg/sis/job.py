"""`separeg regions`: separate one volume, cache its label maps, write an overlay and statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from separeg.io.volumes import Geometry, canonical_voxels, read_volume
from separeg.runtime.atomic import write_json
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.sis.figures import pick_slices, region_overlay, save_png
from separeg.sis.regions import RegionMaps, SISConfig, load_or_compute

__all__ = ["RegionsJob", "RegionsResult", "separate_volume", "separate_image", "organ_coverage", "region_statistics",
           "read_reference", "run_regions"]


@dataclass(frozen=True)
class RegionsJob:
    volume: Path
    out_dir: Path
    sis: SISConfig = field(default_factory=SISConfig)
    reference: Path | None = None  # organ label map on the same grid: reports how much of each organ is kept
    overlay_slices: int = 4
    workers: int | None = None


@dataclass
class RegionsResult:
    maps: RegionMaps
    from_cache: bool
    statistics: dict
    overlay: Path | None


def separate_volume(path: str | Path, config: SISConfig, cache_dir: str | Path, *, events: Events | None = None,
                    workers: int | None = None):
    """Read a volume and get its region maps (cached). Returns ``(image, hu, maps, from_cache)``."""
    image = read_volume(path)
    hu, maps, cached = separate_image(image, config, cache_dir, events=events, workers=workers)
    return image, hu, maps, cached


def separate_image(image, config: SISConfig, cache_dir: str | Path, *, events: Events | None = None,
                   workers: int | None = None):
    """Region maps of a volume already read (cached), on its axial slices in the canonical orientation (as the
    segmentation model sees them, whatever the file's axis order). Returns ``(hu, maps, from_cache)``."""
    hu, key = canonical_voxels(image)
    maps, cached = load_or_compute(hu, key, config, cache_dir, events=events, workers=workers)
    return hu, maps, cached


def organ_coverage(maps: RegionMaps, reference: np.ndarray) -> dict[int, float]:
    """Fraction of each organ's voxels (label value > 0 in ``reference``) that lie in kept regions.

    Counted on whole body sections only (:meth:`RegionMaps.body_slices`): voxels of contours that run
    into slices the archive did not store in full are not separable and are left out.
    """
    sections = maps.body_slices()
    kept = maps.labels[sections] > 0
    reference = reference[sections]
    values = np.unique(reference[reference > 0])
    return {int(v): float(kept[reference == v].mean()) for v in values}


def region_statistics(maps: RegionMaps) -> dict:
    per_slice = maps.regions_per_slice()
    used = per_slice[per_slice > 0]
    return {
        "regions": len(maps),
        "slices": int(len(per_slice)),
        "slices_with_regions": int(len(used)),
        "regions_per_slice": {"mean": float(used.mean()) if len(used) else 0.0,
                              "min": int(used.min()) if len(used) else 0, "max": int(used.max()) if len(used) else 0},
        "region_pixels_median": float(np.median(maps.n_pixels)) if len(maps) else 0.0,
    }


def read_reference(path: Path, image) -> np.ndarray:
    """An organ label map that must lie on ``image``'s grid, as a ``(Z, H, W)`` array in the canonical orientation
    (like :func:`separate_image`'s voxels)."""
    reference = read_volume(path)
    if not Geometry.of(reference).matches(Geometry.of(image)):
        raise InputError(f"reference {path} is not on the volume's grid:\n  reference: "
                         f"{Geometry.of(reference).describe()}\n  volume:    {Geometry.of(image).describe()}")
    return canonical_voxels(reference)[0]


def run_regions(job: RegionsJob, events: Events | None = None) -> RegionsResult:
    """Separate ``job.volume`` into regions; write ``cache/``, ``overlay.png`` and ``regions.json`` to its out_dir."""
    events = events or Events()
    out = Path(job.out_dir)
    # Both inputs are read and checked before anything is written: a bad input leaves no output folder behind.
    image = read_volume(job.volume)
    reference = read_reference(Path(job.reference), image) if job.reference else None
    out.mkdir(parents=True, exist_ok=True)
    hu, maps, cached = separate_image(image, job.sis, out / "cache", events=events, workers=job.workers)
    stats = {"volume": str(job.volume), "volume_hash": maps.volume_hash, "config": asdict(job.sis),
             "from_cache": cached, **region_statistics(maps)}
    if reference is not None:
        stats["organ_coverage"] = organ_coverage(maps, reference)
    overlay = None
    slices = pick_slices(maps, job.overlay_slices)
    if slices:
        overlay = save_png(region_overlay(hu, maps, slices, reference=reference, window=job.sis.hu_window),
                           out / "overlay.png")
        stats["overlay_slices"] = slices
    else:
        events.warning("no region was kept on any slice (no body found above "
                       f"{job.sis.body_threshold_hu:g} HU?); no overlay written", stage="sis")
    write_json(stats, out / "regions.json")
    rps = stats["regions_per_slice"]
    source = " (from cache)" if cached else ""
    events.log(f"{stats['regions']} regions on {stats['slices_with_regions']}/{stats['slices']} slices "
               f"({rps['mean']:.1f} per slice, {rps['min']}-{rps['max']}){source}", stage="sis")
    return RegionsResult(maps, cached, stats, overlay)
