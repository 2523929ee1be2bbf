"""The region data of a pretraining run: the ``sis`` stage (archive scan, region maps cached per volume) and the
region set the SSL stages draw their batches from (:class:`separeg.sis.regionset.RegionSet`).
"""

from __future__ import annotations

import torch

from separeg.io.archive import Manifest, format_table, scan_archive
from separeg.io.volumes import canonical_voxels, content_hash
from separeg.pretrain.rundir import RunDir
from separeg.runtime.errors import ArchiveError, CancelledError, InputError
from separeg.runtime.events import Events
from separeg.sis.regions import load_or_compute
from separeg.sis.regionset import RegionSet, VolumeRegions

__all__ = ["stage_sis", "load_region_set"]


def stage_sis(ctx) -> None:
    """Scan the archive and cache the region label maps of every usable volume."""
    # A multichannel case mixes modalities (T1 and T2, CT and PET): every image volume is a candidate channel.
    modality = ctx.cfg.modality if ctx.cfg.in_channels == 1 else "any"
    manifest = scan_archive(ctx.job.archive, modality=modality, events=ctx.events, workers=ctx.job.workers)
    ctx.events.log("archive scan:\n" + format_table(manifest), stage="sis")
    usable = manifest.require_usable()
    if ctx.runtime.is_main:
        manifest.save(ctx.run.manifest)
        if ctx.cfg.normalised_inputs:
            _sis_multichannel(ctx, manifest)
            return
        for i, entry in enumerate(usable, 1):
            if ctx.stop.requested:
                raise CancelledError(f"sis stopped after {i - 1}/{len(usable)} volumes ({ctx.stop.requested}); "
                                     "their region maps are cached, re-run the same command to continue")
            ctx.events.log(f"volume {i}/{len(usable)}: {entry.path}", stage="sis")
            image = entry.read(manifest.root)
            hu, key = canonical_voxels(image, entry.content_hash)  # axial slices, whatever the file's axis order
            load_or_compute(hu, key, ctx.cfg.sis, ctx.run.cache, events=ctx.events, workers=ctx.job.workers)


def _sis_multichannel(ctx, manifest: Manifest) -> None:
    """SIS of every multichannel case of the archive, on its reference channel (:mod:`separeg.io.channel_archive`)."""
    from separeg.io.channel_archive import group_channels, read_channels

    cfg = ctx.cfg
    groups, skipped = group_channels(manifest.usable(), cfg.in_channels)
    for reason in skipped:
        ctx.events.warning(f"left out: {reason}", stage="sis")
    for i, (case, group) in enumerate(groups, 1):
        if ctx.stop.requested:
            raise CancelledError(f"sis stopped after {i - 1}/{len(groups)} cases ({ctx.stop.requested}); "
                                 "their region maps are cached, re-run the same command to continue")
        ctx.events.log(f"case {i}/{len(groups)}: {case} ({cfg.in_channels} channels)", stage="sis")
        _, sis_hu, key, warnings = read_channels(group, manifest.root, cfg.input_channels(), cfg.sis_channel or 0)
        for note in warnings:
            ctx.events.warning(f"{case}: {note}", stage="sis")
        load_or_compute(sis_hu, key, cfg.sis, ctx.run.cache, events=ctx.events, workers=ctx.job.workers)


def _multichannel_volumes(manifest: Manifest, cfg, run: RunDir, events: Events,
                          workers: int | None) -> list[VolumeRegions]:
    from separeg.io.channel_archive import group_channels, read_channels

    volumes = []
    for case, group in group_channels(manifest.usable(), cfg.in_channels)[0]:
        stack, sis_hu, key, _ = read_channels(group, manifest.root, cfg.input_channels(), cfg.sis_channel or 0)
        maps, _ = load_or_compute(sis_hu, key, cfg.sis, run.cache, events=events, workers=workers)
        volumes.append(VolumeRegions(case, stack, maps))
    return volumes


def load_region_set(run: RunDir, cfg, device: torch.device, events: Events, workers: int | None = None) -> RegionSet:
    """The region set of a run's archive, from the SIS cache (computed where missing)."""
    if not run.manifest.exists():
        raise InputError(f"{run.manifest} is missing: run the sis stage first (--stages sis)")
    manifest = Manifest.load(run.manifest)
    volumes = _multichannel_volumes(manifest, cfg, run, events, workers) if cfg.normalised_inputs else []
    for entry in manifest.usable() if not cfg.normalised_inputs else []:
        image = entry.read(manifest.root)
        if content_hash(image) != entry.content_hash:
            raise ArchiveError(f"{entry.path} changed since the archive was scanned; use --restart to rescan")
        hu, key = canonical_voxels(image, entry.content_hash)
        maps, _ = load_or_compute(hu, key, cfg.sis, run.cache, events=events, workers=workers)
        volumes.append(VolumeRegions(entry.path, hu, maps))
    regions = RegionSet(volumes, cfg.sis.hu_window, cfg.crop_size, device, min_window=cfg.min_crop_window())
    if len(regions) < cfg.batch_size:
        raise ArchiveError(f"the archive yields {len(regions)} regions, fewer than one batch ({cfg.batch_size}); "
                           "add volumes or lower --batch-size")
    events.log(f"{len(regions)} regions from {len(volumes)} volumes", stage="data")
    return regions
